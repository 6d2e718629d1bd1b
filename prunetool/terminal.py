"""One command-line run around a command: its :class:`Session` (the arguments, the options file), the option
dataclasses read from its flags by the command line's own rules (the device, the default ``--out``, the budgets),
and its end (report files, the summary line, the exit code: 1 a budget missed, 4 a speed-up gate not judged)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from rich.console import Console

from . import distributed, hf
from .errors import UsageError
from .flags import Given
from .options import Budgets, CommandLine, DataOptions, Measurement, Outputs, Source
from .report import budget_failures, json_bytes, render, summary_line, summary_markdown, too_noisy
from .staging import Staging


@dataclass
class Session:
    """One invocation: its arguments, and the options file applied (recorded in the report; no output may
    overwrite it)."""

    argv: tuple[str, ...] = ()
    config: str | None = None

    def inputs(self) -> dict[str, str]:
        return {"the options file (--config)": self.config} if self.config else {}


def checked_device(device: str) -> str:
    """``--device`` checked, and joined to torchrun's process group when there is one."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r} is not cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    distributed.init(device)
    if device == "cuda" and distributed.active():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def source_and_data(given: Given) -> tuple[Source, DataOptions]:
    """The model and the data a command reads, the data's options checked."""
    source, data = given.make(Source), given.make(DataOptions)
    data.check()
    return source, data


def require_data(given: Given, needed: bool, why: str) -> None:
    """Refuse, before any work, a run that needs labelled ``--data`` and has none."""
    refuse(needed and given["--data"] is None, f"{why}: pass --data with labels")


def refuse(when: bool, message: str) -> None:
    """A one-line refusal (exit 2) when ``when`` holds."""
    if when:
        raise UsageError(message)


def gates(given: Given) -> tuple[Measurement, Budgets, Outputs]:
    """What a command that writes a model measures, demands and writes."""
    budgets, switches = given.make(Budgets), given.make(CommandLine)
    device = checked_device(given["--device"])
    gate = budgets.speedup_batch if budgets.min_speedup is not None else None
    batches = () if switches.no_latency else given["--latency-batches"]
    if gate is not None and not switches.no_latency and gate not in batches:
        batches = tuple(sorted({*batches, gate}))
    measurement = given.make(Measurement, latency_batches=batches, device=device, gate_batch=gate)
    if measurement.offload and not device.startswith("cuda"):
        raise UsageError("--offload keeps the weights in host memory while a GPU computes: it needs --device cuda "
                         "(on the CPU the weights are in host memory already)")
    budgets.check()
    if budgets.min_speedup is not None and not measurement.latency_batches:
        raise UsageError("--min-speedup needs latency: drop --no-latency")
    return measurement, budgets, outputs_of(given)


def outputs_of(given: Given) -> Outputs:
    """The files a command writes; ``--out`` by default beside the checkpoint, named by the command's suffix."""
    ckpt, out, suffix = given["CKPT"], given["--out"], given.suffix
    if Path(ckpt).is_dir():
        if not hf.is_dir(ckpt):
            raise UsageError(f"{ckpt} is a directory without config.json; pass a checkpoint file (.pt, .pth or "
                             ".safetensors) or a Hugging Face model directory")
        if out is None:  # a directory like the input (its fallback file: check_job_outputs)
            base = Path(ckpt).resolve()
            out = str(base.with_name(f"{base.name}.{suffix}"))
    elif not Path(ckpt).exists():
        raise UsageError(f"{ckpt}: no such file or directory; check the checkpoint path")
    outputs = given.make(Outputs, out=out or str(Path(ckpt).with_name(f"{Path(ckpt).stem}.{suffix}.safetensors")),
                         inputs=given.session.inputs())
    outputs.check()
    return outputs


def make_console(no_progress: bool) -> Console:
    width = None if sys.stdout.isatty() else 160  # logs: wide enough for the tables, never wrapped at 80
    return Console(no_color=True, highlight=False, width=width) if no_progress else Console(width=width)


NOISY = 4  # exit code: a speed-up gate could not be judged on this machine


def conclude(given: Given, budgets: Budgets, outputs: Outputs, run) -> None:
    """Run a command that writes a model (``run(staging, progress)``), stage the report files, commit every output
    together, print; exit 1 on a missed budget, 4 when the machine was too noisy to judge a speed-up gate."""
    switches = given.make(CommandLine)
    console = make_console(switches.no_progress)
    with Staging() as staging:
        _, report = run(staging, console.is_terminal and not (switches.quiet or switches.no_progress))
        failures, noisy = budget_failures(report, budgets), too_noisy(report, budgets)
        report["budgets"] = {"failures": failures, "too_noisy": noisy,
                             **{k: v for k, v in vars(budgets).items() if v is not None}}
        report["config"] = given.session.config
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
    written = [p for p in (report.get("settings", {}).get("out") or outputs.out, outputs.onnx, outputs.pt2) if p]
    line = summary_line(report) + (f"; wrote {', '.join(written)}" if written else "")  # out: the fallback file
    if switches.quiet:
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


def report_json(given: Given, staging: Staging, report: dict) -> None:
    """Record the options file in a report, stage it as --json, commit."""
    report["config"] = given.session.config
    if given["--json"]:
        staging.write(given["--json"], json_bytes(report))
    staging.commit()


def show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"prunetool: warning: {message}", file=sys.stderr)


def terminate(signum, frame):
    raise KeyboardInterrupt  # a CI runner cancelling the job: clean up staged files as on Ctrl-C
