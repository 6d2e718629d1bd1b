"""The command line: a thin Typer layer over the Python API."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from typer.exceptions import TyperException

from . import __version__, distributed
from .api import DEFAULT_COMPENSATION, DEFAULT_CRITERION, check_settings, plan, shrink
from .data import parse_shape
from .errors import UsageError, VerificationError
from .load import check_writable, parse_arch_kwargs, write_atomic
from .lowrank import lowrank
from .bench import bench
from .config import default_map, read as read_config
from .export import DEFAULT_ATOL, export_onnx
from .report import budget_failures, render, render_bench, render_inspect, render_plan, summary_line, summary_markdown, write_json

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
  prunetool shrink r18.pt --arch torchvision.models:resnet18 --data imgs/ --scope global --target-macs 0.5
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
  prunetool lowrank evci_cnn.shrunk.pt --energy 0.9 --input-shape 1,28,28
"""

# Options shared by every command that loads a model, measures it and writes one.
CKPT = typer.Argument(..., metavar="CKPT", help="Checkpoint: a state_dict (with --arch), prunetool output, or a pickled module.")
ARCH = typer.Option(None, "--arch", help="Architecture as MODULE:CALLABLE, e.g. torchvision.models:resnet18.")
ARCH_KWARGS = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")
UNSAFE = typer.Option(False, "--unsafe-pickle", help="Allow unpickling a whole nn.Module (runs code from the file).")
DATA = typer.Option(None, "--data", help="mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, an ImageFolder dir or an .npz.")
DOWNLOAD = typer.Option(False, "--download", help="Download a torchvision dataset into ROOT if it is missing.")
SHAPE = typer.Option(None, "--input-shape", help="Input shape without batch, e.g. 1,28,28 (needed without --data).")
CALIB = typer.Option(1000, "--calib", help="Calibration samples from the train split (fixed seed).")
EVAL = typer.Option(None, "--eval", help="Evaluate on this many test samples (default: all).")
OUT = typer.Option(None, "--out", help="Output checkpoint (default: <stem>.<command>.pt beside the input).")
JSON = typer.Option(None, "--json", help="Write the report as JSON here.")
DEVICE = typer.Option("cpu", "--device", help="Device for scoring, evaluation and latency: cpu or cuda.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars and no tables; print the summary line.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars and no colour, even on a terminal.")
ONNX = typer.Option(None, "--onnx", help="Also export the result to ONNX here and check it against onnxruntime.")
ONNX_ATOL = typer.Option(DEFAULT_ATOL, "--onnx-atol", help="Largest |onnxruntime − PyTorch| accepted; above it the command exits 1.")
MIN_SPEEDUP = typer.Option(None, "--min-speedup", help="Budget: measured latency speed-up at --speedup-batch must reach this.")
SPEEDUP_BATCH = typer.Option(1, "--speedup-batch", help="Batch size at which --min-speedup is measured.")
MAX_PARAMS = typer.Option(None, "--max-params", help="Budget: parameters after, as a count (> 1) or a fraction of the original (≤ 1).")
FT_EPOCHS = typer.Option(0, "--finetune-epochs", help="Fine-tune this many epochs on the train split of --data after the cut.")
LR = typer.Option(1e-3, "--lr", help="Fine-tuning learning rate.")
BATCH = typer.Option(128, "--batch-size", help="Fine-tuning batch size.")
OPTIMIZER = typer.Option("adam", "--optimizer", help="Fine-tuning optimizer: sgd (momentum 0.9) or adam.")
DISTILL = typer.Option(False, "--distill", help="Fine-tune against the original model as teacher (KL on logits + CE).")
SUMMARY_MD = typer.Option(None, "--summary-md", help="Write a Markdown summary (for $GITHUB_STEP_SUMMARY) here.")


def _version(value: bool):
    if value:
        print(f"prunetool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(ctx: typer.Context,
                 version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit."),
                 config: Optional[str] = typer.Option(None, "--config", help="Options file (default: ./prunetool.toml, else [tool.prunetool] in ./pyproject.toml); flags override it.")):
    """Make a trained PyTorch model physically smaller and faster, then prove it."""
    table, source = read_config(config)
    if table:
        ctx.default_map = default_map(table, ctx.command.commands, source)


def _common(ckpt, arch, arch_kwargs, unsafe_pickle, download, input_shape, calib, device) -> dict:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    distributed.init(device)
    if device == "cuda" and distributed.active():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if calib < 1:
        raise UsageError("--calib must be at least 1")
    return dict(input_shape=parse_shape(input_shape), arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                unsafe_pickle=unsafe_pickle, download=download, calib=calib, device=device)


