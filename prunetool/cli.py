"""The command line: Typer commands made from the option dataclasses (:mod:`prunetool.flags`) over
:mod:`prunetool.commands`.

Each command turns its flags into the option dataclasses of :mod:`prunetool.options`, runs the command with a
staging area, stages its report files beside the model, commits them all together, prints and sets the exit
code: 0 done, 1 a budget missed or a verification failed, 2 bad input, 3 an internal error (a bug: ``--debug``
shows the traceback), 4 a speed-up gate could not be judged (the machine was too noisy), 130 interrupted.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
import warnings
from typing import Optional

import typer
from typer.exceptions import TyperException

from . import __version__, terminal
from .commands import (bench as bench_command, compress as compress_command, export as export_command,
                       inspect as inspect_command, lowrank as lowrank_command, shrink as shrink_command,
                       sparsify as sparsify_command)
from .commands.common import preflight
from .config import default_map, read as read_config
from .errors import InternalError, UsageError, VerificationError
from .flags import Given, command
from .options import (BenchOptions, Budgets, CommandLine, CompressOptions, DataOptions, InspectOptions, LowrankOptions,
                      Measurement, Outputs, Recovery, ShrinkOptions, Source, SparsifyOptions)
from .report import json_bytes, render_bench, render_inspect, render_plan
from .staging import Staging, check_outputs
from .terminal import Session

app = typer.Typer(
    help="Make a trained PyTorch model physically smaller and faster, then prove it.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)

# Each command's flags in the order --help lists them (the fields that bear them: prunetool.options)
SOURCE = "CKPT --arch --arch-kwargs --unsafe-pickle --trust-remote-code"
ENGINE = "--calib-memory --calib-rows --workers --preset --resize --crop --mean --std"
TOKENS = "--seq-len --tokenizer --output-key"
DATA = f"--data --download --input-shape --calib {ENGINE} --eval --tokens {TOKENS}"
RECOVERY = "--finetune-epochs --lr --batch-size --optimizer"
REPORT = ("--max-params --fidelity --latency-batches --no-latency --onnx --pt2 --onnx-atol --onnx-rtol --out --json "
          "--summary-md")
GATES = f"--min-speedup --speedup-batch {REPORT} --device --quiet --no-progress"
SHRINK = (f"{SOURCE} {DATA} --criterion --ratio --scope --max-layer-ratio --target-params --target-macs "
          f"--target-latency --allocation --round-to --drop-blocks --drop-heads --hidden --rotate --axes "
          f"--drop-experts --free-widths --schedule {RECOVERY} --recalibrate-bn --distill --recover --mixup --dry-run "
          f"--compensate --max-drop --offload {GATES}")
LOWRANK = (f"{SOURCE} {DATA} --rank --energy --elbow --raw-elbow --target-params --target-macs --max-layer-error "
           f"--search --layers --data-aware {RECOVERY} --distill --recover --mixup --max-drop {GATES}")
COMPRESS = f"{SOURCE} {DATA} --target-params --target-macs --max-drop --plans {GATES}"
SPARSIFY = (f"{SOURCE} --data --download --calib --eval {TOKENS} {ENGINE} --imp --rounds {RECOVERY} --rewind "
            f"--max-drop {REPORT} --device --quiet --no-progress")
EXPORT = ("CKPT --onnx --pt2 --arch --arch-kwargs --unsafe-pickle --trust-remote-code --data --input-shape --tokens "
          f"{TOKENS} --calib --opset --onnx-atol --onnx-rtol --json")
BENCH = ("CKPT... --arch --arch-kwargs --unsafe-pickle --trust-remote-code --input-shape --tokens --output-key "
         "--batch-sizes --threads --device --onnx --warmup --runs --json --no-progress")
INSPECT = (f"{SOURCE} --data --download --input-shape --calib {ENGINE} --tokens {TOKENS} --html --plots --json "
           "--no-progress")
# ... and the dataclasses each fills: a flag takes its default and help from the first one with a field that bears it
WRITES = (Budgets, Measurement, Outputs, CommandLine)


def examples(*lines: str) -> str:
    return "\nExamples:\n\n" + "".join(f"\b\n  prunetool {line}\n" for line in lines)


SHRINK_EXAMPLES = examples(
    "shrink samples/evci_cnn.pt --arch samples.nets:EvciCNN --data samples/mnist_subset.npz --ratio 0.6",
    "shrink model.pt --arch torchvision.models:resnet18 --arch-kwargs '{\"num_classes\": 10}' --data cifar10:~/data",
    "shrink samples/kjv_llama8 --data samples/kjv_tokens.npz --target-params 0.7 --axes units,blocks,hidden",
    "shrink r18.pt --arch torchvision.models:resnet18 --input-shape 3,224,224 --dry-run",
    "shrink r18.pt --arch torchvision.models:resnet18 --data imgs/ --scope global --target-macs 0.5 \\\n"
    "      --out r18.small.safetensors --onnx r18.onnx --pt2 r18.pt2 --max-drop 1")
LOWRANK_EXAMPLES = examples(
    "lowrank samples/conv2.pt --arch samples.nets:Conv2 --data samples/mnist_subset.npz",
    "lowrank samples/conv2.pt --arch samples.nets:Conv2 --layers 'classifier.1' --rank 10",
    "lowrank model.pt --arch mypkg.nets:Net --data d.npz --data-aware --max-drop 0.5",
    "lowrank evci_cnn.shrunk.safetensors --energy 0.9")
COMPRESS_EXAMPLES = examples(
    "compress samples/conv2.pt --arch samples.nets:Conv2 --data samples/mnist_subset.npz --target-macs 0.5 "
    "--max-drop 1",
    "compress model.pt --arch mypkg.nets:Net --data d.npz --target-params 0.25 --plans shrink,shrink+lowrank")
SPARSIFY_EXAMPLES = examples(
    "sparsify samples/evci_cnn.pt --arch samples.nets:EvciCNN --data mnist:~/data --imp 0.3 --rounds 5",
    "sparsify model.pt --arch mypkg.nets:Net --data d.npz --rounds 3 --finetune-epochs 2 --rewind")
EXPORT_EXAMPLES = examples("export evci_cnn.shrunk.safetensors --onnx evci.onnx --pt2 evci.pt2",
    "export model.pt --arch torchvision.models:resnet18 --input-shape 3,224,224 --onnx r18.onnx")
BENCH_EXAMPLES = examples("bench model.pt model.shrunk.safetensors --arch mypkg.nets:Net --input-shape 1,28,28",
    "bench a.pt b.pt --batch-sizes 1,8,64 --threads 4 --no-onnx --json bench.json")
INSPECT_EXAMPLES = examples(
    "inspect samples/lenet_300_100.pt --arch samples.nets:LeNet300100 --data samples/mnist_subset.npz "
    "--html lenet.html",
    "inspect model.pt --arch mypkg.nets:Net --input-shape 3,32,32 --plots plots/ --json inspect.json")


def _version(value: bool):
    if value:
        print(f"prunetool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(ctx: typer.Context,
                 version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit."),
                 config: Optional[str] = typer.Option(None, "--config", help="Options file (default: ./prunetool.toml, "
                                                      "else [tool.prunetool] in ./pyproject.toml); flags override it."),
                 no_config: bool = typer.Option(False, "--no-config", help="Read no options file."),
                 debug: bool = typer.Option(False, "--debug", help="Show the traceback of an internal error.")):
    """Make a trained PyTorch model physically smaller and faster, then prove it."""
    session = ctx.obj = ctx.obj if isinstance(ctx.obj, Session) else Session(tuple(sys.argv[1:]))
    if no_config or any(a in ("--help", "-h") for a in session.argv):  # help never depends on a config file
        return
    table, source = read_config(config)
    if table:
        ctx.default_map = default_map(table, ctx.command.commands, source)
        session.config = source


@command(app, "shrink", SHRINK, (Source, DataOptions, ShrinkOptions, Recovery, *WRITES), suffix="shrunk",
         epilog=SHRINK_EXAMPLES)
def shrink_cmd(given: Given):
    """Remove units (neurons, channels) ranked by a criterion, compensate them, verify and report."""
    opts = given.make(ShrinkOptions)
    opts.check()
    source, data = terminal.source_and_data(given)
    if given["--dry-run"]:
        terminal.refuse(bool(opts.measured), f"--dry-run measures nothing: drop {opts.measured}")
        if given["--json"]:
            preflight({"--json": given["--json"]}, source, data, inputs=given.session.inputs())
        report = shrink_command.plan(
            source.checkpoint, data.data, criterion=opts.criterion, scope=opts.scope,
            max_layer_ratio=opts.max_layer_ratio, round_to=opts.round_to, free_widths=opts.free_widths,
            calib=min(data.calib, shrink_command.DRY_RUN_CALIB), input_shape=data.input_shape, arch=source.arch,
            arch_kwargs=source.arch_kwargs, unsafe_pickle=source.unsafe_pickle, download=data.download,
            tokens=data.tokens, seq_len=data.seq_len, tokenizer=data.tokenizer, output_key=data.output_key,
            trust_remote_code=source.trust_remote_code)
        if given["--json"]:
            with Staging() as staging:
                staging.write(given["--json"], json_bytes(report))
                staging.commit()
        render_plan(report, terminal.make_console(given["--no-progress"]))
        return
    measurement, budgets, outputs = terminal.gates(given)
    recovery = given.make(Recovery)
    terminal.conclude(given, budgets, outputs, lambda staging, progress: shrink_command.run(
        source, data, opts, recovery, measurement, outputs, staging, progress=progress))


@command(app, "lowrank", LOWRANK, (Source, DataOptions, LowrankOptions, Recovery, *WRITES), suffix="lowrank",
         epilog=LOWRANK_EXAMPLES)
def lowrank_cmd(given: Given):
    """Factor layers into rank-k products (Linear → 2 Linears, Conv → conv + 1×1 conv), verify and report."""
    opts = given.make(LowrankOptions)
    opts.check()
    terminal.require_data(given, opts.max_drop is not None, "lowrank --max-drop searches ranks by their accuracy")
    source, data = terminal.source_and_data(given)
    measurement, budgets, outputs = terminal.gates(given)
    recovery = given.make(Recovery)
    terminal.conclude(given, budgets, outputs, lambda staging, progress: lowrank_command.run(
        source, data, opts, recovery, measurement, outputs, staging, progress=progress))


@command(app, "compress", COMPRESS, (Source, DataOptions, CompressOptions, *WRITES), suffix="compressed",
         epilog=COMPRESS_EXAMPLES)
def compress_cmd(given: Given):
    """shrink and lowrank under one budget: every plan (shrink, lowrank, both in either order) reaches the target,
    the best calibration accuracy within --max-drop is kept, the report shows every plan and each step."""
    opts = given.make(CompressOptions)
    opts.check()
    if given["--data"] is None:
        raise UsageError("compress chooses between plans by their accuracy: it needs --data")
    source, data = terminal.source_and_data(given)
    measurement, budgets, outputs = terminal.gates(given)
    terminal.conclude(given, budgets, outputs, lambda staging, progress: compress_command.run(
        source, data, opts, measurement, outputs, staging, progress=progress))


@command(app, "sparsify", SPARSIFY, (Source, DataOptions, SparsifyOptions, Recovery, *WRITES), suffix="sparse",
         epilog=SPARSIFY_EXAMPLES, helps={"--max-drop": "Budget: accuracy drop in percentage points."})
def sparsify_cmd(given: Given):
    """Iterative magnitude pruning of single weights with retraining, then physical removal of the units left
    without incoming or outgoing weights."""
    opts = given.make(SparsifyOptions)
    opts.check()
    if given["--data"] is None:
        raise UsageError("sparsify retrains between rounds: it needs --data with a train split")
    source, data = terminal.source_and_data(given)
    measurement, budgets, outputs = terminal.gates(given)
    recovery = given.make(Recovery)  # the rounds' retraining (their epochs: SparsifyOptions)
    terminal.conclude(given, budgets, outputs, lambda staging, progress: sparsify_command.run(
        source, data, opts, recovery, measurement, outputs, staging, progress=progress))


@command(app, "export", EXPORT, (export_command.ExportOptions, Source, DataOptions, Outputs), epilog=EXPORT_EXAMPLES)
def export_cmd(given: Given):
    """Export a checkpoint prunetool loads to ONNX (dynamic batch; onnx.checker, then onnxruntime against PyTorch)
    and/or to a torch.export program (reloaded and compared)."""
    opts, (source, data) = given.make(export_command.ExportOptions), terminal.source_and_data(given)
    with Staging() as staging:
        report = export_command.run(source, data, staging, opts.onnx, opts.pt2, opts.opset, given["--onnx-atol"],
                                    given["--onnx-rtol"], reports={"--json": given["--json"]} if given["--json"] else
                                    None, inputs=given.session.inputs())
        terminal.report_json(given, staging, report)
    for kind in ("onnx", "pt2"):
        if kind in report:
            info = report[kind]
            extra = f" ({info['exporter']} exporter, opset {info['opset']})" if kind == "onnx" else ""
            print(f"export: {info['path']}{extra}, max |exported − PyTorch| = {info['max_abs_diff']:.2g} on "
                  f"{report['inputs_compared']} inputs (tolerance {info['tolerance']:.2g})")


@command(app, "bench", BENCH, (BenchOptions, Source, DataOptions, *WRITES), epilog=BENCH_EXAMPLES)
def bench_cmd(given: Given):
    """Latency (median, p10, p90), throughput and peak memory of checkpoints side by side, PyTorch eager and
    onnxruntime."""
    opts, no_progress = given.make(BenchOptions), given["--no-progress"]
    if given["--json"]:
        inputs = {f"the input CKPT {i + 1}": c for i, c in enumerate(opts.paths)}
        check_outputs({"--json": given["--json"]}, {**inputs, **given.session.inputs()})
    console = terminal.make_console(no_progress)
    report = bench_command.bench(opts.paths, given["--input-shape"], opts.batch_sizes, opts.threads,
                                 terminal.checked_device(given["--device"]), opts.onnx, opts.warmup, opts.runs,
                                 given["--arch"], given["--arch-kwargs"], given["--unsafe-pickle"],
                                 progress=console.is_terminal and not no_progress, tokens=given["--tokens"],
                                 trust_remote_code=given["--trust-remote-code"], output_key=opts.output_key)
    with Staging() as staging:
        terminal.report_json(given, staging, report)
    render_bench(report, console)


@command(app, "inspect", INSPECT, (Source, DataOptions, InspectOptions, Outputs, CommandLine), epilog=INSPECT_EXAMPLES)
def inspect_cmd(given: Given):
    """Where is this model redundant? Dead and frozen units, MRS, spectra against Marchenko–Pastur, elbow ranks."""
    (source, data), pictures = terminal.source_and_data(given), given.make(InspectOptions)
    console = terminal.make_console(given["--no-progress"])
    with Staging() as staging:
        report = inspect_command.run(source, data, staging, pictures.html, pictures.plots,
                                     progress=console.is_terminal and not given["--no-progress"],
                                     reports={"--json": given["--json"]} if given["--json"] else None,
                                     inputs=given.session.inputs())
        terminal.report_json(given, staging, report)
    render_inspect(report, console)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    warnings.showwarning = terminal.show_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminal.terminate)
    try:
        # Without standalone mode, click hands back typer.Exit's code as the return value.
        code = app(args=argv, standalone_mode=False, prog_name="prunetool", obj=Session(tuple(argv)))
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
