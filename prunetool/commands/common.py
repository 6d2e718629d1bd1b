"""The start and the end every command shares.

:func:`start`: load the checkpoint, read the data, draw the calibration samples, trace the model. Work happens
in float32 when the checkpoint is float16/bfloat16; an ``nn.Module`` handed in by a caller is never modified
(not even its train/eval mode).

:func:`finish`: record what was done, round the result through the dtypes it is saved in, save it (staged),
check that the saved bytes reload to identical outputs, export and check ONNX / pt2 (staged), measure before and
after, and build the report.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

from .. import __version__, distributed
from ..calibrate import Settings
from ..data import Data, Samples, calibration, check_labels, eval_loader, load_data
from ..export import export_onnx, export_pt2
from ..load import Checkpoint, format_of, load, round_through, serialize, upcast_half
from ..measure import as_input, compare_latency, evaluate, macs, params
from ..options import DataOptions, Measurement, Outputs, Source
from ..progress import Bars
from ..staging import Staging
from ..trace import Trace, trace
from ..verify import check_reload

DEFAULT_FORMAT = ".safetensors"


@dataclass
class Job:
    """A loaded model ready for work: the checkpoint, the data, calibration samples, a probe batch for the checks,
    the trace, and the calibration engine's settings."""

    ckpt: Checkpoint
    data: Data
    dense: nn.Module  # the model the work reads (a float32 copy for a half-precision checkpoint)
    calib: Samples
    probe: torch.Tensor  # up to 64 calibration inputs (at least 2: exporters need a batch above 1)
    graph: Trace
    computed_in: str
    settings: Settings
    eval: int | None = None  # test samples evaluated (None: all)
    caller_mode: tuple[nn.Module, bool] | None = None  # a caller's module and its train flag, restored by close()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.probe.shape[1:])

    def close(self) -> None:
        if self.caller_mode is not None:
            module, training = self.caller_mode
            module.train(training)


@dataclass
class Step:
    """What a command's work made, before the shared end: the model, and what to record and report about it."""

    model: nn.Module
    settings: dict
    layers: list
    checks: dict
    extra: dict
    factored: dict


def derive(job: Job, model: nn.Module, record: dict) -> Job:
    """The job for a model made from ``job``'s (the next step of a composition): same data and samples, traced
    anew, its record carrying what earlier steps did."""
    ckpt = Checkpoint(model, job.ckpt.arch, job.ckpt.arch_kwargs, record, job.ckpt.path, job.ckpt.sha256,
                      job.ckpt.file_bytes, job.ckpt.dtypes, job.ckpt.arch_root)
    return Job(ckpt, job.data, model.eval(), job.calib, job.probe, trace(model, job.probe[:2]), job.computed_in,
               job.settings, job.eval, None)


def as_checkpoint(source: Source) -> tuple[Checkpoint, tuple[nn.Module, bool] | None]:
    model = source.checkpoint
    if isinstance(model, Checkpoint):
        return model, None
    if isinstance(model, nn.Module):
        mode = (model, model.training)
        return Checkpoint(model, source.arch, source.arch_kwargs or {},
                          dtypes={k: v.dtype for k, v in model.state_dict().items() if v.dtype.is_floating_point}), mode
    return load(model, source.arch, source.arch_kwargs, source.unsafe_pickle), None


def input_paths(source: Source) -> dict[str, str]:
    """The input files an output must not overwrite."""
    return {"CKPT": str(source.checkpoint)} if isinstance(source.checkpoint, (str, os.PathLike)) else {}


def start(source: Source, data: DataOptions, device: str = "cpu") -> Job:
    ckpt, mode = as_checkpoint(source)
    dense = ckpt.model
    try:
        if any(t.dtype in (torch.float16, torch.bfloat16) for t in list(dense.parameters()) + list(dense.buffers())):
            dense = copy.deepcopy(dense) if mode is not None else dense
            upcast_half(dense)
        dense.eval()
        spec = data.data
        loaded = spec if isinstance(spec, Data) else load_data(spec, data.download, data.input_shape,
                                                               data.preprocessing)
        shape = data.input_shape or (tuple(ckpt.record["input_shape"]) if loaded.train is None and
                                     ckpt.record.get("input_shape") else None)
        calib = calibration(loaded, data.calib, shape, dense if loaded.train is None and shape else None,
                            data.workers)
        probe = as_input(calib.take(64)[0], dense)
        if len(probe) < 2:
            probe = torch.cat([probe, probe])
        graph = trace(dense, probe[:2])
        if loaded.train is not None and graph.output_shape:
            check_labels(loaded, graph.output_shape[-1])
    except BaseException:
        if mode is not None:
            mode[0].train(mode[1])
        raise
    computed = str(next((p.dtype for p in dense.parameters()), torch.float32)).replace("torch.", "")
    settings = Settings(data.memory, data.rows, device)
    return Job(ckpt, loaded, dense, calib, probe, graph, computed, settings, data.eval, mode)


