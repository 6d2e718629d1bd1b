"""lowrank on the samples: accuracy drop against parameter reduction for each way of choosing the rank, latency
before/after, and Heitmann's rank-10 experiment on Conv-2's first fully connected layer (seed 000, §3.3, Fig. 8).

    python -m benchmarks.lowrank --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import prunetool
from prunetool.data import load_data
from prunetool import lowrank

from .common import DATA, ROOT, SAMPLES, machine, today, write_section

METHODS = {
    "elbow": {},
    "energy 0.9": {"energy": 0.9},
    "energy 0.99": {"energy": 0.99},
    "rank 10": {"rank": 10},
    "rank 32": {"rank": 32},
    "data-aware rank 10": {"data_aware": True, "rank": 10},
    "data-aware elbow": {"data_aware": True},
    "data-aware energy 0.99": {"data_aware": True, "energy": 0.99},
    "max-drop 1.0 (data-aware)": {"data_aware": True, "max_drop": 1.0},
}


def run(name, arch, path, data, calib, **kwargs) -> dict:
    start = time.perf_counter()
    _, report = lowrank(prunetool.load(path, arch=arch), data, calib=calib, **kwargs)
    report["seconds"] = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--calib", type=int, default=1000)
    args = parser.parse_args()
    data = load_data(DATA)
    results = {}
    for name, (arch, path) in SAMPLES.items():
        for method, kwargs in METHODS.items():
            r = run(name, arch, path, data, args.calib, **kwargs)
            results[(name, method)] = r
            print(name, method, r["after"]["params"], f"{r['accuracy_drop']:.2f}", f"{r['seconds']:.1f}s", flush=True)
    arch, path = SAMPLES["conv2"]
    heitmann = run("conv2", arch, path, data, args.calib, layers="classifier.1", rank=10)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "lowrank.json").write_text(json.dumps(
        {f"{k[0]}|{k[1]}": v for k, v in results.items()} | {"heitmann": heitmann}, indent=1, default=str))
    write_section(Path(args.out), "lowrank", markdown(results, heitmann, args.calib))


def markdown(results: dict, heitmann: dict, calib: int) -> str:
    fc1 = heitmann["layers"][0]
    lines = [
        "## lowrank: accuracy against size",
        "",
        f"Command: `python -m benchmarks.lowrank --out docs/BENCHMARKS.md`, {today()}, on {machine()}.",
        "",
        "### Heitmann's rank-10 experiment (seed 000, §3.3, Fig. 8)",
        "",
        "Conv-2's first fully connected layer alone, factored at rank 10 "
        "(`prunetool lowrank samples/conv2.pt --arch samples.nets:Conv2 --layers classifier.1 --rank 10 "
        "--data samples/mnist_subset.npz`). Heitmann's Conv-2 was trained on CIFAR-10 without BatchNorm, ours on "
        "MNIST with BatchNorm (28×28 input, so the layer is 256×9216, aspect ratio Q = 36 instead of 64).",
        "",
        "| | Heitmann (CIFAR-10, mean of 10 runs) | prunetool sample (MNIST) |",
        "|---|--:|--:|",
        f"| elbow rank of the residual curve | 10 | {fc1['elbow']} |",
        f"| 100·‖W₁₀‖_F/‖W‖_F | 70.25 | {100 * math.sqrt(fc1['energy']):.2f} |",
        f"| accuracy drop of the rank-10 model (pp) | 6.34 | {heitmann['accuracy_drop']:.2f} |",
        "| layer shape | 256×16,384 | 256×9,216 |",
        f"| layer parameters at rank 10 | | {fc1['params_before']:,} → {fc1['params_after']:,} |",
        "",
        "Elbow: Kneedle (the `kneed` package) on r(k) = Σ_{i>k} σᵢ², normalised to [0, 1].",
        "",
        "### Every sample, every way of choosing the rank",
        "",
        f"Full 10,000-image MNIST test set, no fine-tuning, {calib} calibration images (data-aware covariance "
        "and the `--max-drop` search, which measures accuracy on the calibration images, never the test set). "
        "Default layers: every Linear and Conv2d but the output head, each only where the rank saves "
        "parameters. Latency: median eager CPU forward pass, batch 1 and 32.",
        "",
        "| sample | method | params | reduction | accuracy | drop (pp) | latency b=1 | latency b=32 | time |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (name, method), r in results.items():
        b, a = r["before"], r["after"]
        lines.append(
            f"| {name} | {method} | {b['params']:,} → {a['params']:,} | {b['params'] / a['params']:.1f}× | "
            f"{b['accuracy']:.2f} → {a['accuracy']:.2f} | {r['accuracy_drop']:.2f} | "
            f"{b['latency_ms']['1']:.2f} → {a['latency_ms']['1']:.2f} ms | "
            f"{b['latency_ms']['32']:.1f} → {a['latency_ms']['32']:.1f} ms | {r['seconds']:.0f} s |")
    evals = {name: r["settings"]["search_evaluations"] for (name, m), r in results.items() if "max-drop" in m}
    lines += ["", "The `--max-drop` search ran " + ", ".join(f"{n}: {e}" for n, e in evals.items()) +
              " evaluations of the calibration set (binary search per layer, largest layer first)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
