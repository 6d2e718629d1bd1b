"""The start and the end every command shares.

:func:`start`: load the checkpoint, read the data, draw the calibration samples, trace the model. Work happens
in float32 when the checkpoint is float16/bfloat16; an ``nn.Module`` handed in by a caller is never modified
(not even its train/eval mode).

:func:`finish`: record what was done, round the result through the dtypes it is saved in, save it (staged),
check that the saved bytes reload to identical outputs, export and check ONNX / pt2 (staged), measure before and
after, and build the report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import distributed, experts, hf, layers, memory, precision, task, trust
from ..calibrate import Settings
from ..store import map_large_alone, trim_heap
from ..data import (OUTPUT_BYTES, Data, Samples, TokenDataset, calibration, check_labels, data_paths, eval_loader,
                    fit_inputs, load_data, too_few)
from ..export import export_onnx, export_pt2
from ..batch import as_input, batch_cat, batch_len, batch_slice, model_dtype, shape_of, token_ids
from ..errors import UsageError, VerificationError
from ..load import Checkpoint, arch_source, format_of, import_arch, load, round_through, write_file
from ..measure import compare_latency, evaluate, fidelity, macs, params
from ..options import (DEFAULT_ROWS, DEFAULT_TOKEN_ROWS, FIDELITY, DataOptions, Measurement, Outputs, Source,
                       from_keywords)
from ..progress import Bars
from ..staging import DIRECTORY_OUTPUTS, SUFFIXES, Staging, check_outputs
from ..groups import Protected
from ..trace import Trace, trace
from ..verify import check_reload, outputs_of
from ..version import __version__

DEFAULT_FORMAT = ".safetensors"


@dataclass
class Job:
    """A loaded model ready for work: the checkpoint, the data, calibration samples, a probe batch for the checks,
    the trace, and the calibration engine's settings."""

    ckpt: Checkpoint
    data: Data
    dense: nn.Module  # the model the work reads (in the checkpoint's dtypes: half precision is computed in float32)
    calib: Samples
    probe: torch.Tensor  # up to 64 calibration inputs, fewer when their outputs pass OUTPUT_BYTES (at least 2:
    # exporters need a batch above 1)
    graph: Trace
    computed_in: str
    settings: Settings
    eval: int | None = None  # test samples evaluated (None: all)
    caller_mode: tuple[nn.Module, bool] | None = None  # a caller's module and its train flag, restored by close()
    compute: precision.Compute | None = None  # in force from start() to close() for a half-precision model
    memory: dict | None = None  # the estimate memory.check made before loading

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (of its token ids, for a token model)."""
        return shape_of(self.probe)

    @property
    def example(self):
        """What measuring feeds: random inputs of the input shape, or the probe's token batches (ids must be ids)."""
        return self.input_shape if isinstance(self.probe, torch.Tensor) else self.probe

    def close(self) -> None:
        if self.caller_mode is not None:
            module, training = self.caller_mode
            module.train(training)
        if self.compute is not None:
            self.compute.__exit__(None, None, None)
            self.compute = None


@dataclass
class Step:
    """What a command's work made, before the shared end: the model, and what to record and report about it."""

    model: nn.Module
    settings: dict
    layers: list
    checks: dict
    extra: dict
    factored: dict


class Keywords:
    """The keyword arguments of a Python API function (``Keywords(locals())`` as its first line: ``prunetool.shrink``
    and the others) read back as the option dataclasses they stand for. Each function names its keywords and takes
    their defaults from the dataclasses' fields (``calib: int = DataOptions.calib``); this is the one place that
    turns them into options."""

    def __init__(self, keywords: dict):
        self.keywords = dict(keywords)  # as called: names the body binds later are not keywords

    def make(self, cls, **fixed):
        """``cls`` with each field from the keyword of its name (:func:`prunetool.options.from_keywords`)."""
        return from_keywords(cls, self.keywords, **fixed)

    def source(self) -> Source:
        return self.make(Source, arch_kwargs=self.keywords.get("arch_kwargs") or {})

    def data(self) -> DataOptions:
        shape = self.keywords.get("input_shape")
        return self.make(DataOptions, input_shape=tuple(shape) if shape else None)

    def measurement(self) -> Measurement:
        """What is measured; ``measure=False``: nothing, latency neither."""
        measure = self.keywords["measure"]
        return self.make(Measurement, latency_batches=tuple(self.keywords["latency_batches"]) if measure else ())


