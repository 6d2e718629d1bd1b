"""Width of the residual stream: the hidden size of kjv_llama8 narrowed (``shrink --hidden``), alone and with whole
layers and units, against a SliceGPT-style rotation without our refit and against channels removed as they are.

    python -m benchmarks.width --out docs/BENCHMARKS.md

Every row is ``prunetool shrink samples/kjv_llama8 --data samples/kjv_tokens.npz FLAGS --out OUT --json J`` through
the CLI, as a user runs it; OUT (a Hugging Face directory) is loaded again in this process and evaluated, and that
figure must equal the CLI's. Rows:

- *turned, refit*: ``--hidden F`` (the default: the stream turned onto its principal directions, one rotation for
  the whole model; norms folded and rescaled; every reader refit by least squares);
- *as they are, refit*: ``--no-rotate`` (the channels of least energy removed, no rotation);
- *SliceGPT-style*: ``--compensate none`` (the rotation and the slice, no refit: SliceGPT without its per-layer
  rotations and the adapters they need on the residual paths, so the result keeps the family's architecture);
- with ``--drop-blocks K --target-params P``: whole layers first, then the hidden size (with ``--hidden``), then units
  to the target;
- ``--axes units,blocks,hidden --target-params P``: the number of layers and the hidden size chosen by the plan;
  ``--target-latency L``: the same plan, each cut's units meeting the latency measured in ONNX Runtime;
- *FLAP-style* (An et al. 2024, on our cut): MLP units and heads only, ranked across layers (``--scope global``),
  the mean of what the removed units wrote compensated (``--compensate mean``), mrs in place of FLAP's fluctuation
  metric, no block or hidden size removed;
- *Minitron-style* (in this process, on our cut): Minitron's width importance — each channel's mean |norm output|
  over the calibration tokens, summed over the norms (Muralidharan et al. 2024) — the least important channels
  removed as they are, without the distillation Minitron trains afterwards; and the same with our readers' refit.

Latency: PyTorch eager and ONNX Runtime (the reloaded directory exported as ``prunetool export`` does) on this CPU,
dense and cut in alternating rounds, batch 1 and 8, 128-token sequences.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import prunetool
from prunetool import width
from prunetool.batch import batch_slice, call
from prunetool.data import calibration, eval_loader, load_data
from prunetool.export import DeployedSpeed
from prunetool.layers import clone
from prunetool.measure import evaluate, params

from .common import ROOT, commit, machine, publish, table_args, today
from .depth import cli, latency, reloaded

MODEL, DATA = ROOT / "samples" / "kjv_llama8", ROOT / "samples" / "kjv_tokens.npz"
ROWS = {  # name → flags
    "--hidden 0.25 (turned, refit)": ["--ratio", "0", "--hidden", "0.25"],
    "--hidden 0.25 --no-rotate (as they are, refit)": ["--ratio", "0", "--hidden", "0.25", "--no-rotate"],
    "--hidden 0.25 --compensate none (SliceGPT-style)": ["--ratio", "0", "--hidden", "0.25", "--compensate", "none"],
    "--hidden 0.3": ["--ratio", "0", "--hidden", "0.3"],
    "--hidden 0.1 --drop-blocks 2 --target-params 0.7": ["--hidden", "0.1", "--drop-blocks", "2",
                                                         "--target-params", "0.7"],
    "--drop-blocks 3 --target-params 0.7": ["--drop-blocks", "3", "--target-params", "0.7"],
    "FLAP-style: --compensate mean --scope global --allocation uniform --target-params 0.7":
        ["--compensate", "mean", "--scope", "global", "--allocation", "uniform", "--target-params", "0.7"],
    "--hidden 0.5": ["--ratio", "0", "--hidden", "0.5"],
    "--hidden 0.5 --compensate none (SliceGPT-style)": ["--ratio", "0", "--hidden", "0.5", "--compensate", "none"],
    "FLAP-style: --compensate mean --scope global --allocation uniform --target-params 0.5":
        ["--compensate", "mean", "--scope", "global", "--allocation", "uniform", "--target-params", "0.5"],
    "--hidden 0.3 --drop-blocks 2 --target-params 0.5": ["--hidden", "0.3", "--drop-blocks", "2",
                                                         "--target-params", "0.5"],
    "--axes units,blocks --target-params 0.7": ["--axes", "units,blocks", "--target-params", "0.7"],
    "--axes units,blocks,hidden --target-params 0.7": ["--axes", "units,blocks,hidden", "--target-params", "0.7"],
    "--axes units,blocks,hidden --target-params 0.5": ["--axes", "units,blocks,hidden", "--target-params", "0.5"],
    "--axes units,blocks,hidden --target-latency 0.75": ["--axes", "units,blocks,hidden", "--target-latency", "0.75"],
    "--axes units,heads --target-latency 0.75": ["--axes", "units,heads", "--target-latency", "0.75"],
    "--axes units,heads --target-params 0.7": ["--axes", "units,heads", "--target-params", "0.7"],
    "--axes units,blocks,hidden,heads --target-params 0.7": ["--axes", "units,blocks,hidden,heads",
                                                             "--target-params", "0.7"],
    "--axes units,blocks,hidden,heads --target-latency 0.7": ["--axes", "units,blocks,hidden,heads",
                                                              "--target-latency", "0.7"],
}
BATCHES = (1, 8)

BASELINES = {  # name → (fraction of the hidden size removed, our refit after)
    "Minitron-style importance, --hidden 0.25, no refit": (0.25, False),
    "Minitron-style importance, --hidden 0.25, our refit": (0.25, True),
}


def onnxruntime(speeds: dict[int, DeployedSpeed], small) -> dict[str, float]:
    """ONNX Runtime's speed-up of ``small`` over the dense model at each batch (the dense session exported once)."""
    return {str(b): speed.speedup(small)["speedup"]["p50"] for b, speed in speeds.items()}


