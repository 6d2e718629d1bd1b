"""CPU latency after `shrink --ratio 0.5` against the MACs reduction, with and without `--round-to`.

    python -m benchmarks.latency --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torchvision

from prunetool.cut import cut, select
from prunetool.measure import latency, macs, params
from prunetool.score import weight_scores
from prunetool.trace import trace

from .common import ROOT, machine, today, write_section

MODELS = ("resnet18", "mobilenet_v2")
BATCHES = (1, 16)
ROUND_TO = (1, 8, 32)


def measure(model, shape, runs) -> dict:
    out = {"params": params(model), "macs": macs(model, shape)}
    for b in BATCHES:
        out[f"ms_b{b}"] = min(latency(model, shape, b, budget_s=2.0, max_runs=200) for _ in range(runs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=3, help="repeat each median this often, keep the best")
    args = parser.parse_args()
    shape = (3, args.size, args.size)
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        dense = getattr(torchvision.models, name)().eval()
        graph = trace(dense, torch.randn(2, *shape))
        scores = weight_scores(graph, "l2")
        base = measure(dense, shape, args.runs)
        print(name, "dense", base, flush=True)
        for r in ROUND_TO:
            small = cut(copy.deepcopy(dense), graph, select(graph, scores, args.ratio, round_to=r), "none").eval()
            m = measure(small, shape, args.runs)
            print(name, f"round_to={r}", m, flush=True)
            rows.append((name, r, base, m))
    lines = [
        "## shrink: CPU latency against MACs",
        "",
        f"Command: `python -m benchmarks.latency --out docs/BENCHMARKS.md`, {today()}, on {machine()}.",
        "",
        f"torchvision models with random weights at input 3×{args.size}×{args.size}, `shrink --ratio {args.ratio}` "
        "(every prunable group loses half its units; residual streams are coupled groups), eager PyTorch on the "
        "CPU, median latency of a forward pass after warm-up (best of "
        f"{args.runs} medians). Speed-up and MACs reduction are dense ÷ shrunk.",
        "",
        "| model | --round-to | params | MACs reduction | latency b=1 (dense → shrunk) | speed-up b=1 | "
        "latency b=16 | speed-up b=16 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r, base, m in rows:
        lines.append(
            f"| {name} | {r} | {base['params']:,} → {m['params']:,} | {base['macs'] / m['macs']:.2f}× | "
            f"{base['ms_b1']:.1f} → {m['ms_b1']:.1f} ms | {base['ms_b1'] / m['ms_b1']:.2f}× | "
            f"{base['ms_b16']:.0f} → {m['ms_b16']:.0f} ms | {base['ms_b16'] / m['ms_b16']:.2f}× |")
    write_section(Path(args.out), "latency", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
