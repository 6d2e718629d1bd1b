"""Data specs: torchvision's on-disk MNIST layout, ImageFolder trees and .npz arrays."""

import struct

import numpy as np
import pytest
import torch
from PIL import Image

from prunetool.data import calibration, eval_loader, load_data, parse_shape
from prunetool.errors import UsageError


def _idx(path, array: np.ndarray):
    kind = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, kind, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_layout_on_disk(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    data = load_data(f"mnist:{tmp_path}")
    x, y = calibration(data, 1000).all()
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert sum(len(b[1]) for b in eval_loader(data)) == 10


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(UsageError, match="--download"):
        load_data(f"fashion-mnist:{tmp_path}")


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 10, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_data(str(tmp_path), input_shape=(3, 8, 8))
    x, y = calibration(data, 4).all()
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1}


def test_npz_scales_uint8_and_accepts_nhw(tmp_path):
    x = np.full((5, 28, 28), 255, dtype=np.uint8)
    y = np.arange(5)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    xs, ys = calibration(load_data(str(tmp_path / "d.npz")), 3).all()
    assert xs.shape == (3, 1, 28, 28) and torch.all(xs == 1.0)


def test_calibration_is_seeded_and_sized(mnist):
    data = load_data(mnist)
    a, _ = calibration(data, 100).all()
    b, _ = calibration(data, 100).all()
    assert torch.equal(a, b) and len(a) == 100


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 1, 4, 4)))
    with pytest.raises(UsageError, match="y_train"):
        load_data(str(tmp_path / "d.npz"))


@pytest.mark.parametrize("text", ["a,b", "0,28", ""])
def test_bad_input_shapes(text):
    if text:
        with pytest.raises(UsageError):
            parse_shape(text)
    else:
        assert parse_shape(text) is None