def _output(ckpt: str, out: str | None, json_path: str | None, suffix: str, *others: str | None) -> str:
    out = out or str(Path(ckpt).with_name(f"{Path(ckpt).stem}.{suffix}.pt"))
    for path in (out, json_path, *others):
        if path:
            check_writable(path, ckpt)
    return out


def _console(no_progress: bool) -> Console:
    width = None if sys.stdout.isatty() else 160  # logs: wide enough for the tables, never wrapped at 80
    return Console(no_color=True, highlight=False, width=width) if no_progress else Console(width=width)


def _finish(report: dict, json_path: str | None, quiet: bool, console: Console, summary_md: str | None,
            budgets: dict) -> None:
    failures = budget_failures(report, **budgets)
    if not distributed.is_main():  # under torchrun only the first process writes and prints
        if failures:
            raise typer.Exit(1)
        return
    report["budgets"] = {"failures": failures, **{k: v for k, v in budgets.items() if v is not None}}
    if json_path:
        write_json(report, json_path)
    if summary_md:
        write_atomic(summary_md, summary_markdown(report, failures).encode())
    if quiet:
        print(summary_line(report))
    else:
        render(report, console)
        console.print(summary_line(report), highlight=False, soft_wrap=True)
    if failures:
        for line in failures:
            print(f"prunetool: budget missed: {line}", file=sys.stderr)
        raise typer.Exit(1)


def _ratios(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise UsageError(f"--schedule {text!r} is not a list of ratios; write it like 0.1,0.2,0.4,0.6") from None


def _latency_batches(speedup_batch: int) -> tuple[int, ...]:
    return tuple(sorted({1, 32, speedup_batch}))


@app.command("shrink", epilog=SHRINK_EXAMPLES)
def shrink_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB, eval_n: Optional[int] = EVAL,
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
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the groups found, what is protected and why, and the size each ratio would give; write nothing."),
    compensate: str = typer.Option(DEFAULT_COMPENSATION, help="What replaces removed units: lstsq, mean or none."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Budget: accuracy drop in percentage points (needs --data)."),
    min_speedup: Optional[float] = MIN_SPEEDUP, speedup_batch: int = SPEEDUP_BATCH,
    max_params: Optional[float] = MAX_PARAMS, onnx: Optional[str] = ONNX, onnx_atol: float = ONNX_ATOL,
    out: Optional[str] = OUT, json_path: Optional[str] = JSON, summary_md: Optional[str] = SUMMARY_MD,
    device: str = DEVICE, quiet: bool = QUIET, no_progress: bool = NO_PROGRESS,
):
    """Remove units (neurons, channels) ranked by a criterion, compensate them, verify and report."""
    check_settings(criterion, ratio, compensate, scope, max_layer_ratio, target_params, target_macs, round_to)
    common = _common(ckpt, arch, arch_kwargs, unsafe_pickle, download, input_shape, calib, device)
    console = _console(no_progress)
    if dry_run:
        if json_path:
            check_writable(json_path, ckpt)
        common.pop("device")
        common["calib"] = min(calib, 256)
        report = plan(ckpt, data, criterion=criterion, scope=scope, max_layer_ratio=max_layer_ratio,
                      round_to=round_to, **common)
        if json_path:
            write_json(report, json_path)
        render_plan(report, console)
        return
    out = _output(ckpt, out, json_path, "shrunk", onnx, summary_md)
    _, report = shrink(
        ckpt, data, criterion, ratio, compensate, eval=eval_n, out=out,
        progress=console.is_terminal and not (quiet or no_progress), scope=scope, max_layer_ratio=max_layer_ratio,
        target_params=target_params, target_macs=target_macs, round_to=round_to, onnx=onnx,
        latency_batches=_latency_batches(speedup_batch), schedule=_ratios(schedule), recalibrate=recalibrate_bn,
        finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, distill=distill, **common,
    )
    _finish(report, json_path, quiet, console, summary_md, dict(
        max_drop=max_drop, min_speedup=min_speedup, speedup_batch=speedup_batch, max_params=max_params,
        onnx_atol=onnx_atol))


@app.command("lowrank", epilog=LOWRANK_EXAMPLES)
def lowrank_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB, eval_n: Optional[int] = EVAL,
    rank: Optional[int] = typer.Option(None, help="Factor every chosen layer at this rank."),
    energy: Optional[float] = typer.Option(None, help="Smallest rank keeping this fraction of Σσ², e.g. 0.9."),
    elbow: bool = typer.Option(False, "--elbow", help="Rank at the elbow of the residual curve (the default)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated globs of layer names (default: every Linear and Conv2d but the output head)."),
    data_aware: bool = typer.Option(False, "--data-aware", help="Factor W·C^½ (C: calibration input covariance) instead of W."),
    finetune_epochs: int = FT_EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIMIZER,
    distill: bool = DISTILL,
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Search the lowest ranks keeping the calibration accuracy within this many points, and hold the test accuracy drop to it as a budget (needs --data)."),
    min_speedup: Optional[float] = MIN_SPEEDUP, speedup_batch: int = SPEEDUP_BATCH,
    max_params: Optional[float] = MAX_PARAMS, onnx: Optional[str] = ONNX, onnx_atol: float = ONNX_ATOL,
    out: Optional[str] = OUT, json_path: Optional[str] = JSON, summary_md: Optional[str] = SUMMARY_MD,
    device: str = DEVICE, quiet: bool = QUIET, no_progress: bool = NO_PROGRESS,
):
    """Factor layers into rank-k products (Linear → 2 Linears, Conv → conv + 1×1 conv), verify and report."""
    if elbow and (rank is not None or energy is not None):
        raise UsageError("give one of --rank, --energy and --elbow")
    common = _common(ckpt, arch, arch_kwargs, unsafe_pickle, download, input_shape, calib, device)
    out = _output(ckpt, out, json_path, "lowrank", onnx, summary_md)
    console = _console(no_progress)
    _, report = lowrank(ckpt, data, rank=rank, energy=energy, layers=layers, data_aware=data_aware,
                        max_drop=max_drop, eval=eval_n, out=out, progress=console.is_terminal and not (quiet or no_progress),
                        onnx=onnx, latency_batches=_latency_batches(speedup_batch), finetune_epochs=finetune_epochs,
                        lr=lr, batch_size=batch_size, optimizer=optimizer, distill=distill, **common)
    _finish(report, json_path, quiet, console, summary_md, dict(
        max_drop=max_drop, min_speedup=min_speedup, speedup_batch=speedup_batch, max_params=max_params,
        onnx_atol=onnx_atol))


