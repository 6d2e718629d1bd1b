"""The command line: a thin Typer layer over the Python API."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
import typer
from rich.console import Console
from typer.exceptions import TyperException

from . import __version__
from .api import DEFAULT_COMPENSATION, DEFAULT_CRITERION, check_settings, default_out, plan, shrink
from .data import parse_shape
from .errors import UsageError, VerificationError
from .load import check_writable, parse_arch_kwargs
from .report import render, render_plan, summary_line, write_json

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


def _version(value: bool):
    if value:
        print(f"prunetool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")):
    """Make a trained PyTorch model physically smaller and faster, then prove it."""


@app.command("shrink", epilog=SHRINK_EXAMPLES)
def shrink_cmd(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="Checkpoint: a state_dict (with --arch), prunetool output, or a pickled module."),
    arch: Optional[str] = typer.Option(None, help="Architecture as MODULE:CALLABLE, e.g. torchvision.models:resnet18."),
    arch_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."),
    unsafe_pickle: bool = typer.Option(False, help="Allow unpickling a whole nn.Module (runs code from the file)."),
    data: Optional[str] = typer.Option(None, help="mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, an ImageFolder dir or an .npz."),
    download: bool = typer.Option(False, help="Download a torchvision dataset into ROOT if it is missing."),
    input_shape: Optional[str] = typer.Option(None, help="Input shape without batch, e.g. 1,28,28 (needed without --data)."),
    calib: int = typer.Option(1000, help="Calibration samples from the train split (fixed seed)."),
    eval_n: Optional[int] = typer.Option(None, "--eval", help="Evaluate on this many test samples (default: all)."),
    criterion: str = typer.Option(DEFAULT_CRITERION, help="Unit score: mrs, mrp, taylor, l1, l2, fp or random."),
    ratio: float = typer.Option(0.5, help="Fraction of units removed: from every prunable layer (--scope layer) or of all units (--scope global), in [0, 1)."),
    scope: str = typer.Option("layer", help="layer: the same ratio in every layer; global: units ranked across layers (scores normalised per layer)."),
    max_layer_ratio: float = typer.Option(0.9, help="With --scope global, no layer loses more than this fraction."),
    target_params: Optional[float] = typer.Option(None, help="Pick the ratio that keeps at most this fraction of the parameters, e.g. 0.5."),
    target_macs: Optional[float] = typer.Option(None, help="Pick the ratio that keeps at most this fraction of the MACs."),
    round_to: int = typer.Option(1, help="Keep unit counts at multiples of N (hardware-friendly widths)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the groups found, what is protected and why, and the size each ratio would give; write nothing."),
    compensate: str = typer.Option(DEFAULT_COMPENSATION, help="What replaces removed units: lstsq, mean or none."),
    out: Optional[str] = typer.Option(None, help="Output checkpoint (default: <stem>.shrunk.pt beside the input)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the report as JSON here."),
    device: str = typer.Option("cpu", help="Device for scoring, evaluation and latency: cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no tables; print the summary line."),
):
    """Remove units (neurons, channels) ranked by a criterion, compensate them, verify and report."""
    check_settings(criterion, ratio, compensate, scope, max_layer_ratio, target_params, target_macs, round_to)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    if calib < 1:
        raise UsageError("--calib must be at least 1")
    console = Console()
    common = dict(input_shape=parse_shape(input_shape), arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                  unsafe_pickle=unsafe_pickle, download=download)
    if json_path:
        check_writable(json_path, ckpt)
    if dry_run:
        report = plan(ckpt, data, criterion=criterion, scope=scope, max_layer_ratio=max_layer_ratio,
                      round_to=round_to, calib=min(calib, 256), **common)
        if json_path:
            write_json(report, json_path)
        render_plan(report, console)
        return
    out = out or default_out(ckpt)
    check_writable(out, ckpt)
    progress = console.is_terminal and not quiet
    _, report = shrink(
        ckpt, data, criterion, ratio, compensate, calib=calib, eval=eval_n, device=device, out=out,
        progress=progress, scope=scope, max_layer_ratio=max_layer_ratio, target_params=target_params,
        target_macs=target_macs, round_to=round_to, **common,
    )
    if json_path:
        write_json(report, json_path)
    if quiet:
        print(summary_line(report))
    else:
        render(report, console)
        console.print(summary_line(report), highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"prunetool: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    try:
        app(args=argv, standalone_mode=False, prog_name="prunetool")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