def trace_probe(model: nn.Module, probe, output_key: str | None = None) -> Trace:
    """``model`` traced on the first samples of ``probe`` (enough of them to reach every expert module of a
    mixture of experts); an expert no probe sample is routed to is named among the protected layers."""
    example, unreached = experts.trace_example(model, probe, output_key)
    graph = trace(model, example, output_key)
    graph.protected += [Protected(name, "no probe sample is routed to this expert, so its layers were not traced: "
                                        "kept whole") for name in unreached]
    return graph


def recovery_inputs(job: Job) -> Samples:
    """What label-free recovery trains on: every input of the train split where --data has one (its labels are
    never read), else the calibration samples."""
    if job.data.train is None:
        return job.calib
    return calibration(job.data, len(job.data.train), workers=job.calib.workers)


def derive(job: Job, model: nn.Module, record: dict) -> Job:
    """The job for a model made from ``job``'s (the next step of a composition): same data and samples, traced
    anew, its record carrying what earlier steps did."""
    ckpt = Checkpoint(model, job.ckpt.arch, job.ckpt.arch_kwargs, record, job.ckpt.path, job.ckpt.sha256,
                      job.ckpt.file_bytes, job.ckpt.dtypes, job.ckpt.arch_root)
    return Job(ckpt, job.data, model.eval(), job.calib, job.probe,
               trace_probe(model, job.probe, job.settings.output_key), job.computed_in,
               job.settings, job.eval, None)


def as_checkpoint(source: Source) -> tuple[Checkpoint, tuple[nn.Module, bool] | None]:
    model = source.checkpoint
    if isinstance(model, Checkpoint):
        return model, None
    if isinstance(model, nn.Module):
        mode = (model, model.training)
        return Checkpoint(model, source.arch, source.arch_kwargs or {},
                          dtypes={k: v.dtype for k, v in model.state_dict().items() if v.dtype.is_floating_point}), mode
    return load(model, source.arch, source.arch_kwargs, source.unsafe_pickle, source.trust_remote_code), None


def check_job_outputs(outputs: Outputs, source: Source, data: DataOptions | None = None) -> None:
    """The preflight of a command that writes a model (:func:`preflight`); ``--out`` may be a directory for a
    Hugging Face model (written as one)."""
    hf_source = isinstance(source.checkpoint, (str, os.PathLike)) and hf.is_dir(source.checkpoint)
    out_dir = ("--out",) if hf_source and not str(outputs.out or "").endswith(FILE_SUFFIXES) else ()
    if out_dir and outputs.out and outputs.out_fallback is None:  # the API's out, as the CLI's --out
        outputs.out_fallback = f"{str(outputs.out).rstrip('/')}.safetensors"
    paths = outputs.paths()
    if out_dir and outputs.out_fallback:  # written instead when the family's config cannot hold the cut
        paths["--out (its fallback file)"] = outputs.out_fallback
    preflight(paths, source, data, DIRECTORY_OUTPUTS + out_dir, outputs.inputs)


def preflight(outputs: dict[str, str], source: Source, data: DataOptions | None = None,
              directories: tuple[str, ...] = DIRECTORY_OUTPUTS, inputs: dict[str, str] | None = None) -> None:
    """Everything that can fail without the model's numbers, refused before any work with one line naming the
    flag and the fix: the architecture imports (and a file written with it will reload), every output path
    (suffix, folder, permission), no output over or inside any input, the exporters asked for are installed."""
    obj = import_arch(source.arch) if source.arch else None
    check_outputs(outputs, {**input_paths(source, data), **(inputs or {})}, directories)
    for flag, modules in (("--onnx", ("onnx", "onnxruntime", "onnxscript")), ("--pt2", ("torch.export",))):
        missing = [m for m in modules if flag in outputs and importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"{flag} needs the {missing[0]} package, which is not installed; pip install "
                             f"{missing[0]} or drop {flag}")
    writes_model = "--out" in outputs or "--out (its fallback file)" in outputs
    unsigned = writes_model and obj is not None and not trust.builds_module(obj) and \
        trust.sign(source.arch, source.arch_kwargs or {}, None) is None
    if unsigned:  # after every refusal: an error stays the one line printed
        key = trust.key_path()
        why = "holds no key (damaged?)" if key.exists() else "cannot be written"
        warnings.warn(f"the signing key file {key} {why}: the file written will reload only with --arch "
                      f"{source.arch} (set {trust.KEY_ENV} to another path)")