def snapshot(model: nn.Module, file_bytes: int | None, loader, input_shape, measurement: Measurement, bars: Bars,
             label: str) -> dict:
    device = measurement.device
    model.to(device)
    accuracy, loss = evaluate(model, loader, device, bars, label)
    snap = {"params": params(model), "macs": macs(model, input_shape), "file_bytes": file_bytes,
            "accuracy": accuracy, "loss": loss, "latency_ms": {}}
    model.to("cpu")
    return snap


def measure_latency(report: dict, dense: nn.Module, small: nn.Module, input_shape, measurement: Measurement,
                    bars: Bars, gate_batch: int | None = None, attempts: int = 3) -> None:
    """Latency before and after, interleaved, at every batch size; the batch a speed-up gate reads is measured
    again (up to ``attempts`` times) while the machine is too noisy to judge it."""
    device = measurement.device
    dense.to(device)
    small.to(device)
    report["latency"] = {}
    for b in bars.track(measurement.latency_batches, "measuring latency"):
        tries = attempts if b == gate_batch else 1
        for attempt in range(1, tries + 1):
            result = compare_latency(dense, small, input_shape, b, device)
            result["attempts"] = attempt
            if not result["noisy"]:
                break
        report["latency"][str(b)] = result
        report["before"]["latency_ms"][str(b)] = result["before"]["median_ms"]
        report["after"]["latency_ms"][str(b)] = result["after"]["median_ms"]
    dense.to("cpu")
    small.to("cpu")


def file_dtype(job: Job) -> str:
    kinds = sorted({str(d).replace("torch.", "") for d in job.ckpt.dtypes.values()})
    return "/".join(kinds) or job.computed_in


def finish(job: Job, command: str, small: nn.Module, settings: dict, layers: list, checks: dict, *, factored: dict, outputs: Outputs, staging: Staging, measurement: Measurement,
           bars: Bars, extra: dict | None = None) -> dict:
    """The end every command shares (see the module docstring). Files go to ``staging``; the caller commits."""
    ckpt = job.ckpt
    record = {"command": command, **settings, "layers": layers, "factored": factored, "source_sha256": ckpt.sha256,
              "input_shape": list(job.input_shape), "source": ckpt.path, "prunetool_version": __version__,
              "history": ckpt.record.get("history", []) + [{"command": command, **settings}]}
    probe = job.probe
    small.cpu()
    round_through(small, ckpt.dtypes)
    small.eval()
    with torch.no_grad():
        expected = small(probe)
    out = outputs.out
    blob = serialize(small, ckpt.arch, ckpt.arch_kwargs, record, ckpt.dtypes, format_of(out or DEFAULT_FORMAT),
                     ckpt.arch_root)
    if ckpt.arch is not None or out is not None:
        check_reload(blob, probe, expected)
        checks["reload"] = "identical"
    main = distributed.is_main()
    if out is not None and main:
        staging.write(out, blob)
    report = {
        "command": command,
        "settings": {**settings, "calib": len(job.calib), "eval": job.eval, "data": job.data.spec,
                     "input_shape": list(job.input_shape), "device": measurement.device, "source": ckpt.path,
                     "out": out, "dtype": {"file": file_dtype(job), "computed": job.computed_in},
                     "prunetool_version": __version__},
        "layers": layers, **(extra or {}), "verify": checks,
    }
    if outputs.onnx is not None and main:
        report["onnx"] = export_onnx(small, probe, staging.path(outputs.onnx), outputs.atol, outputs.rtol,
                                     latency_batches=measurement.latency_batches, shown_as=outputs.onnx)
    if outputs.pt2 is not None and main:
        report["pt2"] = export_pt2(small, probe, staging.path(outputs.pt2), outputs.atol, outputs.rtol, shown_as=outputs.pt2)
    loader = eval_loader(job.data, job.eval) if measurement.evaluate else None
    before_bytes = ckpt.file_bytes or len(serialize(job.dense, ckpt.arch, ckpt.arch_kwargs, dtypes=ckpt.dtypes))
    report["before"] = snapshot(job.dense, before_bytes, loader, job.input_shape, measurement, bars,
                                "evaluating dense")
    report["after"] = snapshot(small, len(blob), loader, job.input_shape, measurement, bars,
                               f"evaluating {command} output")
    if measurement.latency_batches:
        measure_latency(report, job.dense, small, job.input_shape, measurement, bars, measurement.gate_batch)
    acc_b, acc_a = report["before"]["accuracy"], report["after"]["accuracy"]
    report["accuracy_drop"] = None if acc_b is None else acc_b - acc_a
    return report
