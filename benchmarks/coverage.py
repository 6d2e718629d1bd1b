"""Coverage through the user's path: every torchvision classifier and 30 timm architectures, random weights,
driven through the CLI exactly as a user would, then reloaded in a fresh process from another directory.

    python -m benchmarks.coverage --out docs/COVERAGE.md            # everything (about 2 hours on 2 cores)
    python -m benchmarks.coverage --only resnet18 timm:convnext_atto  # some

Per model: (1) a process builds it with random weights and saves its state_dict; (2) ``prunetool shrink NAME.pt
--arch … --input-shape 3,S,S --ratio 0.5 --calib 16 --out X.pt --onnx X.onnx --pt2 X.pt2 --json X.json
--no-latency`` (default criterion and compensation); (3) ``benchmarks/coverage_reload.py`` runs in a fresh
process from another directory: ``prunetool.load(X.pt)`` with no flags, and compares its outputs with onnxruntime
on X.onnx and with ``torch.export.load(X.pt2)``. When the whole command fails, it is run again without the
exports, and ``prunetool export`` is run for each export, so that each column says what failed.

Columns: cut (the model lost parameters), verify (every check of the verify stage passed), reload (fresh
process, other directory, no flags, outputs match), onnx, pt2 (export and parity). For timm, one more: builder
(the same shrink with ``--arch mymodels:build``, a plain ``def build(): return timm.create_model(...)`` in the
user's own module, then the same fresh-process reload with no flags).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, commit, machine, today, write_section

TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
                      "inception_v3": {"aux_logits": False, "init_weights": False},
                      "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 32},
                      "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 28}}
TORCHVISION_SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_b_16": 32, "vit_l_16": 32, "vit_h_14": 28}
TIMM = ["resnet50d", "seresnet50", "resnext50_32x4d", "tf_efficientnet_b0", "efficientnet_b0", "mobilenetv2_100",
        "mobilenetv3_large_100", "mobilenetv4_conv_small", "ghostnet_100", "repvgg_a0", "mobileone_s0",
        "convnext_atto", "regnety_002", "dla34", "dpn68", "hrnet_w18_small", "cspdarknet53", "densenet121", "resnet18",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s",
        "mobilevit_xxs", "efficientformer_l1", "fastvit_t8", "poolformer_s12", "resmlp_12_224", "mixer_b16_224",
        "edgenext_xx_small"]
TIMM_KWARGS = {"vit_tiny_patch16_224": {"img_size": 64}, "deit_tiny_patch16_224": {"img_size": 64},
               "swin_tiny_patch4_window7_224": {"img_size": 64}, "levit_128s": {"img_size": 64},
               "resmlp_12_224": {"img_size": 64}, "mixer_b16_224": {"img_size": 64}}
TIMM_SIZES = {"efficientformer_l1": 224}
COLUMNS = ("cut", "verify", "reload", "onnx", "pt2")
BUILDER = """import timm


def build():
    return timm.create_model({name!r}, **{kwargs!r})
"""
CALIB = 16
RATIO = 0.5


def spec(name: str) -> tuple[str, dict, int]:
    """The --arch, --arch-kwargs and input size of a model named ``torchvision_name`` or ``timm:name``."""
    if name.startswith("timm:"):
        model = name[5:]
        return "timm:create_model", {"model_name": model, **TIMM_KWARGS.get(model, {})}, TIMM_SIZES.get(model, 64)
    return f"torchvision.models:{name}", TORCHVISION_KWARGS.get(name, {}), TORCHVISION_SIZES.get(name, 64)


def make(name: str, path: str) -> None:
    """Build ``name`` with random weights (seed 0) and save its state_dict, as a user's training script would."""
    import torch

    from prunetool.load import build_arch

    arch, kwargs, _ = spec(name)
    torch.manual_seed(0)
    torch.save(build_arch(arch, kwargs).state_dict(), path)


# this checkout's prunetool, as if installed, in every process; files signed with a key of the run's own
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(args: list[str], cwd: Path, timeout: int) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "prunetool", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=ENV)
    except subprocess.TimeoutExpired:
        return -1, f"over {timeout} s on this machine", time.perf_counter() - start
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, last, time.perf_counter() - start


