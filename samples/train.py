"""Train the sample MNIST networks and write the sample artefacts.

Produces, in ``--out-dir`` (default: this ``samples/`` folder):

* ``evci_cnn.pt``, ``lenet_300_100.pt``, ``conv2.pt`` -- plain ``state_dict``s
  (``torch.save(model.state_dict(), path)``) of the nets in ``samples.nets``;
* ``mnist_subset.npz`` -- 2000 fixed-seed training images plus the full test
  set, as uint8 ``(N, 1, 28, 28)`` arrays with int64 labels;
* ``accuracy.json`` -- test accuracy, parameter count and epochs of each net.

Usage (from the repository root)::

    python -m samples.train --data-root ROOT

where ``ROOT/MNIST/raw/`` holds the four uncompressed MNIST idx files
(``train-images-idx3-ubyte`` etc.), i.e. a ``torchvision.datasets.MNIST``
root.  Pass ``--download`` to let torchvision fetch them instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import datasets

from samples.nets import Conv2, EvciCNN, LeNet300100

SAMPLES_DIR = Path(__file__).resolve().parent

SEED = 0
BATCH_SIZE = 128
LR = 1e-3
EVAL_BATCH_SIZE = 1000
SUBSET_SIZE = 2000

# name -> (class, default epochs).  The name is also the checkpoint file stem.
MODELS = {
    "evci_cnn": (EvciCNN, 10),
    "lenet_300_100": (LeNet300100, 15),
    "conv2": (Conv2, 5),
}


def load_mnist(root: str | Path, download: bool = False):
    """Return ``(x_train, y_train, x_test, y_test)`` as uint8/int64 tensors.

    Images have shape ``(N, 1, 28, 28)`` and are still uint8 in [0, 255];
    use :func:`to_float` to get the ``ToTensor()`` scaling.
    """
    train = datasets.MNIST(root=str(root), train=True, download=download)
    test = datasets.MNIST(root=str(root), train=False, download=download)
    return (
        train.data.unsqueeze(1).contiguous(),
        train.targets.long(),
        test.data.unsqueeze(1).contiguous(),
        test.targets.long(),
    )


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; identical to ``transforms.ToTensor()``
    (division by 255, no mean/std normalisation)."""
    return x_uint8.to(torch.float32).div_(255.0)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy in percent of ``model`` on float inputs ``x``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        correct += (logits.argmax(dim=1) == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


def train_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              epochs: int, seed: int, x_test: torch.Tensor,
              y_test: torch.Tensor, name: str) -> None:
    """Adam (lr ``LR``, cosine-annealed to 0 per step over the whole run),
    batch ``BATCH_SIZE``, with a seeded, deterministic shuffling order."""
    n = len(x)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = epochs * ((n + BATCH_SIZE - 1) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for i in range(0, n, BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        acc = evaluate(model, x_test, y_test)
        print(f"  [{name}] epoch {epoch}/{epochs}  loss {total_loss / n:.4f}  "
              f"test acc {acc:.2f}%  ({time.time() - t0:.1f}s)", flush=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_subset(path: Path, x_train, y_train, x_test, y_test,
                 size: int = SUBSET_SIZE, seed: int = SEED) -> None:
    """Save ``size`` fixed-seed training images and the full test set."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x_train), size=size, replace=False))
    np.savez_compressed(
        path,
        x_train=x_train.numpy()[idx].astype(np.uint8),
        y_train=y_train.numpy()[idx].astype(np.int64),
        x_test=x_test.numpy().astype(np.uint8),
        y_test=y_test.numpy().astype(np.int64),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True,
                        help="torchvision MNIST root (contains MNIST/raw/)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download MNIST into --data-root")
    parser.add_argument("--out-dir", default=str(SAMPLES_DIR),
                        help="where to write checkpoints, npz and json "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every net (default: per-net: "
                             + ", ".join(f"{k}={v[1]}" for k, v in MODELS.items())
                             + ")")
    parser.add_argument("--only", choices=sorted(MODELS), default=None,
                        help="train just this net (other entries of "
                             "accuracy.json are kept)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (default: %(default)s)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    x_train_u8, y_train, x_test_u8, y_test = load_mnist(args.data_root, args.download)
    print(f"MNIST: train {tuple(x_train_u8.shape)}, test {tuple(x_test_u8.shape)}")

    subset_path = out_dir / "mnist_subset.npz"
    write_subset(subset_path, x_train_u8, y_train, x_test_u8, y_test)
    print(f"wrote {subset_path}")

    x_train, x_test = to_float(x_train_u8), to_float(x_test_u8)

    acc_path = out_dir / "accuracy.json"
    report = {"models": {}}
    if args.only and acc_path.exists():
        report = json.loads(acc_path.read_text())
        report.setdefault("models", {})

    names = [args.only] if args.only else list(MODELS)
    t_all = time.time()
    for name in names:
        cls, default_epochs = MODELS[name]
        epochs = args.epochs if args.epochs is not None else default_epochs
        # Per-net seed, independent of --only, so each net is reproducible alone.
        torch.manual_seed(SEED + list(MODELS).index(name))
        model = cls()
        print(f"training {name} ({cls.__name__}, {count_params(model)} params, "
              f"{epochs} epochs)", flush=True)
        t0 = time.time()
        train_one(model, x_train, y_train, epochs, SEED, x_test, y_test, name)
        wall = time.time() - t0
        acc = evaluate(model, x_test, y_test)
        ckpt = out_dir / f"{name}.pt"
        torch.save(model.state_dict(), ckpt)
        print(f"{name}: test accuracy {acc:.2f}%  ({wall:.0f}s)  -> {ckpt}", flush=True)
        report["models"][name] = {
            "class": f"samples.nets.{cls.__name__}",
            "checkpoint": ckpt.name,
            "test_accuracy": round(acc, 2),
            "params": count_params(model),
            "epochs": epochs,
            "train_seconds": round(wall, 1),
        }

    report.update({
        "date": datetime.date.today().isoformat(),
        "dataset": "MNIST (60000 train / 10000 test), inputs float in [0,1], "
                   "no normalisation",
        "optimizer": f"Adam lr={LR} cosine-annealed to 0 (per step), "
                     f"batch {BATCH_SIZE}",
        "seed": SEED,
        "torch": torch.__version__,
    })
    acc_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {acc_path}; total training {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