def minitron(dense, fraction: float, refit: bool, calib, loader, example, speeds) -> dict:
    """Minitron's width importance (each channel's mean |norm output| over the calibration tokens, summed over every
    norm), the least important ``fraction`` of the channels removed as they are; ``refit``: our readers' refit."""
    start = time.perf_counter()
    small = clone(dense)
    stream = width.find(small, calib.take(2)[0])
    modules = dict(small.named_modules())
    importance = torch.zeros(stream.width, dtype=torch.float64)

    def take(_, __, out: torch.Tensor) -> None:
        importance.add_(out.detach().abs().reshape(-1, out.shape[-1]).double().mean(0))

    handles = [modules[n].register_forward_hook(take) for n in stream.norms]
    with torch.no_grad():
        for xb, _, _ in calib.batches(8):
            call(small, xb)
    for h in handles:
        h.remove()
    kept = width.kept_width(small.config, fraction)
    order = importance.argsort(descending=True)
    width.slice_stream(small, stream, torch.eye(stream.width, dtype=torch.float64)[:, order], kept, rotated=False)
    if refit:
        width.refit_readers(small, dense, stream, calib)
    q = evaluate(small.eval(), loader)
    return {"flags": "in this process", "value": q.value, "dense": evaluate(dense, loader).value,
            "params": params(small) / params(dense), "hidden": [stream.width, kept], "energy_kept": None,
            "seconds": round(time.perf_counter() - start, 1), "blocks": [], "speedup": latency(dense, small, example),
            "ort": onnxruntime(speeds, small)}


def run(flags: list[str], loader, dense, example, work: Path, timeout: int, speeds) -> dict:
    out = work / "-".join(f.strip("-") for f in flags)
    start = time.perf_counter()
    report = cli(["shrink", str(MODEL), "--data", str(DATA), *flags, "--out", str(out)], timeout)
    seconds = time.perf_counter() - start
    again, value = reloaded(report, loader, what=" ".join(flags))
    stream = next((r for r in report["layers"] if r.get("stream")), {})
    return {"flags": " ".join(flags), "value": value, "dense": report["metric"]["before"],
            "params": params(again) / params(dense), "hidden": [stream.get("units_before"), stream.get("units_after")],
            "energy_kept": stream.get("energy_kept"), "seconds": round(seconds, 1),
            "blocks": [r["name"] for r in report["layers"] if r.get("block") and r["units_after"] == 0],
            "heads": report["settings"].get("drop_heads", 0),
            "speedup": latency(dense, again, example), "ort": onnxruntime(speeds, again)}