def one(name: str, work: Path, timeout: int) -> dict:
    arch, kwargs, size = spec(name)
    stem = re.sub(r"\W", "_", name)
    d = work / stem
    d.mkdir(parents=True, exist_ok=True)
    row: dict = {"name": name, "size": size, "reasons": {}, "commit": commit()}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.coverage", "--make", name, "--path",
                           str(d / "model.pt")], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    if proc.returncode != 0:
        row["reasons"]["cut"] = "cannot build: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        return row
    base = ["shrink", "model.pt", "--arch", arch, "--arch-kwargs", json.dumps(kwargs), "--input-shape",
            f"3,{size},{size}", "--ratio", str(RATIO), "--calib", str(CALIB), "--no-latency", "--no-progress", "-q"]
    full = base + ["--out", "x.pt", "--onnx", "x.onnx", "--pt2", "x.pt2", "--json", "x.json"]
    code, last, seconds = _cli(full, d, timeout)
    row["seconds"], row["exit"] = seconds, code
    have = {"onnx": code == 0, "pt2": code == 0}
    if code != 0:  # find out which step fails: the cut alone, then each export
        row["full_error"] = last
        code2, last2, _ = _cli(base + ["--out", "x.pt", "--json", "x.json"], d, timeout)
        if code2 != 0:
            column = "verify" if "verification failed" in last2 else "cut"
            row["reasons"][column] = last2[:240]
        else:
            for kind in ("onnx", "pt2"):
                c3, l3, _ = _cli(["export", "x.pt", f"--{kind}", f"x.{kind}", "--calib", "8"], d, timeout)
                have[kind] = c3 == 0
                if c3 != 0:
                    row["reasons"][kind] = l3[:240]
    if (d / "x.json").exists():
        report = json.loads((d / "x.json").read_text())
        before, after = report["before"]["params"], report["after"]["params"]
        row.update(params_before=before, params_after=after, groups=len(report["layers"]),
                   protected=len(report.get("protected", [])),
                   protected_reasons=_kinds([p["reason"] for p in report.get("protected", [])]))
        if "onnx" in report:
            row["onnx_exporter"] = report["onnx"]["exporter"]
        if after >= before:
            row["reasons"].setdefault("cut", "nothing was cut")
    elif "cut" not in row["reasons"] and "verify" not in row["reasons"]:
        row["reasons"]["cut"] = row.get("full_error", "no report")
    if (d / "x.pt").exists():
        elsewhere = Path(tempfile.mkdtemp(prefix="elsewhere-", dir=work))
        args = [str(d / "x.pt"), str(size)] + [str(d / f"x.{k}") if have[k] and (d / f"x.{k}").exists() else "-"
                                                for k in ("onnx", "pt2")]
        proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "coverage_reload.py"), *args],
                              cwd=elsewhere, capture_output=True, text=True, timeout=timeout, env=ENV)
        shutil.rmtree(elsewhere, ignore_errors=True)
        if proc.returncode == 0:
            row["reload_check"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row["reasons"]["reload"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:240]
    else:
        row["reasons"].setdefault("reload", "no model was written")
    for kind in ("onnx", "pt2"):
        if not have[kind]:
            row["reasons"].setdefault(kind, "not exported (an earlier step failed)")
    for col in COLUMNS:
        row[col] = col not in row["reasons"]
    row["ok"] = all(row[c] for c in COLUMNS) and code == 0
    if name.startswith("timm:"):
        builder(name, d, size, work, timeout, row)
    shutil.rmtree(d, ignore_errors=True)
    return row


def builder(name: str, d: Path, size: int, work: Path, timeout: int, row: dict) -> None:
    """The builder column: the user's module ``mymodels.py`` with a plain ``build()`` around timm, given as
    ``--arch mymodels:build`` (no kwargs), then a fresh process in another folder reloads with no flags."""
    _, kwargs, _ = spec(name)
    model_name = kwargs.pop("model_name")
    (d / "mymodels.py").write_text(BUILDER.format(name=model_name, kwargs=kwargs))
    code, last, seconds = _cli(["shrink", "model.pt", "--arch", "mymodels:build", "--input-shape", f"3,{size},{size}",
                                "--ratio", str(RATIO), "--calib", str(CALIB), "--out", "y.safetensors",
                                "--no-latency", "--no-progress", "-q"], d, timeout)
    row["builder_seconds"] = seconds
    if code != 0:
        row["builder_error"] = last[:240]
    else:
        elsewhere = Path(tempfile.mkdtemp(prefix="elsewhere-", dir=work))
        proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "coverage_reload.py"),
                               str(d / "y.safetensors"), str(size), "-", "-"], cwd=elsewhere, capture_output=True,
                              text=True, timeout=timeout, env=ENV)
        shutil.rmtree(elsewhere, ignore_errors=True)
        if proc.returncode != 0:
            row["builder_error"] = "reload: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:240]
    row["builder"] = "builder_error" not in row


