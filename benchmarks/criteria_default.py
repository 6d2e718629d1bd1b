"""Which criterion is the default: obs against mrs, both with the least-squares refit, on the MNIST samples.

    python -m benchmarks.criteria_default --out docs/BENCHMARKS.md

The same setting as ``benchmarks.shrink_accuracy`` (every prunable layer at ratio R, 1000 calibration images, no
fine-tuning, accuracy on the full MNIST test set), the two criteria side by side in one run. obs became the
default with ``--compensate lstsq`` when it lost nowhere more than 0.2 pp (issue 25's bar).
"""

from __future__ import annotations

import copy
import json
import time

import prunetool
from prunetool.calibrate import Settings, statistics
from prunetool.cut import cut, select
from prunetool.data import calibration, eval_loader, load_data
from prunetool.measure import evaluate
from prunetool.score import score
from prunetool.trace import trace

from .common import DATA, ROOT, SAMPLES, commit, machine, publish, table_args, today

RATIOS = (0.3, 0.5, 0.7, 0.9)
CRITERIA = ("mrs", "obs")


def run_model(name: str) -> dict:
    arch, path = SAMPLES[name]
    dense = prunetool.load(path, arch=arch).model
    data = load_data(DATA)
    samples = calibration(data, 1000)
    loader = eval_loader(data)
    graph = trace(dense, samples.take(2)[0])
    settings = Settings()
    out = {"dense": evaluate(dense, loader).accuracy}
    for criterion in CRITERIA:
        start = time.perf_counter()
        scores = score(dense, graph, criterion, samples, means=statistics(dense, graph, samples, settings).means,
                       settings=settings)
        out[f"{criterion}_seconds"] = round(time.perf_counter() - start, 2)
        for ratio in RATIOS:
            fresh = statistics(dense, graph, samples, settings, targets=True)
            small = cut(copy.deepcopy(dense), graph, select(graph, scores.scores, ratio), "lstsq", scores.means,
                        samples, stats=fresh, settings=settings).eval()
            out.setdefault(criterion, {})[str(ratio)] = evaluate(small, loader).accuracy
    return out


def markdown(results: dict, seconds: float) -> str:
    lines = ["## The default criterion: obs against mrs (issue 25)", "",
             f"Command: `python -m benchmarks.criteria_default --out docs/BENCHMARKS.md` · {machine()} · {today()} · "
             f"commit {commit()} · {seconds / 60:.0f} min.", "",
             "Top-1 accuracy (%) on the full MNIST test set after every prunable layer loses R of its units, "
             "least-squares refit, no fine-tuning (the setting of the first section), the two criteria in one run.",
             "", "| sample | criterion | " + " | ".join(f"R={r}" for r in RATIOS) + " | scoring s |",
             "|---|---|" + "---:|" * len(RATIOS) + "---:|"]
    for name, r in results.items():
        for c in CRITERIA:
            lines.append(f"| {name} (dense {r['dense']:.2f}) | {c}+lstsq | "
                         + " | ".join(f"{r[c][str(x)]:.2f}" for x in RATIOS) + f" | {r[f'{c}_seconds']:.1f} |")
        diffs = [r["obs"][str(x)] - r["mrs"][str(x)] for x in RATIOS]
        lines.append(f"| {name} | obs − mrs | " + " | ".join(f"{d:+.2f}" for d in diffs) + " | |")
    return "\n".join(lines)


def main() -> None:
    args = table_args(__doc__, "samples", 1800)
    start = time.perf_counter()
    results = {name: run_model(name) for name in args.only or SAMPLES}
    (ROOT / "benchmarks" / "results" / "criteria_default.json").write_text(json.dumps(results, indent=1) + "\n")
    publish(args.out, "criteria-default", markdown(results, time.perf_counter() - start))


if __name__ == "__main__":
    main()