@app.command("export", epilog="""
Examples:

\b
  prunetool export evci_cnn.shrunk.pt --onnx evci.onnx
\b
  prunetool export model.pt --arch torchvision.models:resnet18 --input-shape 3,224,224 --onnx r18.onnx
""")
def export_cmd(
    ckpt: str = CKPT, onnx: str = typer.Option(..., "--onnx", help="Where to write the .onnx file."),
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, unsafe_pickle: bool = UNSAFE,
    data: Optional[str] = DATA, input_shape: Optional[str] = SHAPE, calib: int = typer.Option(64, "--calib", help="Inputs compared between PyTorch and onnxruntime."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."), onnx_atol: float = ONNX_ATOL,
    json_path: Optional[str] = JSON,
):
    """Export a checkpoint prunetool loads to ONNX (dynamic batch), run onnx.checker and compare onnxruntime
    with PyTorch."""
    from .api import _prepare

    for path in (onnx, json_path):
        if path:
            check_writable(path, ckpt)
    job = _prepare(ckpt, data, calib, parse_shape(input_shape), arch, parse_arch_kwargs(arch_kwargs), unsafe_pickle,
                   False)
    info = export_onnx(job.dense, job.x[:calib], onnx, opset)
    report = {"command": "export", "source": ckpt, "onnx": info}
    if json_path:
        write_json(report, json_path)
    print(f"export: {onnx} (opset {opset}), max |onnxruntime − PyTorch| = {info['max_abs_diff']:.2g} on "
          f"{min(calib, len(job.x))} inputs, onnxruntime {info['ort_latency_ms']['1']:.3f} ms at batch 1")
    failures = budget_failures(report, onnx_atol=onnx_atol)
    if failures:
        print(f"prunetool: verification failed: {failures[0]}", file=sys.stderr)
        raise typer.Exit(1)


@app.command("bench", epilog="""
Examples:

\b
  prunetool bench model.pt model.shrunk.pt --arch mypkg.nets:Net --input-shape 1,28,28
\b
  prunetool bench a.pt b.pt --batch-sizes 1,8,64 --threads 4 --no-onnx --json bench.json
""")
def bench_cmd(
    ckpts: list[str] = typer.Argument(..., metavar="CKPT...", help="Checkpoints to compare; ratios are to the first."),
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS, unsafe_pickle: bool = UNSAFE,
    input_shape: Optional[str] = SHAPE,
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for PyTorch and onnxruntime."),
    device: str = DEVICE, onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also time onnxruntime (CPU)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs first."),
    runs: int = typer.Option(50, "--runs", help="Timed runs at most (stops after 1 s once 5 are done)."),
    json_path: Optional[str] = JSON, no_progress: bool = NO_PROGRESS,
):
    """Latency (median, p90), throughput and peak memory of checkpoints side by side, PyTorch eager and
    onnxruntime."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise UsageError(f"--batch-sizes {batch_sizes!r} is not a list of integers; write it like 1,32") from None
    if json_path:
        check_writable(json_path)
    console = _console(no_progress)
    report = bench(ckpts, parse_shape(input_shape), sizes, threads, device, onnx, warmup, runs, arch,
                   parse_arch_kwargs(arch_kwargs), unsafe_pickle, progress=console.is_terminal and not no_progress)
    if json_path:
        write_json(report, json_path)
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
    unsafe_pickle: bool = UNSAFE, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    input_shape: Optional[str] = SHAPE, calib: int = CALIB,
    html: Optional[str] = typer.Option(None, "--html", help="Write one self-contained HTML page with every picture."),
    plots: Optional[str] = typer.Option(None, "--plots", help="Write the pictures as PNG files into this folder."),
    json_path: Optional[str] = JSON, no_progress: bool = NO_PROGRESS,
):
    """Where is this model redundant? Dead and frozen units, MRS, spectra against Marchenko–Pastur, elbow ranks."""
    from .redundancy import inspect

    common = _common(ckpt, arch, arch_kwargs, unsafe_pickle, download, input_shape, calib, "cpu")
    common.pop("device")
    for path in (html, json_path):
        if path:
            check_writable(path, ckpt)
    if plots and Path(plots).exists() and not Path(plots).is_dir():
        raise UsageError(f"--plots {plots} is a file; give a folder")
    console = _console(no_progress)
    if data is None:
        warnings.warn("no --data: dead and frozen units and MRS come from random inputs labelled by the model itself")
    report = inspect(ckpt, data, html=html, plots=plots, progress=console.is_terminal and not no_progress, **common)
    if json_path:
        write_json(report, json_path)
    render_inspect(report, console)


@app.command("sparsify", epilog="""
Examples:

\b
  prunetool sparsify samples/evci_cnn.pt --arch samples.nets:EvciCNN --data mnist:~/data --imp 0.3 --rounds 5
\b
  prunetool sparsify model.pt --arch mypkg.nets:Net --data d.npz --rounds 3 --finetune-epochs 2 --rewind
""")
def sparsify_cmd(
    ckpt: str = CKPT, arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KWARGS,
    unsafe_pickle: bool = UNSAFE, data: Optional[str] = DATA, download: bool = DOWNLOAD,
    calib: int = CALIB, eval_n: Optional[int] = EVAL,
    imp: float = typer.Option(0.3, "--imp", help="Fraction of each layer's remaining weights pruned per round."),
    rounds: int = typer.Option(3, "--rounds", help="Pruning rounds."),
    finetune_epochs: int = typer.Option(1, "--finetune-epochs", help="Retraining epochs after each round."),
    lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIMIZER,
    rewind: bool = typer.Option(False, "--rewind", help="Rewind surviving weights to those after the first round's retraining."),
    onnx: Optional[str] = ONNX, onnx_atol: float = ONNX_ATOL, max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Budget: accuracy drop in percentage points."),
    max_params: Optional[float] = MAX_PARAMS,
    out: Optional[str] = OUT, json_path: Optional[str] = JSON, summary_md: Optional[str] = SUMMARY_MD,
    device: str = DEVICE, quiet: bool = QUIET, no_progress: bool = NO_PROGRESS,
):
    """Iterative magnitude pruning of single weights with retraining, then physical removal of the units left
    without incoming or outgoing weights."""
    from .sparsify import sparsify

    common = _common(ckpt, arch, arch_kwargs, unsafe_pickle, download, None, calib, device)
    out = _output(ckpt, out, json_path, "sparse", onnx, summary_md)
    console = _console(no_progress)
    _, report = sparsify(ckpt, data, imp=imp, rounds=rounds, finetune_epochs=finetune_epochs, lr=lr,
                         batch_size=batch_size, optimizer=optimizer, rewind=rewind, eval=eval_n, out=out, onnx=onnx,
                         progress=console.is_terminal and not (quiet or no_progress), **common)
    _finish(report, json_path, quiet, console, summary_md, dict(max_drop=max_drop, max_params=max_params,
                                                                 onnx_atol=onnx_atol))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"prunetool: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    try:
        # Without standalone mode, click hands back typer.Exit's code as the return value.
        code = app(args=argv, standalone_mode=False, prog_name="prunetool")
    except UsageError as e:
        print(f"prunetool: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"prunetool: verification failed: {e}", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("prunetool: aborted", file=sys.stderr)
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
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
