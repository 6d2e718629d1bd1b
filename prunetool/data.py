"""Data specs: torchvision datasets on disk, ImageFolder trees, .npz arrays, or no data at all.

Calibration takes ``calib`` train samples chosen with a fixed seed; evaluation uses the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from . import distributed
from .errors import UsageError
from .measure import as_input

SEED = 0


@dataclass
class Data:
    """Train and test splits; ``None`` splits mean a structure-only run."""

    train: Dataset | None
    test: Dataset | None
    spec: str = "none"

    @property
    def has_labels(self) -> bool:
        return self.train is not None


def _to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float()
    if t.dim() == 3:  # N×H×W grey images
        t = t.unsqueeze(1)
    return t


def _npz(path: Path) -> Data:
    try:
        arrays = np.load(path)
    except Exception as e:
        raise UsageError(f"cannot read {path} as .npz ({e}); save it with numpy.savez") from None
    need = {"x_train", "y_train", "x_test", "y_test"}
    missing = need - set(arrays.files)
    if missing:
        raise UsageError(f"{path} lacks arrays {', '.join(sorted(missing))}; it needs x_train, y_train, x_test, y_test")
    split = {}
    for name in ("train", "test"):
        x, y = _to_float(arrays[f"x_{name}"]), torch.as_tensor(np.asarray(arrays[f"y_{name}"])).long()
        if len(x) != len(y):
            raise UsageError(f"{path}: x_{name} has {len(x)} samples but y_{name} has {len(y)}")
        split[name] = TensorDataset(x, y)
    return Data(split["train"], split["test"], str(path))


def _torchvision(kind: str, root: str, download: bool) -> Data:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[kind]
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as e:
        raise UsageError(f"no {kind} data under {root} ({str(e).splitlines()[0]}); fix the path or add --download") from None
    except Exception as e:  # network failures during --download
        raise UsageError(f"cannot get {kind} into {root}: {str(e).splitlines()[0]}") from None

    def tensors(ds):
        x = torch.as_tensor(np.asarray(ds.data))
        if x.dim() == 4:  # CIFAR: N×H×W×C
            x = x.permute(0, 3, 1, 2).contiguous()
        return TensorDataset(_to_float(x), torch.as_tensor(np.asarray(ds.targets)).long())

    return Data(tensors(train), tensors(test), f"{kind}:{root}")


def _image_folder(root: Path, input_shape: tuple[int, ...] | None) -> Data:
    from torchvision import datasets, transforms

    steps = []
    if input_shape is not None:
        if input_shape[0] == 1:
            steps.append(transforms.Grayscale())
        steps.append(transforms.Resize(tuple(input_shape[1:])))
    steps.append(transforms.ToTensor())
    tf = transforms.Compose(steps)
    val = root / "val" if (root / "val").is_dir() else root / "test"
    return Data(datasets.ImageFolder(root / "train", tf), datasets.ImageFolder(val, tf), str(root))


def load_data(spec: str | None, download: bool = False, input_shape: tuple[int, ...] | None = None) -> Data:
    """Parse ``--data``: ``mnist:ROOT``, ``fashion-mnist:ROOT``, ``cifar10:ROOT``, a directory, or a ``.npz``."""
    if not spec:
        return Data(None, None)
    kind, sep, root = spec.partition(":")
    if sep and kind.lower() in ("mnist", "fashion-mnist", "fashionmnist", "cifar10"):
        kind = "fashion-mnist" if kind.lower() == "fashionmnist" else kind.lower()
        return _torchvision(kind, root or ".", download)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"--data {spec}: no such file; check the path")
        return _npz(path)
    if path.is_dir():
        if not (path / "train").is_dir() or not ((path / "val").is_dir() or (path / "test").is_dir()):
            raise UsageError(f"--data {spec}: an image folder needs train/ and val/ subdirectories")
        return _image_folder(path, input_shape)
    raise UsageError(f"--data {spec!r} is not understood; use mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, "
                     "an ImageFolder directory or an .npz file")


def _stack(ds: Dataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return x[idx], y[idx]
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.as_tensor(ys).long()


def calibration(data: Data, n: int, input_shape: tuple[int, ...] | None = None,
                model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` train samples chosen with a fixed seed; without data, seeded random inputs labelled by ``model``."""
    gen = torch.Generator().manual_seed(SEED)
    if data.train is None:
        if input_shape is None:
            raise UsageError("no --data and no --input-shape; pass one (e.g. --input-shape 1,28,28 for a structure-only run)")
        x = torch.randn((n, *input_shape), generator=gen)
        if model is None:
            return x, torch.zeros(n, dtype=torch.long)
        with torch.no_grad():
            y = torch.cat([model(as_input(b, model)).argmax(-1) for b in x.split(256)])
        return x, y
    n = min(n, len(data.train))
    idx = torch.randperm(len(data.train), generator=gen)[:n].tolist()
    return _stack(data.train, idx)


def eval_loader(data: Data, n: int | None = None, batch_size: int = 256) -> DataLoader | None:
    """The test split (first ``n`` samples of a seeded permutation when ``n`` is given)."""
    if data.test is None:
        return None
    ds = data.test
    if n is not None and n < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SEED))[:n].tolist()
        ds = Subset(ds, idx)
    if distributed.active():  # each process evaluates its share; measure.evaluate all-reduces the counts
        ds = Subset(ds, list(range(distributed.rank(), len(ds), distributed.world())))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers; write it like 1,28,28") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers, like 1,28,28")
    return shape