def markdown(rows: dict) -> str:
    first = next(iter(rows.values()), {})
    dense = first.get("dense", float("nan"))
    lines = [
        "## Width: the hidden size (issue 26)",
        "",
        f"Command: `python -m benchmarks.width --out docs/BENCHMARKS.md` · {machine()} · {today()} · commit "
        f"{', '.join(sorted({r.get('commit', '?') for r in rows.values()}))} (each row's commit and seconds in the "
        "table).",
        "",
        f"kjv_llama8 (dense perplexity {dense:.2f} on the held-out KJV sequences, hidden size 128). Each row: "
        "`prunetool shrink samples/kjv_llama8 --data samples/kjv_tokens.npz FLAGS --out OUT` through the CLI, OUT "
        "(a Hugging Face directory) reloaded and evaluated (equal to the CLI's figure). *Turned*: one rotation "
        "onto the stream's principal directions; *refit*: every reader of the narrowed stream refit by least "
        "squares; *SliceGPT-style*: turned, no refit; *Minitron-style* (in this process, on our cut): the "
        "channels of least mean |norm output| summed over the norms removed as they are, without the distillation "
        "Minitron trains afterwards; *FLAP-style* (on our cut): MLP units and heads ranked across layers, the mean "
        "of what they wrote compensated, mrs in place of FLAP's fluctuation metric (its uniform search keeps fewer "
        "parameters than asked). Rows with blocks removed from commit 51bba00 on refit both writers of each later "
        "layer and the readers after the gap (before: the last linear layer). Speed-ups at batch 1 / 8, "
        "128-token context, alternating rounds (noisy on this "
        "shared 2-core machine): PyTorch eager, and ONNX Runtime (the reloaded model exported and checked; – where "
        "the row predates that column).",
        "",
        "| flags | hidden size | energy kept | params kept | perplexity | vs dense | blocks (and heads) removed "
        "| PyTorch speed-up "
        "1 / 8 | ONNX Runtime 1 / 8 | seconds | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| `{name}` | failed: {r['error'][:120]} | | | | | | | | | {r['commit']} |")
            continue
        s, o = r["speedup"], r.get("ort")
        ort = f"{o['1']:.2f}× / {o['8']:.2f}×" if o else "–"
        energy = "–" if r["energy_kept"] is None else f"{r['energy_kept']:.3f}"
        hidden = f"{r['hidden'][0]} → {r['hidden'][1]}" if r["hidden"][0] else "whole"  # the plan kept the width
        lines.append(f"| `{name}` | {hidden} | {energy} | "
                     f"{r['params']:.3f} | {r['value']:.2f} | {100 * (r['value'] / dense - 1):+.1f}% | "
                     f"{', '.join(b.rsplit('.', 1)[-1] for b in r['blocks']) or '–'}"
                     f"{f'; {heads} KV group(s) per layer' if (heads := r.get('heads')) else ''} | "
                     f"{s['1']:.2f}× / {s['8']:.2f}× | {ort} | {r['seconds']:.0f} | {r['commit']} |")
    return "\n".join(lines)


def main() -> None:
    args = table_args(__doc__, "rows (their flags, as in ROWS)", 1800)
    torch.manual_seed(0)
    path = ROOT / "benchmarks" / "results" / "width.json"
    rows = json.loads(path.read_text()) if args.only and path.exists() else {}  # --only: the others kept
    data = load_data(str(DATA))
    dense = prunetool.load(str(MODEL)).model.eval()
    loader = eval_loader(data)
    example = batch_slice(calibration(data, 8).take(8)[0], 0, 1)
    speeds = {b: DeployedSpeed(dense, example, b) for b in BATCHES}
    with tempfile.TemporaryDirectory() as d:
        for name, flags in ROWS.items():
            if args.only and name not in args.only:
                continue
            try:
                rows[name] = run(flags, loader, dense, example, Path(d), args.timeout, speeds) | {"commit": commit()}
            except RuntimeError as e:
                rows[name] = {"error": str(e), "commit": commit()}
            print(json.dumps({name: rows[name]}), flush=True)
    calib = calibration(data, 512)  # the CLI's calibration samples (its default --calib)
    for name, (fraction, refit) in BASELINES.items():
        if not args.only or name in args.only:
            rows[name] = minitron(dense, fraction, refit, calib, loader, example, speeds) | {"commit": commit()}
            print(json.dumps({name: rows[name]}), flush=True)
    for speed in speeds.values():
        speed.close()
    path.write_text(json.dumps(rows, indent=1) + "\n")
    publish(args.out, "width", markdown({n: rows[n] for n in [*ROWS, *BASELINES] if n in rows}))


if __name__ == "__main__":
    main()
