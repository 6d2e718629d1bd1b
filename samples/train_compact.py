"""Train the compact Fashion-MNIST samples: nets with little redundancy, which tell pruning methods apart.

Produces, in ``--out-dir`` (default: this ``samples/`` folder):

* ``fashion_resnet20.pt`` (``samples.nets.ResNet20``) and ``fashion_mobilenet.pt``
  (``samples.nets.MobileNetV2Small``): plain ``state_dict``s;
* ``fashion_subset.npz``: 2000 fixed-seed training images and the full 10 000-image test set, uint8
  ``(N, 1, 28, 28)`` with int64 labels (the layout of ``mnist_subset.npz``);
* ``fashion_accuracy.json``: test accuracy, parameters, epochs and training time of each net.

Usage (from the repository root)::

    python -m samples.train_compact --data-root ROOT

where ``ROOT/FashionMNIST/raw/`` holds the four uncompressed idx files. They ship in Debian's
``dataset-fashion-mnist`` package (MIT licence, Zalando Research): ``apt-get download dataset-fashion-mnist``,
``dpkg -x`` it, and gunzip ``usr/share/datasets/fashion-mnist/*.gz`` into ``ROOT/FashionMNIST/raw/``.

Training: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, a one-cycle learning rate peaking at 0.1,
random crops (padding 2) and horizontal flips, for a fixed number of epochs that fits ~15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets

from samples.nets import MobileNetV2Small, ResNet20
from samples.train import count_params, evaluate, to_float, write_subset

SAMPLES_DIR = Path(__file__).resolve().parent
SEED = 0
BATCH_SIZE = 128
MODELS = {"fashion_resnet20": (ResNet20, 8), "fashion_mobilenet": (MobileNetV2Small, 15)}  # ~15 min each here


def load_fashion(root: str | Path):
    """``(x_train, y_train, x_test, y_test)``: uint8 ``(N, 1, 28, 28)`` images and int64 labels."""
    train = datasets.FashionMNIST(root=str(root), train=True, download=False)
    test = datasets.FashionMNIST(root=str(root), train=False, download=False)
    return train.data.unsqueeze(1).contiguous(), train.targets.long(), test.data.unsqueeze(1).contiguous(), \
        test.targets.long()


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 28×28 crops of the batch padded by 2, and horizontal flips of half of it."""
    n = len(x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch: cheap on a CPU
    out = padded[:, :, dy:dy + 28, dx:dx + 28]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_one(model: nn.Module, x, y, epochs: int, x_test, y_test, name: str) -> None:
    n = len(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((n + BATCH_SIZE - 1) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(1, epochs + 1):
        model.train()
        t0, total = time.time(), 0.0
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  [{name}] epoch {epoch}/{epochs}  loss {total / n:.4f}  test acc "
              f"{evaluate(model, x_test, y_test):.2f}%  ({time.time() - t0:.0f}s)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="torchvision FashionMNIST root (holds FashionMNIST/raw/)")
    parser.add_argument("--out-dir", default=str(SAMPLES_DIR), help="where to write (default: %(default)s)")
    parser.add_argument("--only", choices=sorted(MODELS), default=None, help="train just this net")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every net (default: per net)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train_u8, y_train, x_test_u8, y_test = load_fashion(args.data_root)
    write_subset(out / "fashion_subset.npz", x_train_u8, y_train, x_test_u8, y_test)
    x_train, x_test = to_float(x_train_u8), to_float(x_test_u8)
    path = out / "fashion_accuracy.json"
    report = json.loads(path.read_text()) if path.exists() else {"models": {}}
    for name in [args.only] if args.only else list(MODELS):
        cls, epochs = MODELS[name]
        epochs = args.epochs or epochs
        torch.manual_seed(SEED + list(MODELS).index(name))
        model = cls()
        print(f"training {name} ({cls.__name__}, {count_params(model):,} params, {epochs} epochs)", flush=True)
        t0 = time.time()
        train_one(model, x_train, y_train, epochs, x_test, y_test, name)
        wall = time.time() - t0
        acc = evaluate(model, x_test, y_test)
        torch.save(model.state_dict(), out / f"{name}.pt")
        print(f"{name}: test accuracy {acc:.2f}% ({wall:.0f}s)", flush=True)
        report["models"][name] = {"class": f"samples.nets.{cls.__name__}", "checkpoint": f"{name}.pt",
                                  "test_accuracy": round(acc, 2), "params": count_params(model), "epochs": epochs,
                                  "train_seconds": round(wall, 1)}
        report.update({"date": datetime.date.today().isoformat(),
                       "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
                       "optimizer": "SGD nesterov 0.9, wd 5e-4, one-cycle max lr 0.1, batch 128, crop+flip",
                       "seed": SEED, "torch": torch.__version__, "threads": args.threads})
        path.write_text(json.dumps(report, indent=2) + "\n")  # after each net: a stopped run keeps the ones done


if __name__ == "__main__":
    main()