def input_paths(source: Source, data: DataOptions | None = None) -> dict[str, str]:
    """The files and folders a run reads (checkpoint, the architecture's source, data, tokenizer): no output may
    be written over one of them or inside one of the folders."""
    paths = {}
    if isinstance(source.checkpoint, (str, os.PathLike)):
        paths["the input checkpoint (CKPT)"] = str(source.checkpoint)
    if source.arch and (file := arch_source(source.arch)):
        paths["the source of --arch"] = file
    spec = data.data if data is not None else None
    if isinstance(spec, (str, os.PathLike)):
        paths.update({f"the input --data{f' ({what})' if what else ''}": path for what, path in data_paths(str(spec))})
    if data is not None and data.tokenizer:
        paths["the input --tokenizer"] = str(data.tokenizer)
    paths[f"the signing key ({trust.KEY_ENV})"] = str(trust.key_path())  # overwritten, no file here would reload
    return paths


def start(source: Source, data: DataOptions, device: str = "cpu", offload: bool = False) -> Job:
    needs = memory.check(source.checkpoint, data.memory, OUTPUT_BYTES, device, offload)  # before it is loaded
    ckpt, mode = as_checkpoint(source)
    dense = ckpt.model
    compute = None
    try:
        if mode is not None and layers.needs_prepare(dense):
            dense = layers.prepare(layers.clone(dense))  # the caller's module stays as it was
        if offload or precision.has_half(dense) or any(d in precision.HALF for d in ckpt.dtypes.values()):
            # weights stay in their dtype (and, offloaded, in host memory), computed in float32 (prunetool.precision)
            files = sorted(Path(ckpt.path).glob("*.safetensors")) if ckpt.path and Path(ckpt.path).is_dir() else []
            compute = precision.Compute(device if offload else None, files=[str(f) for f in files])
            map_large_alone()  # the copies every call makes and frees would otherwise stay in the heap as holes
            compute.__enter__()
        if needs is not None and needs.get("weights_on_demand"):
            _check_on_demand(needs, dense, compute)
        dense.eval()
        spec = data.data
        loaded = spec if isinstance(spec, Data) else load_data(spec, data.download, data.input_shape,
                                                               data.preprocessing, data.tokenizer or ckpt.tokenizer,
                                                               data.seq_len)
        if ckpt.record.get("inputs") == "named" and loaded.train is None and data.tokens is None:
            raise UsageError(f"{ckpt.path} takes several named inputs (it was made from named arrays): pass --data "
                             "with those arrays (README: Data)")
        fit_inputs(loaded, dense)  # names the inputs as the forward takes them, or refuses in one line
        recorded = ckpt.record.get("input_shape") if loaded.train is None else None
        tokens = data.tokens or (recorded[0] if recorded and ckpt.record.get("inputs") == "tokens" and
                                 data.input_shape is None else None)
        shape = data.input_shape or (tuple(recorded) if recorded and tokens is None else None)
        calib = calibration(loaded, data.calib, shape, dense if loaded.train is None and (shape or tokens) else None,
                            data.workers, tokens, data.output_key)
        probe = as_input(calib.take(64)[0], dense)
        if batch_len(probe) < 2:
            probe = batch_cat([probe, probe])
        graph = trace_probe(dense, probe, data.output_key)
        one = outputs_of(dense, batch_slice(probe, 0, 1)).numel() * 4
        if batch_len(probe) * one > OUTPUT_BYTES:  # every check holds the outputs of two models on it at once
            probe = batch_slice(probe, 0, max(2, OUTPUT_BYTES // one))
        if loaded.train is not None and graph.output_shape:
            check_labels(loaded, graph.output_shape)
        advice = too_few(loaded, data.calib)  # after every refusal: an error stays the one line printed
        if advice is not None:
            warnings.warn(advice)
    except BaseException:
        if mode is not None:
            mode[0].train(mode[1])
        if compute is not None:
            compute.__exit__(None, None, None)
        raise
    trim_heap()  # what loading and tracing freed goes back to the system before the passes
    computed = "float32" if compute is not None else str(model_dtype(dense)).replace("torch.", "")
    rows = data.rows or (DEFAULT_ROWS if isinstance(probe, torch.Tensor) else DEFAULT_TOKEN_ROWS)
    settings = Settings(data.memory, rows, device, output_key=data.output_key)
    return Job(ckpt, loaded, dense, calib, probe, graph, computed, settings, data.eval, mode, compute, needs)


def _check_on_demand(needs: dict, dense: nn.Module, compute) -> None:
    """The estimate assumed the weights are read from their mapped files; say so when they were copied instead
    (a transformers version that does not map them), with the estimate for weights held whole."""
    largest = max(dense.parameters(), key=lambda p: p.numel(), default=None)
    if largest is None or (compute is not None and compute.pages.covers(largest)):
        return
    needs["weights_on_demand"] = False
    needs["estimate_bytes"] = memory.estimate(needs["weights_bytes"], needs["calib_memory_bytes"],
                                              needs["outputs_bytes"])
    warnings.warn(f"the weights were copied into memory, not mapped from their files: this run may take about "
                  f"{memory.size(needs['estimate_bytes'])} (lower --calib-memory if that is too much)")


def snapshot(model: nn.Module, file_bytes: int | None, loader, example, measurement: Measurement, bars: Bars,
             label: str, output_key: str | None = None) -> dict:
    device = measurement.device
    if not measurement.offload:
        model.to(device)
    q = evaluate(model, loader, device, bars, label, output_key)
    snap = {"params": params(model), "macs": macs(model, example), "file_bytes": file_bytes, "metric": q.metric,
            "accuracy": q.accuracy, "loss": q.loss, "latency_ms": {}}
    if q.metric == "perplexity":
        snap["perplexity"] = q.perplexity
    if q.metric == "miou":
        snap["miou"] = q.miou
    model.to("cpu")
    return snap


def fidelity_of(job: Job, small: nn.Module, measurement: Measurement) -> dict:
    """The cut model against the dense one on the probe inputs (calibration samples), where no labelled test data
    says how good either is (:func:`prunetool.measure.fidelity`)."""
    device = measurement.device
    if not measurement.offload:
        job.dense.to(device)
        small.to(device)
    try:
        return fidelity(job.dense, small, job.probe, device, job.settings.output_key, token_ids(job.probe),
                        metric=FIDELITY.get(measurement.fidelity))
    finally:
        job.dense.to("cpu")
        small.to("cpu")


def metric_summary(before: dict, after: dict) -> dict:
    """The task's metric before and after, and the drop (:func:`prunetool.task.drop`)."""
    name = before.get("metric", "accuracy")
    b, a = before.get(name), after.get(name)
    return {"name": name, "before": b, "after": a, "drop": task.drop(name, b, a), "unit": task.drop_unit(name)}


def measure_latency(report: dict, dense: nn.Module, small: nn.Module, example, measurement: Measurement,
                    bars: Bars, gate_batch: int | None = None, attempts: int = 3) -> None:
    """Latency before and after, interleaved, at every batch size; the batch a speed-up gate reads is measured
    again (up to ``attempts`` times) while the machine is too noisy to judge it."""
    device = measurement.device
    if not measurement.offload:
        dense.to(device)
        small.to(device)
    report["latency"] = {}
    for b in bars.track(measurement.latency_batches, "measuring latency"):
        tries = attempts if b == gate_batch else 1
        for attempt in range(1, tries + 1):
            with precision.resident():
                result = compare_latency(dense, small, example, b, device)
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


FILE_SUFFIXES = SUFFIXES["--out"]


def _write_hf(job: Job, small: nn.Module, record: dict, out: str, fallback: str | None, staging: Staging,
              expected: torch.Tensor, notes: list[str]) -> tuple[str, int | None, nn.Module]:
    """Stage ``small`` as a Hugging Face directory at ``out``, read back with ``from_pretrained`` and compared;
    when its config cannot hold the cut, the path of prunetool's own file to write instead (``fallback``), with
    a note saying why. Returns the output path, its weights' bytes and the model to measure: the one read back
    (with the zero biases a bias flag adds), else ``small``."""
    try:
        if not distributed.is_main():
            hf.config_for(small, job.ckpt.arch_kwargs["architecture"], job.ckpt.arch_kwargs["config"],
                          bool(job.ckpt.arch_kwargs.get("trust_remote_code")))
            return out, None, small
        tmp = staging.path(out, directory=True)
        hf.write_dir(small, job.ckpt, tmp, job.ckpt.path if job.ckpt.path and hf.is_dir(job.ckpt.path) else None)
    except hf.NotRepresentable as e:
        staging.discard_one(out)
        if fallback is None:
            raise UsageError(f"--out {out}: a Hugging Face directory cannot hold this result ({e}); write "
                             f"--out {Path(out).name}.safetensors (prunetool's own file)") from None
        notes.append(f"written as prunetool's own file {fallback}, not as a Hugging Face directory: {e}; load it "
                     "with prunetool.load (from_pretrained cannot)")
        return fallback, None, small
    Path(tmp, "prunetool.json").write_text(json.dumps(record, indent=2) + "\n")
    reloaded = hf.read_back(tmp, job.ckpt)  # in the saved dtypes, computed in float32 as ``small`` is
    back = outputs_of(reloaded, job.probe)
    if not torch.equal(back, expected):
        raise VerificationError(f"the Hugging Face directory reloads with different outputs (max abs diff "
                                f"{(back - expected).abs().max().item():.3g})")
    return out, sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")), reloaded


def _scratch(fmt: str) -> str:
    """A temporary file to write a model to when it is not kept (only its size and reload are wanted)."""
    fd, path = tempfile.mkstemp(prefix="prunetool-", suffix=fmt)
    os.close(fd)
    return path


def _file_size(model: nn.Module, arch, arch_kwargs, dtypes) -> int:
    """The size of ``model`` in prunetool's file (a module handed in has no file to measure)."""
    path = _scratch(DEFAULT_FORMAT)
    try:
        return write_file(path, model, arch, arch_kwargs, dtypes=dtypes)
    finally:
        os.unlink(path)


def finish(job: Job, command: str, small: nn.Module, settings: dict, layers: list, checks: dict, *, factored: dict,
           outputs: Outputs, staging: Staging, measurement: Measurement, bars: Bars, extra: dict | None = None) -> dict:
    """The end every command shares (see the module docstring). Files go to ``staging``; the caller commits."""
    ckpt = job.ckpt
    record = {"command": command, **settings, "layers": layers, "factored": factored, "source_sha256": ckpt.sha256,
              "input_shape": list(job.input_shape), "source": ckpt.path, "prunetool_version": __version__,
              "history": ckpt.record.get("history", []) + [{"command": command, **settings}]}
    if not isinstance(job.probe, torch.Tensor):
        record["inputs"] = "tokens" if job.data.train is None or isinstance(job.data.train, TokenDataset) else "named"
    probe = job.probe
    small.cpu()
    trim_heap()
    round_through(small, ckpt.dtypes)
    small.eval()
    expected = outputs_of(small, probe)
    out, notes, weights_bytes, measured = outputs.out, [], None, small
    hf_dir = out is not None and hf.is_hf(ckpt) and not out.endswith(FILE_SUFFIXES)
    if hf_dir:  # out becomes the fallback file when the family's config cannot hold the cut
        out, weights_bytes, measured = _write_hf(job, small, record, out, outputs.out_fallback, staging, expected,
                                                 notes)
        hf_dir = out == outputs.out
    # a directory was read back above: prunetool's own file is neither written nor checked
    file_bytes = None
    kwargs = ckpt.arch_kwargs
    if hf.is_hf(ckpt) and isinstance(kwargs.get("config"), dict):  # whole layers removed, a narrower stream
        kwargs = {**kwargs, "config": hf.with_structure(small, kwargs["config"])}
    if not hf_dir:  # written straight from the model's tensors (no copy of them in memory), then read back
        staged = out is not None and distributed.is_main()
        fmt = format_of(out if out is not None else DEFAULT_FORMAT)
        target = staging.path(out) if staged else _scratch(fmt)
        try:
            file_bytes = write_file(target, small, ckpt.arch, kwargs, record, ckpt.dtypes, ckpt.arch_root)
            if ckpt.arch is not None or out is not None:
                checks["reload"] = check_reload(target, probe, expected, ckpt.arch, kwargs,
                                                reuse=small.state_dict())
        finally:
            if not staged:
                os.unlink(target)
        if checks.get("reload", "identical") != "identical":
            notes.append(f"the file reloads only given --arch {ckpt.arch}: no signing key could be kept at "
                         f"{trust.key_path()} (set {trust.KEY_ENV} to a writable file)")
    if any(d in (torch.float16, torch.bfloat16) for d in ckpt.dtypes.values()):
        checks["reload_compared"] = (f"{file_dtype(job)} weights as saved, computed in float32 on both sides "
                                     "(like with like: no tolerance needed)")
    if hf_dir:
        checks["reload"] = checks["reload_from_pretrained"] = "identical"
    report = {
        "command": command,
        "settings": {**settings, "calib": len(job.calib), "eval": job.eval, "data": job.data.spec,
                     "input_shape": list(job.input_shape), "device": measurement.device, "source": ckpt.path,
                     "out": out, "out_format": "huggingface" if hf_dir else format_of(out or DEFAULT_FORMAT),
                     "dtype": {"file": file_dtype(job), "computed": job.computed_in},
                     "prunetool_version": __version__},
        "layers": layers, **(extra or {}), "verify": checks,
    }
    if notes:
        report["notes"] = notes
    main = distributed.is_main()
    if outputs.onnx is not None and main:
        report["onnx"] = export_onnx(small, probe, staging.path(outputs.onnx), outputs.atol, outputs.rtol,
                                     latency_batches=measurement.latency_batches, shown_as=outputs.onnx,
                                     output_key=job.settings.output_key)
    if outputs.pt2 is not None and main:
        report["pt2"] = export_pt2(small, probe, staging.path(outputs.pt2), outputs.atol, outputs.rtol,
                                   shown_as=outputs.pt2, output_key=job.settings.output_key)
    loader = eval_loader(job.data, job.eval) if measurement.evaluate else None
    before_bytes = ckpt.file_bytes or _file_size(job.dense, ckpt.arch, ckpt.arch_kwargs, ckpt.dtypes)
    okey = job.settings.output_key
    report["before"] = snapshot(job.dense, before_bytes, loader, job.example, measurement, bars, "evaluating dense",
                                okey)
    report["after"] = snapshot(measured, weights_bytes if hf_dir else file_bytes, loader, job.example, measurement,
                               bars, f"evaluating {command} output", okey)
    if measurement.latency_batches:
        measure_latency(report, job.dense, measured, job.example, measurement, bars, measurement.gate_batch)
    report["memory"] = {**(job.memory or {}), "peak_bytes": memory.peak()}
    report["metric"] = metric_summary(report["before"], report["after"])
    if report["metric"]["before"] is None and measurement.evaluate:  # no labelled test data: against the dense model
        report["fidelity"] = fidelity_of(job, measured, measurement)
        f = report["fidelity"]
        report["metric"] = {"name": f["metric"], "before": f["perfect"], "after": f["value"],
                            "drop": task.drop(f["metric"], f["perfect"], f["value"]),
                            "unit": task.drop_unit(f["metric"]), "against": "dense"}
    report["accuracy_drop"] = report["metric"]["drop"] if report["metric"]["name"] == "accuracy" else None
    return report
