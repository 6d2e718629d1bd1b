"""The command line: a thin Typer layer over :mod:`prunetool.commands`.

Each command turns its flags into the option dataclasses of :mod:`prunetool.options`, runs the command with a
staging area, stages its report files beside the model, commits them all together, prints and sets the exit
code: 0 done, 1 a budget missed or a verification failed, 2 bad input, 3 an internal error (a bug: ``--debug``
shows the traceback), 4 a speed-up gate could not be judged (the machine was too noisy), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from typer.exceptions import TyperException

from . import __version__, distributed, hf
from .commands import bench as bench_command
from .commands import compress as compress_command
from .commands import export as export_command
from .commands import inspect as inspect_command
from .commands import lowrank as lowrank_command
from .commands import shrink as shrink_command
from .commands import sparsify as sparsify_command
from .config import default_map, read as read_config
from .data import Preprocessing, parse_shape
from .errors import InternalError, UsageError, VerificationError
from .load import parse_arch_kwargs
from .options import (DEFAULT_ATOL, DEFAULT_COMPENSATION, DEFAULT_CRITERION, DEFAULT_RTOL, Budgets, CompressOptions,
                      DataOptions, LowrankOptions, Measurement, Outputs, Recovery, ShrinkOptions, Source,
                      SparsifyOptions)
from .report import (budget_failures, json_bytes, render, render_bench, render_inspect, render_plan, summary_line,
                     summary_markdown, too_noisy)
from .commands.common import preflight
from .staging import Staging, check_outputs

app = typer.Typer(
    help="Make a trained PyTorch model physically smaller and faster, then prove it.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

SHRINK_EXAMPLES = """
Examples:

\b
  prunetool shrink samples/evci_cnn.pt --arch samples.nets:EvciCNN --data samples/mnist_subset.npz --ratio 0.6
\b
  prunetool shrink model.pt --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}' --data cifar10:~/data
\b
  prunetool shrink model.pt --arch mypkg.nets:LeNet --input-shape 1,28,28 --criterion l1 --json report.json
\b
  prunetool shrink r18.pt --arch torchvision.models:resnet18 --input-shape 3,224,224 --dry-run
\b
  prunetool shrink r18.pt --arch torchvision.models:resnet18 --data imgs/ --scope global --target-macs 0.5 \\
      --out r18.small.safetensors --onnx r18.onnx --pt2 r18.pt2 --max-drop 1
"""

LOWRANK_EXAMPLES = """
Examples:

\b
  prunetool lowrank samples/conv2.pt --arch samples.nets:Conv2 --data samples/mnist_subset.npz
\b
  prunetool lowrank samples/conv2.pt --arch samples.nets:Conv2 --layers 'classifier.1' --rank 10
\b
  prunetool lowrank model.pt --arch mypkg.nets:Net --data d.npz --data-aware --max-drop 0.5
\b
  prunetool lowrank evci_cnn.shrunk.safetensors --energy 0.9