def _kinds(reasons: list[str], most: int = 3) -> list[str]:
    """The distinct kinds of reason, module paths dropped ("layer_norm in … (LayerNorm) …" stays readable)."""
    kinds = []
    for reason in reasons:
        kind = re.sub(r"\b[\w-]+(\.[\w-]+)+\b", "…", reason)
        kind = re.sub(r" \(\d+(, \d+)*\)→\(\d+(, \d+)*\)", "", kind)
        if kind not in kinds:
            kinds.append(kind)
    return kinds[:most]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make")
    parser.add_argument("--path")
    parser.add_argument("--out", default=str(ROOT / "docs" / "COVERAGE.md"))
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    if args.make:
        make(args.make, args.path)
        return
    import torchvision

    names = args.only or (torchvision.models.list_models(module=torchvision.models) + [f"timm:{n}" for n in TIMM])
    results_path = ROOT / "benchmarks" / "results" / "coverage.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    previous = {r["name"]: r for r in json.loads(results_path.read_text()) if "reasons" in r} \
        if results_path.exists() and args.only \
        else {}
    work = Path(tempfile.mkdtemp(prefix="prunetool-coverage-"))
    ENV["PRUNETOOL_KEY"] = str(work / "key")  # the run's files are signed by a key of its own, as a user's are
    start = time.perf_counter()
    try:
        for name in names:
            row = one(name, work, args.timeout)
            previous[name] = row
            marks = " ".join(f"{c}{'✓' if row.get(c) else '✗'}" for c in COLUMNS)
            print(f"{name}: {marks} {row.get('seconds', 0):.0f}s {'; '.join(row['reasons'].values())[:200]}",
                  flush=True)
            results_path.write_text(json.dumps(list(previous.values()), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = list(previous.values())
    write_section(Path(args.out), "classifiers", markdown(rows, time.perf_counter() - start))


def markdown(rows: list[dict], seconds: float) -> str:
    import torchvision

    order = {n: i for i, n in enumerate(torchvision.models.list_models(module=torchvision.models)
                                        + [f"timm:{n}" for n in TIMM])}
    rows = sorted(rows, key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    commits = sorted({r.get("commit", "?") for r in rows})
    tv = [r for r in rows if not r["name"].startswith("timm:")]
    tm = [r for r in rows if r["name"].startswith("timm:")]

    def counts(group):
        return ", ".join(f"{c} {sum(bool(r.get(c)) for r in group)}/{len(group)}" for c in COLUMNS)

    lines = [
        "## torchvision classifiers and timm architectures",
        "",
        f"`python -m benchmarks.coverage --out docs/COVERAGE.md`, {today()}, on {machine()}; rows from commit"
        f"{'s' if len(commits) > 1 else ''} {', '.join(commits)} of main (each row's `commit` in "
        "benchmarks/results/coverage.json; `--only NAME ...` reruns some rows and keeps the others).",
        "",
        "Each model is built with random weights (seed 0) and saved as a state_dict; then, exactly as a user would: "
        f"`prunetool shrink model.pt --arch … --input-shape 3,S,S --ratio {RATIO} --calib {CALIB} --out x.pt --onnx "
        "x.onnx --pt2 x.pt2 --json x.json --no-latency` (default criterion and compensation, random calibration "
        "inputs), then a fresh process in another directory loads `x.pt` with `prunetool.load` and no flags and "
        "compares its outputs with onnxruntime on `x.onnx` and with `torch.export.load('x.pt2')`.",
        "",
        "- **cut**: the model lost parameters; **verify**: every check of the verify stage passed (forward, ratio 0 "
        "exact, removal = zeroing, constant unit, saved bytes reload identical); **reload**: the fresh process from "
        "another directory loaded it and its outputs match; **onnx**, **pt2**: export and parity "
        "(|Δ| ≤ max(1e-4 + 1e-4·max|y|, 4 × the model's float32 noise measured against float64), the CLI's "
        "default rule).",
        "- *kept*: parameters after ÷ before. *Protected because*: up to three kinds of reason (module paths shown "
        "as …; `--dry-run` names them).",
        "",
        f"**torchvision: {sum(r['ok'] for r in tv)} of {len(tv)} pass every column** ({counts(tv)}).",
        "",
        f"**timm: {sum(r['ok'] for r in tm)} of {len(tm)} pass every column** ({counts(tm)}).",
        "",
        f"**timm through a user's builder module: {sum(bool(r.get('builder')) for r in tm)} of "
        f"{sum('builder' in r for r in tm)}** (column *builder*: `--arch mymodels:build`, a plain "
        "`def build(): return timm.create_model(NAME, ...)` without annotation in the user's own file, then the same "
        "fresh-process reload from another folder with no flags; rows without a mark were not run this way).",
        "",
        "| model | S | cut | verify | reload | onnx | pt2 | builder | params before | kept | protected | "
        "protected because | exporter | s | why ✗ |",
        "|---|--:|:-:|:-:|:-:|:-:|:-:|:-:|--:|--:|--:|---|---|--:|---|",
    ]
    for r in rows:
        marks = " | ".join("✓" if r.get(c) else "✗" for c in COLUMNS)
        kept = f"{r['params_after'] / r['params_before']:.2f}" if "params_before" in r else ""
        before = f"{r['params_before']:,}" if "params_before" in r else ""
        why = "; ".join([f"{c}: {t}" for c, t in r["reasons"].items()]
                        + ([f"builder: {r['builder_error']}"] if r.get("builder_error") else [])).replace("|", "\\|")
        built = "" if "builder" not in r else "✓" if r["builder"] else "✗"
        reasons = "; ".join(r.get("protected_reasons", [])).replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['size']} | {marks} | {built} | {before} | {kept} | "
                     f"{r.get('protected', '')} | "
                     f"{reasons} | {r.get('onnx_exporter', '')} | {r.get('seconds', 0):.0f} | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
