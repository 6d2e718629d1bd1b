"""Accuracy after `shrink` with no fine-tuning: every criterion × compensation on every sample, beside
Torch-Pruning's magnitude and Taylor importances at the same ratios, plus the cost of MRS and MRP scoring.

    python -m benchmarks.shrink_accuracy --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunetool
from prunetool.calibrate import Settings, statistics
from prunetool.options import COMPENSATIONS, CRITERIA, DEFAULT_COMPENSATION, DEFAULT_CRITERION, DEFAULT_ROWS
from prunetool.cut import cut, select, sequential_means
from prunetool.data import Samples, calibration, eval_loader, load_data
from prunetool.measure import evaluate, params
from prunetool.score import score
from prunetool.trace import trace

from .common import DATA, ROOT, SAMPLES, machine, today, write_section

RATIOS = (0.3, 0.5, 0.7, 0.9)
ROWS = (2, 4, 8, 16, 32, 10 ** 9)  # 10⁹: every position of every sample
PREVIOUS = ROOT / "benchmarks" / "results" / "shrink_accuracy_v01.json"  # prunetool 0.1's engine, kept for comparison
MRP_CALIB = {"conv2": 250}  # MRP runs one forward pass per unit: Conv-2's 640 units × 1000 samples is too slow


def forward_backward_seconds(model, x, y, batch=256) -> float:
    start = time.perf_counter()
    for xb, yb in zip(x.split(batch), y.split(batch)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def forward_seconds(model, x, batch=256) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for xb in x.split(batch):
            model(xb)
    return time.perf_counter() - start


def torch_pruning(model, x, y, ratio: float, importance: str):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    imp = tp.importance.MagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.TaylorImportance()
    pruner = tp.pruner.MetaPruner(model, x[:2], importance=imp, pruning_ratio=ratio, ignored_layers=[head])
    if importance == "taylor":
        model.zero_grad()
        for xb, yb in zip(x.split(256), y.split(256)):
            F.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def run_model(name: str, arch: str, path: Path, calib: int, log) -> dict:
    ckpt = prunetool.load(path, arch=arch)
    dense = ckpt.model
    data = load_data(DATA)
    samples = calibration(data, calib)
    x, y = samples.all()
    loader = eval_loader(data)
    dense_acc = evaluate(dense, loader).accuracy
    graph = trace(dense, x[:2])
    result = {"dense": dense_acc, "params": params(dense), "ours": {}, "tp": {}, "params_at": {}, "timing": {},
              "rows": {}}
    settings = Settings()

    fb = forward_backward_seconds(dense, x, y)
    result["timing"]["forward_backward_s"] = fb
    mrp_n = MRP_CALIB.get(name, calib)
    result["timing"]["mrp_calib"] = mrp_n
    result["timing"]["forward_backward_mrp_calib_s"] = forward_backward_seconds(dense, x[:mrp_n], y[:mrp_n])
    stats = statistics(dense, graph, samples, settings, targets=True)
    for criterion in CRITERIA:
        n = mrp_n if criterion == "mrp" else calib
        start = time.perf_counter()  # scoring cost: the means' forward pass and the criterion's own pass
        means = statistics(dense, graph, Samples(x[:n], y[:n]), settings).means
        scores = score(dense, graph, criterion, Samples(x[:n], y[:n]), means=means, settings=settings)
        result["timing"][f"{criterion}_s"] = time.perf_counter() - start
        log(f"{name}: scored {criterion} in {result['timing'][f'{criterion}_s']:.2f}s")
        for ratio in RATIOS:
            keep = select(graph, scores.scores, ratio)
            for comp in COMPENSATIONS:
                means = sequential_means(dense, graph, keep, samples, settings=settings) if comp == "mean" \
                    else scores.means
                fresh = statistics(dense, graph, samples, settings, targets=True) if comp == "lstsq" else None
                small = cut(copy.deepcopy(dense), graph, keep, comp, means, samples, stats=fresh,
                            settings=settings).eval()
                acc = evaluate(small, loader).accuracy
                result["ours"].setdefault(f"{criterion}+{comp}", {})[str(ratio)] = acc
                result["params_at"][str(ratio)] = params(small)
            log(f"{name}: {criterion} r={ratio}: " + ", ".join(
                f"{c} {result['ours'][f'{criterion}+{c}'][str(ratio)]:.2f}" for c in COMPENSATIONS))
    mrs = score(dense, graph, "mrs", samples, means=stats.means, settings=settings).scores
    for rows in ROWS:  # the default's least-squares rows per input: how many sampled positions are enough
        sampled = Settings(rows=rows)
        for ratio in RATIOS:  # a refit uses its targets up: each cut measures its own
            rows_stats = statistics(dense, graph, samples, sampled, targets=True)
            small = cut(copy.deepcopy(dense), graph, select(graph, mrs, ratio), "lstsq", None, samples,
                        stats=rows_stats, settings=sampled).eval()
            result["rows"].setdefault(str(rows), {})[str(ratio)] = evaluate(small, loader).accuracy
        log(f"{name}: rows {rows}: " + ", ".join(f"{v:.2f}" for v in result["rows"][str(rows)].values()))
    for imp in ("magnitude", "taylor"):
        for ratio in RATIOS:
            pruned = torch_pruning(dense, x, y, ratio, imp)
            acc = evaluate(pruned, loader).accuracy
            result["tp"].setdefault(imp, {})[str(ratio)] = acc
            result["tp"].setdefault(f"{imp}_params", {})[str(ratio)] = params(pruned)
            log(f"{name}: torch-pruning {imp} r={ratio}: {acc:.2f} ({params(pruned)} params)")
    return result


def markdown(results: dict, calib: int, seconds: float) -> str:
    default = f"{DEFAULT_CRITERION}+{DEFAULT_COMPENSATION}"
    previous = json.loads(PREVIOUS.read_text()) if PREVIOUS.exists() else {}
    lines = [
        "## shrink: accuracy without fine-tuning",
        "",
        f"Command: `python -m benchmarks.shrink_accuracy --out docs/BENCHMARKS.md` (`make bench`), {today()}, "
        f"on {machine()}; {seconds / 60:.0f} min in all.",
        "",
        f"Top-1 accuracy (%) on the full 10,000-image MNIST test set after `shrink --ratio R` with no fine-tuning; "
        f"{calib} calibration images from the training split (MRP on Conv-2 uses the first {MRP_CALIB['conv2']}). "
        "Torch-Pruning (`torch-pruning` from PyPI) prunes the same layers (all but the output layer) at the same "
        "ratio with its `MagnitudeImportance(p=2)` and `TaylorImportance`, without fine-tuning. "
        f"**Bold**: the default (`{default}`).",
        "",
    ]
    for name, r in results.items():
        ratios = [str(x) for x in RATIOS]
        lines += [f"### {name} (dense {r['dense']:.2f}%, {r['params']:,} parameters)", "",
                  "| method | " + " | ".join(f"R={q}" for q in ratios) + " |",
                  "|---|" + "---:|" * len(ratios)]
        lines.append("| parameters after (ours) | " + " | ".join(f"{r['params_at'][q]:,}" for q in ratios) + " |")
        lines.append("| parameters after (Torch-Pruning) | " + " | ".join(
            f"{r['tp']['magnitude_params'][q]:,}" for q in ratios) + " |")
        rows = sorted(r["ours"].items(), key=lambda kv: -sum(kv[1].values()))
        for method, accs in rows:
            label = f"**{method}**" if method == default else method
            cells = [f"**{accs[q]:.2f}**" if method == default else f"{accs[q]:.2f}" for q in ratios]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for imp in ("magnitude", "taylor"):
            lines.append(f"| Torch-Pruning {imp} | " + " | ".join(f"{r['tp'][imp][q]:.2f}" for q in ratios) + " |")
        old = previous.get(name, {}).get("ours", {})
        for method in (default, "mrs+mean"):
            if method in old:
                lines.append(f"| {method}, prunetool 0.1's engine | " + " | ".join(
                    f"{old[method][q]:.2f}" for q in ratios) + " |")
        tp_best = {q: max(r["tp"]["magnitude"][q], r["tp"]["taylor"][q]) for q in ratios}
        margin = ", ".join(f"R={q}: {r['ours'][default][q] - tp_best[q]:+.2f} pp" for q in ratios)
        lines += ["", f"Default minus Torch-Pruning's best: {margin}."]
        if default in old:
            shift = ", ".join(f"R={q}: {r['ours'][default][q] - old[default][q]:+.2f} pp" for q in ratios)
            lines += [f"Default, new engine minus 0.1's engine: {shift}."]
        lines.append("")
    lines += ["### Sampled positions of the least-squares refit", "",
              f"Default `{default}`, accuracy (%) by least-squares rows per input of a layer (`--calib-rows`; "
              "each calibration image contributes `rows × fan-in / images` sampled output positions, at least one); "
              f"'all' uses every position of every image. The default is {DEFAULT_ROWS}.", ""]
    for name, r in results.items():
        ratios = [str(x) for x in RATIOS]
        lines += [f"**{name}**", "", "| rows | " + " | ".join(f"R={q}" for q in ratios) + " | largest gap to 'all' |",
                  "|---|" + "---:|" * (len(ratios) + 1)]
        full = r["rows"][str(10 ** 9)]
        for rows, accs in r["rows"].items():
            label = "all" if rows == str(10 ** 9) else rows
            gap = max(abs(accs[q] - full[q]) for q in ratios)
            lines.append(f"| {label} | " + " | ".join(f"{accs[q]:.2f}" for q in ratios) + f" | {gap:.2f} pp |")
        lines.append("")
    lines += ["### Scoring cost", "",
              "Wall time of scoring all units of all layers (the forward pass that measures the means, and the "
              "criterion's own pass), as a ratio to one plain forward+backward pass (cross-entropy) over the same "
              "calibration samples.", "",
              "| sample | forward+backward | MRS | ratio | taylor | MRP | MRP samples | MRP ratio |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        t = r["timing"]
        lines.append(f"| {name} | {t['forward_backward_s']:.2f} s | {t['mrs_s']:.2f} s | "
                     f"{t['mrs_s'] / t['forward_backward_s']:.2f}× | {t['taylor_s']:.2f} s | {t['mrp_s']:.1f} s | "
                     f"{t['mrp_calib']} | {t['mrp_s'] / t['forward_backward_mrp_calib_s']:.0f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "shrink_accuracy.json"))
    parser.add_argument("--calib", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=list(SAMPLES))
    args = parser.parse_args()
    start = time.perf_counter()
    results = {}
    for name in args.only:
        arch, path = SAMPLES[name]
        results[name] = run_model(name, arch, path, args.calib, lambda msg: print(msg, flush=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    write_section(Path(args.out), "shrink_accuracy", markdown(results, args.calib, time.perf_counter() - start))


if __name__ == "__main__":
    main()