"""

# Options shared by every command that loads a model, measures it and writes one.
CKPT = typer.Argument(..., metavar="CKPT", help="Checkpoint: a state_dict (.pt/.pth/.safetensors, with --arch), "
                                                "prunetool output, or a pickled module.")
ARCH = typer.Option(None, "--arch", help="Architecture as MODULE:CALLABLE, e.g. torchvision.models:resnet18.")
ARCH_KWARGS = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow a Hugging Face directory's own model code (auto_map) to run.")
TOKENS = typer.Option(None, "--tokens", help="Token models without --data: random sequences of this many token ids (below the vocabulary size).")
SEQ_LEN = typer.Option(None, "--seq-len", help="Text --data: tokens per sequence (default 128).")
TOKENIZER = typer.Option(None, "--tokenizer", help="Text --data: the tokenizer directory (default: the model's Hugging Face directory).")
OUTPUT_KEY = typer.Option(None, "--output-key", help="Which entry of a structured output (ModelOutput, dict, tuple) holds the logits (default: 'logits', else the first tensor).")
UNSAFE = typer.Option(False, "--unsafe-pickle", help="Allow unpickling a whole nn.Module (runs code from the file).")
DATA = typer.Option(None, "--data", help="mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, an ImageFolder dir, an .npz (images, or input_ids for token models) or a text file (.txt, tokenised for a language model).")
DOWNLOAD = typer.Option(False, "--download", help="Download a torchvision dataset into ROOT if it is missing.")
SHAPE = typer.Option(None, "--input-shape", help="Input shape without batch, e.g. 1,28,28 (needed without --data, "
                                                 "unless the checkpoint records it).")
CALIB = typer.Option(1000, "--calib", help="Calibration samples from the train split (fixed seed).")
CALIB_MEMORY = typer.Option("1.5G", "--calib-memory", help="Memory for cached activations and batches of the calibration passes (e.g. 512M, 4G); beyond it, caches go to a temporary file (TMPDIR) on the CPU, or to host memory in float16 from a GPU.")
ROWS = typer.Option(None, "--calib-rows", help="Least-squares rows per input of a layer for compensation, drawn as output positions of each calibration sample (default 16 for images, 64 for token sequences).")
WORKERS = typer.Option(0, "--workers", help="Data-loading worker processes for image folders.")
PRESET = typer.Option(None, "--preset", help="Preprocessing of an image folder by name: imagenet (resize 256, crop 224, ImageNet mean and std).")
RESIZE = typer.Option(None, "--resize", help="Image folder: resize the shorter side to this many pixels.")
CROP = typer.Option(None, "--crop", help="Image folder: centre crop to this many pixels.")
MEAN = typer.Option(None, "--mean", help="Image folder: per-channel mean to subtract, e.g. 0.485,0.456,0.406.")
STD = typer.Option(None, "--std", help="Image folder: per-channel standard deviation to divide by, e.g. 0.229,0.224,0.225.")
EVAL = typer.Option(None, "--eval", help="Evaluate on this many test samples (default: all).")
JSON = typer.Option(None, "--json", help="Write the report as JSON here.")
DEVICE = typer.Option("cpu", "--device", help="Device for scoring, evaluation and latency: cpu or cuda.")
OFFLOAD = typer.Option(False, "--offload", help="With --device cuda: keep the weights in host memory and move each layer's to the GPU as it runs (a model larger than the GPU; slower).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars and no tables; print the summary line.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars and no colour, even on a terminal.")
ONNX = typer.Option(None, "--onnx", help="Also export the result to ONNX here, checked against onnxruntime.")
PT2 = typer.Option(None, "--pt2", help="Also export the result with torch.export here (.pt2), reloaded and checked.")
ONNX_ATOL = typer.Option(DEFAULT_ATOL, "--onnx-atol", help="Parity of --onnx/--pt2: absolute part of the tolerance.")
ONNX_RTOL = typer.Option(DEFAULT_RTOL, "--onnx-rtol", help="Parity of --onnx/--pt2: part relative to the largest "
                                                           "|output|; max |exported − PyTorch| ≤ max(atol + rtol·max|y|, 4 × the "
                                                           "model's float32 noise, measured against float64).")
MIN_SPEEDUP = typer.Option(None, "--min-speedup", help="Budget: measured latency speed-up at --speedup-batch must reach this.")
SPEEDUP_BATCH = typer.Option(1, "--speedup-batch", help="Batch size at which --min-speedup is measured.")
MAX_PARAMS = typer.Option(None, "--max-params", help="Budget: parameters after, as a count (> 1) or a fraction of the original (≤ 1).")
LATENCY_BATCHES = typer.Option("1,32", "--latency-batches", help="Batch sizes at which latency is measured before and after.")
NO_LATENCY = typer.Option(False, "--no-latency", help="Do not measure latency.")
FT_EPOCHS = typer.Option(0, "--finetune-epochs", help="Fine-tune this many epochs on the train split of --data after the cut.")
LR = typer.Option(1e-3, "--lr", help="Fine-tuning learning rate.")
BATCH = typer.Option(128, "--batch-size", help="Fine-tuning batch size.")
OPTIMIZER = typer.Option("adam", "--optimizer", help="Fine-tuning optimizer: sgd (momentum 0.9) or adam.")
DISTILL = typer.Option(False, "--distill", help="Fine-tune against the original model as teacher (KL on logits + CE).")
SUMMARY_MD = typer.Option(None, "--summary-md", help="Write a Markdown summary (for $GITHUB_STEP_SUMMARY) here.")


def _out_help(suffix: str) -> typer.Option:
    return typer.Option(None, "--out", help=f"Output checkpoint, .safetensors or .pt (default: <stem>.{suffix}"
                                            ".safetensors beside the input); for a Hugging Face model directory, a "
                                            f"directory (default: <dir>.{suffix}, or <dir>.{suffix}.safetensors when "
                                            "its config cannot hold the result).")


def _version(value: bool):
    if value:
        print(f"prunetool {__version__}")
        raise typer.Exit()


_ARGV: list[str] = []
_CONFIG: str | None = None


@app.callback()
def main_options(ctx: typer.Context,
                 version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit."),
                 config: Optional[str] = typer.Option(None, "--config", help="Options file (default: ./prunetool.toml, else [tool.prunetool] in ./pyproject.toml); flags override it."),
                 no_config: bool = typer.Option(False, "--no-config", help="Read no options file."),
                 debug: bool = typer.Option(False, "--debug", help="Show the traceback of an internal error.")):
    """Make a trained PyTorch model physically smaller and faster, then prove it."""
    global _CONFIG
    _CONFIG = None
    if no_config or any(a in ("--help", "-h") for a in _ARGV):  # help never depends on a config file
        return
    table, source = read_config(config)
    if table:
        ctx.default_map = default_map(table, ctx.command.commands, source)
        _CONFIG = source


def _config_source() -> str | None:
    """The options file applied to this run, if any (recorded in the report)."""
    return _CONFIG


def _config_input() -> dict[str, str]:
    """The options file as an input no output may overwrite."""
    return {"the options file (--config)": _CONFIG} if _CONFIG else {}


def _device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r} is not cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    distributed.init(device)
    if device == "cuda" and distributed.active():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code=False) -> Source:
    return Source(ckpt, arch, parse_arch_kwargs(arch_kwargs), unsafe_pickle, trust_remote_code)


def _bytes(text: str) -> int:
    units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise UsageError(f"--calib-memory {text!r} is not a size; write it like 512M or 4G") from None
    return int(value * units[unit])


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of numbers; write it like 0.485,0.456,0.406") from None


def _data(data, calib, eval_n, input_shape, download, memory="1.5G", rows=None, workers=0, preset=None,
          resize=None, crop=None, mean=None, std=None, tokens=None, seq_len=None, tokenizer=None,
          output_key=None) -> DataOptions:
    pre = Preprocessing(resize, crop, _floats("--mean", mean), _floats("--std", std), preset)
    opts = DataOptions(data, calib, eval_n, parse_shape(input_shape), download, _bytes(memory), rows, workers, pre,
                       tokens, seq_len, tokenizer, output_key)
    opts.check()
    return opts


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of integers; write it like 1,32") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} {text!r}: give positive integers, like 1,32")
    return values


def _measurement(device: str, latency_batches: str, no_latency: bool, speedup_batch: int | None = None,
                 offload: bool = False) -> Measurement:
    batches = () if no_latency else _ints("--latency-batches", latency_batches)
    if speedup_batch is not None and not no_latency and speedup_batch not in batches:
        batches = tuple(sorted({*batches, speedup_batch}))
    if offload and not device.startswith("cuda"):
        raise UsageError("--offload keeps the weights in host memory while a GPU computes: it needs --device cuda "
                         "(on the CPU the weights are in host memory already)")
    return Measurement(True, batches, device, speedup_batch, offload)


def _outputs(ckpt: str, out, onnx, pt2, json_path, summary_md, suffix: str, atol: float, rtol: float) -> Outputs:
    if Path(ckpt).is_dir():
        if not hf.is_dir(ckpt):
            raise UsageError(f"{ckpt} is a directory without config.json; pass a checkpoint file (.pt, .pth or "
                             ".safetensors) or a Hugging Face model directory")
        if out is None:  # a directory like the input (its fallback file: check_job_outputs)
            base = Path(ckpt).resolve()
            out = str(base.with_name(f"{base.name}.{suffix}"))
    elif not Path(ckpt).exists():
        raise UsageError(f"{ckpt}: no such file or directory; check the checkpoint path")
    out = out or str(Path(ckpt).with_name(f"{Path(ckpt).stem}.{suffix}.safetensors"))
    outputs = Outputs(out, onnx, pt2, json_path, summary_md, atol, rtol, inputs=_config_input())
    outputs.check()
    return outputs


def _console(no_progress: bool) -> Console:
    width = None if sys.stdout.isatty() else 160  # logs: wide enough for the tables, never wrapped at 80
    return Console(no_color=True, highlight=False, width=width) if no_progress else Console(width=width)


def _check_budgets(budgets: Budgets, data, measurement: Measurement) -> None:
    budgets.check()
    if budgets.max_drop is not None and data is None:
        raise UsageError("--max-drop needs the metric (accuracy or perplexity) before and after: pass --data")
    if budgets.min_speedup is not None and not measurement.latency_batches:
        raise UsageError("--min-speedup needs latency: drop --no-latency")


NOISY = 4  # exit code: a speed-up gate could not be judged on this machine


def _conclude(report: dict, staging: Staging, outputs: Outputs, budgets: Budgets, quiet: bool,
              console: Console) -> None:
    """Stage the report files, commit every output together, print; exit 1 on a missed budget, 4 when the
    machine was too noisy to judge a speed-up gate."""
    failures = budget_failures(report, budgets)
    noisy = too_noisy(report, budgets)
    report["budgets"] = {"failures": failures, "too_noisy": noisy,
                         **{k: v for k, v in vars(budgets).items() if v is not None}}
    report["config"] = _config_source()
    if not distributed.is_main():  # under torchrun only the first process writes and prints
        staging.discard()
        if failures or noisy:
            raise typer.Exit(1 if failures else NOISY)
        return
    if outputs.json:
        staging.write(outputs.json, json_bytes(report))
    if outputs.summary_md:
        staging.write(outputs.summary_md, summary_markdown(report, failures).encode())
    staging.commit()
    model_path = report.get("settings", {}).get("out") or outputs.out  # the fallback file, when one was written
    written = [p for p in (model_path, outputs.onnx, outputs.pt2) if p]
    line = summary_line(report) + (f"; wrote {', '.join(written)}" if written else "")
    if quiet:
        print(line)
    else:
        render(report, console)
        console.print(line, highlight=False, soft_wrap=True)
    for f in failures:
        print(f"prunetool: budget missed: {f}", file=sys.stderr)
    if noisy:
        print(f"prunetool: not judged: {noisy}", file=sys.stderr)
    if failures or noisy:
        raise typer.Exit(1 if failures else NOISY)


def _ratios(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise UsageError(f"--schedule {text!r} is not a list of ratios; write it like 0.1,0.2,0.4,0.6") from None


@app.command("shrink", epilog=SHRINK_EXAMPLES)
def shrink_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, trust_remote_code: bool = TRUST, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB, calib_memory: str = CALIB_MEMORY,
    calib_rows: Optional[int] = ROWS, workers: int = WORKERS, preset: Optional[str] = PRESET,
    resize: Optional[int] = RESIZE, crop: Optional[int] = CROP, mean: Optional[str] = MEAN, std: Optional[str] = STD,
    eval_n: Optional[int] = EVAL, tokens: Optional[int] = TOKENS,
    seq_len: Optional[int] = SEQ_LEN, tokenizer: Optional[str] = TOKENIZER, output_key: Optional[str] = OUTPUT_KEY,
    criterion: str = typer.Option(DEFAULT_CRITERION, help="Unit score: mrs, mrp, taylor, l1, l2, fp or random."),
    ratio: float = typer.Option(0.5, help="Fraction of units removed: from every prunable layer (--scope layer) or of all units (--scope global), in [0, 1)."),
    scope: str = typer.Option("layer", help="layer: the same ratio in every layer; global: units ranked across layers (scores normalised per layer)."),
    max_layer_ratio: float = typer.Option(0.9, help="With --scope global, no layer loses more than this fraction."),
    target_params: Optional[float] = typer.Option(None, help="Pick the ratio that keeps at most this fraction of the parameters, e.g. 0.5."),
    target_macs: Optional[float] = typer.Option(None, help="Pick the ratio that keeps at most this fraction of the MACs."),
    round_to: int = typer.Option(1, help="Keep unit counts at multiples of N (hardware-friendly widths)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Cumulative ratios pruned step by step, re-scoring each time, e.g. 0.1,0.2,0.4,0.6 (fine-tuning between steps)."),
    recalibrate_bn: Optional[bool] = typer.Option(None, "--recalibrate-bn/--no-recalibrate-bn", help="Re-estimate BatchNorm statistics on the calibration data after every cut (default: when the model has BatchNorm)."),
    finetune_epochs: int = FT_EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIMIZER,
    distill: bool = DISTILL,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the groups found, what is protected and why, and the size each ratio would give; write nothing but --json."),
    compensate: str = typer.Option(DEFAULT_COMPENSATION, help="What replaces removed units: lstsq, mean or none."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Budget: accuracy drop in percentage points (needs --data)."),
    min_speedup: Optional[float] = MIN_SPEEDUP, speedup_batch: int = SPEEDUP_BATCH,
    max_params: Optional[float] = MAX_PARAMS, latency_batches: str = LATENCY_BATCHES, no_latency: bool = NO_LATENCY,
    onnx: Optional[str] = ONNX, pt2: Optional[str] = PT2, onnx_atol: float = ONNX_ATOL,
    onnx_rtol: float = ONNX_RTOL, out: Optional[str] = _out_help("shrunk"), json_path: Optional[str] = JSON,
    summary_md: Optional[str] = SUMMARY_MD, device: str = DEVICE, offload: bool = OFFLOAD, quiet: bool = QUIET,
    no_progress: bool = NO_PROGRESS,
):
    """Remove units (neurons, channels) ranked by a criterion, compensate them, verify and report."""
    opts = ShrinkOptions(criterion, ratio, compensate, scope, max_layer_ratio, target_params, target_macs, round_to,
                         _ratios(schedule))
    opts.check()
    source = _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code)
    data_opts = _data(data, calib, eval_n, input_shape, download, calib_memory, calib_rows, workers, preset,
                      resize, crop, mean, std, tokens, seq_len, tokenizer, output_key)
    console = _console(no_progress)
    if dry_run:
        if json_path:
            preflight({"--json": json_path}, source, data_opts, inputs=_config_input())
        report = shrink_command.plan(ckpt, data, criterion=criterion, scope=scope, max_layer_ratio=max_layer_ratio,
                                     round_to=round_to, calib=min(calib, 256), input_shape=data_opts.input_shape,
                                     arch=arch, arch_kwargs=source.arch_kwargs, unsafe_pickle=unsafe_pickle,
                                     download=download, tokens=tokens, seq_len=seq_len, tokenizer=tokenizer,
                                     output_key=output_key, trust_remote_code=trust_remote_code)
        if json_path:
            with Staging() as staging:
                staging.write(json_path, json_bytes(report))
                staging.commit()
        render_plan(report, console)
        return
    measurement = _measurement(_device(device), latency_batches, no_latency,
                               speedup_batch if min_speedup is not None else None, offload)
    budgets = Budgets(max_drop, min_speedup, speedup_batch, max_params)
    _check_budgets(budgets, data, measurement)
    outputs = _outputs(ckpt, out, onnx, pt2, json_path, summary_md, "shrunk", onnx_atol, onnx_rtol)
    recovery = Recovery(finetune_epochs, lr, batch_size, optimizer, distill, recalibrate_bn)
    with Staging() as staging:
        _, report = shrink_command.run(source, data_opts, opts, recovery, measurement, outputs, staging,
                                       progress=console.is_terminal and not (quiet or no_progress))
        _conclude(report, staging, outputs, budgets, quiet, console)


@app.command("lowrank", epilog=LOWRANK_EXAMPLES)
def lowrank_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, trust_remote_code: bool = TRUST, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB, calib_memory: str = CALIB_MEMORY,
    calib_rows: Optional[int] = ROWS, workers: int = WORKERS, preset: Optional[str] = PRESET,
    resize: Optional[int] = RESIZE, crop: Optional[int] = CROP, mean: Optional[str] = MEAN, std: Optional[str] = STD,
    eval_n: Optional[int] = EVAL, tokens: Optional[int] = TOKENS,
    seq_len: Optional[int] = SEQ_LEN, tokenizer: Optional[str] = TOKENIZER, output_key: Optional[str] = OUTPUT_KEY,
    rank: Optional[int] = typer.Option(None, help="Factor every chosen layer at this rank."),
    energy: Optional[float] = typer.Option(None, help="Smallest rank keeping this fraction of Σσ², e.g. 0.9."),
    elbow: bool = typer.Option(False, "--elbow", help="Heitmann's plain elbow of each layer's residual curve, uncapped (the default caps it, see --max-layer-error)."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Ranks chosen across layers together to keep at most this fraction of the parameters, e.g. 0.5."),
    target_macs: Optional[float] = typer.Option(None, "--target-macs", help="Ranks chosen across layers together to keep at most this fraction of the MACs."),
    max_layer_error: float = typer.Option(0.02, "--max-layer-error", help="Default rule: the elbow, raised until a layer loses at most this share of its output energy (measured on the calibration data)."),
    search: str = typer.Option("allocate", "--search", help="How a budget chooses ranks: allocate (one sensitivity pass, few evaluations) or greedy (AIMET's per-layer candidates, for comparison)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated globs of layer names (default: every Linear and Conv2d but the output heads, which are factored only when named exactly)."),
    data_aware: Optional[bool] = typer.Option(None, "--data-aware/--no-data-aware", help="Factor W·C^½ (C: calibration input covariance) instead of W (default: with --data)."),
    finetune_epochs: int = FT_EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIMIZER,
    distill: bool = DISTILL,
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Search the lowest ranks keeping the calibration accuracy within this many points, and hold the test accuracy drop to it as a budget (needs --data)."),
    min_speedup: Optional[float] = MIN_SPEEDUP, speedup_batch: int = SPEEDUP_BATCH,
    max_params: Optional[float] = MAX_PARAMS, latency_batches: str = LATENCY_BATCHES, no_latency: bool = NO_LATENCY,
    onnx: Optional[str] = ONNX, pt2: Optional[str] = PT2, onnx_atol: float = ONNX_ATOL,
    onnx_rtol: float = ONNX_RTOL, out: Optional[str] = _out_help("lowrank"), json_path: Optional[str] = JSON,
    summary_md: Optional[str] = SUMMARY_MD, device: str = DEVICE, quiet: bool = QUIET, no_progress: bool = NO_PROGRESS,
):
    """Factor layers into rank-k products (Linear → 2 Linears, Conv → conv + 1×1 conv), verify and report."""
    opts = LowrankOptions(rank, energy, layers, data_aware, max_drop, elbow, target_params, target_macs,
                          max_layer_error, search)
    opts.check()
    source = _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code)
    data_opts = _data(data, calib, eval_n, input_shape, download, calib_memory, calib_rows, workers, preset,
                      resize, crop, mean, std, tokens, seq_len, tokenizer, output_key)
    measurement = _measurement(_device(device), latency_batches, no_latency,
                               speedup_batch if min_speedup is not None else None)
    budgets = Budgets(max_drop, min_speedup, speedup_batch, max_params)
    _check_budgets(budgets, data, measurement)
    outputs = _outputs(ckpt, out, onnx, pt2, json_path, summary_md, "lowrank", onnx_atol, onnx_rtol)
    console = _console(no_progress)
    with Staging() as staging:
        _, report = lowrank_command.run(source, data_opts, opts, Recovery(finetune_epochs, lr, batch_size, optimizer,
                                                                          distill),
                                        measurement, outputs, staging,
                                        progress=console.is_terminal and not (quiet or no_progress))
        _conclude(report, staging, outputs, budgets, quiet, console)


@app.command("compress", epilog="""
Examples:

\b
  prunetool compress samples/conv2.pt --arch samples.nets:Conv2 --data samples/mnist_subset.npz --target-macs 0.5 --max-drop 1
\b
  prunetool compress model.pt --arch mypkg.nets:Net --data d.npz --target-params 0.25 --plans shrink,shrink+lowrank
""")
def compress_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, trust_remote_code: bool = TRUST, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB, calib_memory: str = CALIB_MEMORY,
    calib_rows: Optional[int] = ROWS, workers: int = WORKERS, preset: Optional[str] = PRESET,
    resize: Optional[int] = RESIZE, crop: Optional[int] = CROP, mean: Optional[str] = MEAN, std: Optional[str] = STD,
    eval_n: Optional[int] = EVAL, tokens: Optional[int] = TOKENS,
    seq_len: Optional[int] = SEQ_LEN, tokenizer: Optional[str] = TOKENIZER, output_key: Optional[str] = OUTPUT_KEY,
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Keep at most this fraction of the parameters, e.g. 0.5."),
    target_macs: Optional[float] = typer.Option(None, "--target-macs", help="Keep at most this fraction of the MACs, e.g. 0.5."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Choose among the plans within this calibration accuracy drop, and hold the test drop to it as a budget."),
    plans: str = typer.Option("shrink,lowrank,shrink+lowrank,lowrank+shrink", "--plans", help="The plans tried (each reaches the target; two steps split it evenly)."),
    min_speedup: Optional[float] = MIN_SPEEDUP, speedup_batch: int = SPEEDUP_BATCH,
    max_params: Optional[float] = MAX_PARAMS, latency_batches: str = LATENCY_BATCHES, no_latency: bool = NO_LATENCY,
    onnx: Optional[str] = ONNX, pt2: Optional[str] = PT2, onnx_atol: float = ONNX_ATOL,
    onnx_rtol: float = ONNX_RTOL, out: Optional[str] = _out_help("compressed"), json_path: Optional[str] = JSON,
    summary_md: Optional[str] = SUMMARY_MD, device: str = DEVICE, quiet: bool = QUIET, no_progress: bool = NO_PROGRESS,
):
    """shrink and lowrank under one budget: every plan (shrink, lowrank, both in either order) reaches the target,
    the best calibration accuracy within --max-drop is kept, the report shows every plan and each step."""
    opts = CompressOptions(target_params, target_macs, max_drop, tuple(p.strip() for p in plans.split(",") if p.strip()))
    opts.check()
    if data is None:
        raise UsageError("compress chooses between plans by their accuracy: it needs --data")
    source = _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code)
    data_opts = _data(data, calib, eval_n, input_shape, download, calib_memory, calib_rows, workers, preset,
                      resize, crop, mean, std, tokens, seq_len, tokenizer, output_key)
    measurement = _measurement(_device(device), latency_batches, no_latency,
                               speedup_batch if min_speedup is not None else None)
    budgets = Budgets(max_drop, min_speedup, speedup_batch, max_params)
    _check_budgets(budgets, data, measurement)
    outputs = _outputs(ckpt, out, onnx, pt2, json_path, summary_md, "compressed", onnx_atol, onnx_rtol)
    console = _console(no_progress)
    with Staging() as staging:
        _, report = compress_command.run(source, data_opts, opts, measurement, outputs, staging,
                                         progress=console.is_terminal and not (quiet or no_progress))
        _conclude(report, staging, outputs, budgets, quiet, console)


@app.command("sparsify", epilog="""
Examples:

\b
  prunetool sparsify samples/evci_cnn.pt --arch samples.nets:EvciCNN --data mnist:~/data --imp 0.3 --rounds 5
\b
  prunetool sparsify model.pt --arch mypkg.nets:Net --data d.npz --rounds 3 --finetune-epochs 2 --rewind
""")
def sparsify_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, trust_remote_code: bool = TRUST, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    calib: int = CALIB, eval_n: Optional[int] = EVAL,
    seq_len: Optional[int] = SEQ_LEN, tokenizer: Optional[str] = TOKENIZER, output_key: Optional[str] = OUTPUT_KEY,
    calib_memory: str = CALIB_MEMORY,
    calib_rows: Optional[int] = ROWS, workers: int = WORKERS, preset: Optional[str] = PRESET,
    resize: Optional[int] = RESIZE, crop: Optional[int] = CROP, mean: Optional[str] = MEAN, std: Optional[str] = STD,
    imp: float = typer.Option(0.3, "--imp", help="Fraction of each layer's remaining weights pruned per round."),
    rounds: int = typer.Option(3, "--rounds", help="Pruning rounds."),
    finetune_epochs: int = typer.Option(1, "--finetune-epochs", help="Retraining epochs after each round."),
    lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIMIZER,
    rewind: bool = typer.Option(False, "--rewind", help="Rewind surviving weights to those after the first round's retraining."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Budget: accuracy drop in percentage points."),
    max_params: Optional[float] = MAX_PARAMS, latency_batches: str = LATENCY_BATCHES, no_latency: bool = NO_LATENCY,
    onnx: Optional[str] = ONNX, pt2: Optional[str] = PT2, onnx_atol: float = ONNX_ATOL, onnx_rtol: float = ONNX_RTOL,
    out: Optional[str] = _out_help("sparse"), json_path: Optional[str] = JSON, summary_md: Optional[str] = SUMMARY_MD,
    device: str = DEVICE, quiet: bool = QUIET, no_progress: bool = NO_PROGRESS,
):
    """Iterative magnitude pruning of single weights with retraining, then physical removal of the units left
    without incoming or outgoing weights."""
    opts = SparsifyOptions(imp, rounds, finetune_epochs, rewind)
    opts.check()
    if data is None:
        raise UsageError("sparsify retrains between rounds: it needs --data with a train split")
    source = _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code)
    data_opts = _data(data, calib, eval_n, None, download, calib_memory, calib_rows, workers, preset, resize,
                      crop, mean, std, None, seq_len, tokenizer, output_key)
    measurement = _measurement(_device(device), latency_batches, no_latency)
    budgets = Budgets(max_drop, None, 1, max_params)
    _check_budgets(budgets, data, measurement)
    outputs = _outputs(ckpt, out, onnx, pt2, json_path, summary_md, "sparse", onnx_atol, onnx_rtol)
    console = _console(no_progress)
    with Staging() as staging:
        _, report = sparsify_command.run(source, data_opts, opts, Recovery(0, lr, batch_size, optimizer), measurement,
                                         outputs, staging, progress=console.is_terminal and not (quiet or no_progress))
        _conclude(report, staging, outputs, budgets, quiet, console)


@app.command("export", epilog="""
Examples:

\b
  prunetool export evci_cnn.shrunk.safetensors --onnx evci.onnx --pt2 evci.pt2
\b
  prunetool export model.pt --arch torchvision.models:resnet18 --input-shape 3,224,224 --onnx r18.onnx
""")
def export_cmd(
    ckpt: str = CKPT, onnx: Optional[str] = typer.Option(None, "--onnx", help="Where to write the .onnx file."),
    pt2: Optional[str] = typer.Option(None, "--pt2", help="Where to write the torch.export program (.pt2)."),
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, unsafe_pickle: bool = UNSAFE,
    trust_remote_code: bool = TRUST,
    data: Optional[str] = DATA, input_shape: Optional[str] = SHAPE, tokens: Optional[int] = TOKENS,
    seq_len: Optional[int] = SEQ_LEN, tokenizer: Optional[str] = TOKENIZER, output_key: Optional[str] = OUTPUT_KEY,
    calib: int = typer.Option(64, "--calib", help="Inputs compared between PyTorch and the exported program."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."), onnx_atol: float = ONNX_ATOL,
    onnx_rtol: float = ONNX_RTOL, json_path: Optional[str] = JSON,
):
    """Export a checkpoint prunetool loads to ONNX (dynamic batch; onnx.checker, then onnxruntime against PyTorch)
    and/or to a torch.export program (reloaded and compared)."""
    source, data_opts = _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code), _data(
        data, calib, None, input_shape, False, tokens=tokens, seq_len=seq_len, tokenizer=tokenizer,
        output_key=output_key)
    with Staging() as staging:
        report = export_command.run(source, data_opts, staging, onnx, pt2, opset, onnx_atol, onnx_rtol,
                                    reports={"--json": json_path} if json_path else None, inputs=_config_input())
        report["config"] = _config_source()
        if json_path:
            staging.write(json_path, json_bytes(report))
        staging.commit()
    for kind in ("onnx", "pt2"):
        if kind in report:
            info = report[kind]
            extra = f" ({info['exporter']} exporter, opset {info['opset']})" if kind == "onnx" else ""
            print(f"export: {info['path']}{extra}, max |exported − PyTorch| = {info['max_abs_diff']:.2g} on "
                  f"{report['inputs_compared']} inputs (tolerance {info['tolerance']:.2g})")


@app.command("bench", epilog="""
Examples:

\b
  prunetool bench model.pt model.shrunk.safetensors --arch mypkg.nets:Net --input-shape 1,28,28
\b
  prunetool bench a.pt b.pt --batch-sizes 1,8,64 --threads 4 --no-onnx --json bench.json
""")
def bench_cmd(
    ckpts: list[str] = typer.Argument(..., metavar="CKPT...", help="Checkpoints to compare; ratios are to the first."),
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, unsafe_pickle: bool = UNSAFE,
    trust_remote_code: bool = TRUST,
    input_shape: Optional[str] = SHAPE, tokens: Optional[int] = TOKENS, output_key: Optional[str] = typer.Option(
        None, "--output-key", help="Which entry of a structured output the ONNX export keeps (default: 'logits', else the first tensor); unused with --no-onnx."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for PyTorch and onnxruntime."),
    device: str = DEVICE, onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also time onnxruntime (CPU)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs first."),
    runs: int = typer.Option(50, "--runs", help=(
        "Timed runs of each checkpoint at most, in up to 7 alternating rounds (about 1 s per checkpoint); a "
        "speed-up is the median of paired rounds, marked noisy when they disagree by over ±20%.")),
    json_path: Optional[str] = JSON, no_progress: bool = NO_PROGRESS,
):
    """Latency (median, p10, p90), throughput and peak memory of checkpoints side by side, PyTorch eager and
    onnxruntime."""
    sizes = _ints("--batch-sizes", batch_sizes)
    if json_path:
        check_outputs({"--json": json_path}, {**{f"the input CKPT {i + 1}": c for i, c in enumerate(ckpts)},
                                              **_config_input()})
    console = _console(no_progress)
    report = bench_command.bench(ckpts, parse_shape(input_shape), sizes, threads, _device(device), onnx, warmup, runs,
                                 arch, parse_arch_kwargs(arch_kwargs), unsafe_pickle,
                                 progress=console.is_terminal and not no_progress, tokens=tokens,
                                 trust_remote_code=trust_remote_code, output_key=output_key)
    report["config"] = _config_source()
    if json_path:
        with Staging() as staging:
            staging.write(json_path, json_bytes(report))
            staging.commit()
    render_bench(report, console)


@app.command("inspect", epilog="""
Examples:

\b
  prunetool inspect samples/lenet_300_100.pt --arch samples.nets:LeNet300100 --data samples/mnist_subset.npz --html lenet.html
\b
  prunetool inspect model.pt --arch mypkg.nets:Net --input-shape 3,32,32 --plots plots/ --json inspect.json
""")
def inspect_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, trust_remote_code: bool = TRUST, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB, calib_memory: str = CALIB_MEMORY,
    calib_rows: Optional[int] = ROWS, workers: int = WORKERS, preset: Optional[str] = PRESET,
    resize: Optional[int] = RESIZE, crop: Optional[int] = CROP, mean: Optional[str] = MEAN, std: Optional[str] = STD,
    tokens: Optional[int] = TOKENS, seq_len: Optional[int] = SEQ_LEN, tokenizer: Optional[str] = TOKENIZER,
    output_key: Optional[str] = OUTPUT_KEY,
    html: Optional[str] = typer.Option(None, "--html", help="Write one self-contained HTML page with every picture."),
    plots: Optional[str] = typer.Option(None, "--plots", help="Write the pictures as PNG files into this folder."),
    json_path: Optional[str] = JSON, no_progress: bool = NO_PROGRESS,
):
    """Where is this model redundant? Dead and frozen units, MRS, spectra against Marchenko–Pastur, elbow ranks."""
    source = _source(ckpt, arch, arch_kwargs, unsafe_pickle, trust_remote_code)
    data_opts = _data(data, calib, None, input_shape, download, calib_memory, calib_rows, workers, preset,
                      resize, crop, mean, std, tokens, seq_len, tokenizer, output_key)
    console = _console(no_progress)
    with Staging() as staging:
        report = inspect_command.run(source, data_opts, staging, html, plots,
                                     progress=console.is_terminal and not no_progress,
                                     reports={"--json": json_path} if json_path else None, inputs=_config_input())
        report["config"] = _config_source()
        if json_path:
            staging.write(json_path, json_bytes(report))
        staging.commit()
    render_inspect(report, console)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"prunetool: warning: {message}", file=sys.stderr)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # a CI runner cancelling the job: clean up staged files as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    global _ARGV
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    _ARGV = argv
    warnings.showwarning = _show_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        # Without standalone mode, click hands back typer.Exit's code as the return value.
        code = app(args=argv, standalone_mode=False, prog_name="prunetool")
    except UsageError as e:
        print(f"prunetool: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"prunetool: verification failed: {e}; nothing was written", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("prunetool: interrupted; nothing was written", file=sys.stderr)
        return 130
    except TyperException as e:  # Typer's own usage errors (bad option value, missing argument)
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message())
            return 0
        code = getattr(e, "exit_code", 2)
        ctx = getattr(e, "ctx", None)
        where = f"prunetool {ctx.info_name}" if ctx is not None and ctx.info_name != "prunetool" else "prunetool"
        hint = f"; see {where} --help" if code == 2 else ""
        print(f"prunetool: error: {e.format_message()}{hint}", file=sys.stderr)
        return code
    except Exception as e:  # a bug in prunetool or in the model's code: one line, a code of its own
        if debug:
            traceback.print_exc()
        text = str(e).splitlines()[0][:200] if str(e) else ""
        print(f"prunetool: internal error: {type(e).__name__}: {text} (run again with --debug for the traceback; "
              "nothing was written)", file=sys.stderr)
        return InternalError.exit_code
    if code == 130:  # Typer turns an interrupt into this code by itself
        print("prunetool: interrupted; nothing was written", file=sys.stderr)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
