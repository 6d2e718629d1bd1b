"""Which torchvision classifiers `shrink` handles: every model of `torchvision.models`, random weights, a small
input, `shrink --ratio 0.3` (default criterion and compensation) and the ratio-0 identity; writes docs/COVERAGE.md.

    python -m benchmarks.coverage --out docs/COVERAGE.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, machine, today

# Models whose constructors need an argument or a larger input to run at all.
KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
          "inception_v3": {"aux_logits": False, "init_weights": False},
          "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 32},
          "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 28}}
SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_b_16": 32, "vit_l_16": 32, "vit_h_14": 28}


def one(name: str) -> dict:
    import torch
    import torchvision

    import prunetool

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = getattr(torchvision.models, name)(**KWARGS.get(name, {})).eval()
    size = SIZES.get(name, 64)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        dense_out = model(x)
    start = time.perf_counter()
    small, report = prunetool.shrink(model, None, ratio=0.3, calib=4, input_shape=(3, size, size), measure=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = small(x)
    same, _ = prunetool.shrink(model, None, "l1", 0.0, "none", calib=4, input_shape=(3, size, size), measure=False)
    with torch.no_grad():
        identical = torch.equal(same(x), dense_out)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    ok = identical and out.shape == dense_out.shape and after < before
    return {"name": name, "ok": ok, "size": size, "params_before": before, "params_after": after,
            "groups": len(report["layers"]), "protected": len(report["protected"]),
            "protected_reasons": _kinds([p["reason"] for p in report["protected"]]),
            "seconds": seconds, "reason": None if ok else "identity or shape check failed"}


def _kinds(reasons: list[str], most: int = 3) -> list[str]:
    """The distinct kinds of reason, layer names dropped ("… (LayerNorm2d) is a layer …" stays readable)."""
    import re

    kinds = []
    for reason in reasons:
        kind = re.sub(r"\b[\w-]+(\.[\w-]+)+\b", "…", reason)  # dotted layer names
        kind = re.sub(r" \(\d+(, \d+)*\)→\(\d+(, \d+)*\)", "", kind)  # shapes of a reshape
        if kind not in kinds:
            kinds.append(kind)
    return kinds[:most]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one")
    parser.add_argument("--out", default=str(ROOT / "docs" / "COVERAGE.md"))
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    import torchvision

    names = args.only or torchvision.models.list_models(module=torchvision.models)
    results = []
    for name in names:
        try:
            proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.coverage", "--one", name],
                                  capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            if proc.returncode == 0:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                last = (proc.stderr.strip().splitlines() or ["crashed"])[-1]
                results.append({"name": name, "ok": False, "reason": last[:200]})
        except subprocess.TimeoutExpired:
            results.append({"name": name, "ok": False, "reason": f"over {args.timeout} s on this machine"})
        print(name, "✓" if results[-1]["ok"] else f"✗ {results[-1]['reason']}", flush=True)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "coverage.json").write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(markdown(results))


def markdown(results: list[dict]) -> str:
    ok = sum(r["ok"] for r in results)
    lines = [
        "# Coverage: torchvision classifiers",
        "",
        f"`python -m benchmarks.coverage --out docs/COVERAGE.md`, {today()}, on {machine()}.",
        "",
        f"**{ok} of {len(results)}** models of `torchvision.models` pass: random weights, input 3×S×S, "
        "`shrink --ratio 0.3` with the default criterion and compensation (4 random calibration inputs), "
        "then the checks: forward works, output shape unchanged, fewer parameters, ratio 0 reproduces the "
        "dense outputs exactly. The verify stage also checked each cut against the dense model with the removed "
        "units zeroed. *Protected* counts producers kept whole; the last column lists up to three kinds of reason (layer names shown as …; `--dry-run` names them).",
        "",
        "| model | ✓/✗ | S | params before | after (ratio 0.3) | groups | protected | protected because | seconds |",
        "|---|:-:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for r in results:
        if r["ok"] or "params_before" in r:
            lines.append(f"| {r['name']} | {'✓' if r['ok'] else '✗'} | {r['size']} | {r['params_before']:,} | "
                         f"{r['params_after']:,} ({r['params_after'] / r['params_before']:.2f}) | {r['groups']} | "
                         f"{r['protected']} | {'; '.join(r['protected_reasons'])} | {r['seconds']:.1f} |")
        else:
            lines.append(f"| {r['name']} | ✗ | | | | | | {r['reason']} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
