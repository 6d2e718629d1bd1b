"""The Python API: ``shrink`` runs load → trace → score → cut → verify → measure, like the CLI;
``plan`` is its dry run."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import __version__, distributed
from .cut import COMPENSATIONS, cut, global_ratios, n_removed, select, sequential_means
from .data import Data, calibration, eval_loader, load_data
from .errors import UsageError
from .export import export_onnx
from .load import Checkpoint, check_writable, format_of, load, serialize, write_atomic
from .measure import evaluate, latency, macs, params
from .progress import Bars
from .recover import finetune, has_batchnorm, recalibrate_bn
from .score import CRITERIA, DATA_CRITERIA, Scores, score
from .trace import Trace, trace
from .verify import check_reload, verify

DEFAULT_CRITERION = "mrs"
DEFAULT_COMPENSATION = "lstsq"
LATENCY_BATCHES = (1, 32)
SCOPES = ("layer", "global")
DRY_RUN_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def check_settings(criterion: str, ratio: float, compensate: str, scope: str = "layer",
                   max_layer_ratio: float = 0.9, target_params: float | None = None,
                   target_macs: float | None = None, round_to: int = 1) -> None:
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if compensate not in COMPENSATIONS:
        raise UsageError(f"unknown compensation {compensate!r}; choose one of {', '.join(COMPENSATIONS)}")
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio {ratio} is outside [0, 1); give the fraction of units to remove, e.g. 0.5")
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}; choose layer or global")
    if not 0.0 < max_layer_ratio < 1.0:
        raise UsageError(f"--max-layer-ratio {max_layer_ratio} is outside (0, 1)")
    for flag, value in (("--target-params", target_params), ("--target-macs", target_macs)):
        if value is not None and not 0.0 < value <= 1.0:
            raise UsageError(f"{flag} {value} is outside (0, 1]; give the fraction of the original to keep, e.g. 0.5")
    if target_params is not None and target_macs is not None:
        raise UsageError("give one of --target-params and --target-macs, not both")
    if round_to < 1:
        raise UsageError(f"--round-to {round_to} must be a positive integer")


@dataclass
class _Job:
    ckpt: Checkpoint
    data: Data
    dense: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    graph: Trace


def _as_checkpoint(model, arch, arch_kwargs, unsafe_pickle) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    if isinstance(model, nn.Module):
        return Checkpoint(model.eval(), arch, arch_kwargs or {})
    return load(model, arch, arch_kwargs, unsafe_pickle)


def _prepare(model, data, calib, input_shape, arch, arch_kwargs, unsafe_pickle, download) -> _Job:
    ckpt = _as_checkpoint(model, arch, arch_kwargs, unsafe_pickle)
    if not isinstance(data, Data):
        data = load_data(data, download, input_shape)
    dense = ckpt.model.eval()
    x, y = calibration(data, calib, input_shape, dense if data.train is None and input_shape else None)
    return _Job(ckpt, data, dense, x, y, trace(dense, x[:2]))


def _keep(graph, scores, ratio, scope, max_layer_ratio, round_to):
    per_group = global_ratios(graph, scores, ratio, max_layer_ratio) if scope == "global" else ratio
    return select(graph, scores, per_group, round_to)


def _structure(dense, graph, keep, input_shape) -> tuple[int, int]:
    small = cut(copy.deepcopy(dense), graph, keep, "none")
    return params(small), macs(small, input_shape)


def fit_target(dense, graph, scores, scope, max_layer_ratio, round_to, metric: str, fraction: float,
               input_shape) -> float:
    """The smallest ratio whose cut keeps at most ``fraction`` of the original parameters or MACs."""
    index = 0 if metric == "params" else 1
    goal = fraction * (params(dense), macs(dense, input_shape))[index]

    def size(r):
        return _structure(dense, graph, _keep(graph, scores, r, scope, max_layer_ratio, round_to), input_shape)[index]

    lo, hi = 0.0, 0.99
    if size(hi) > goal:
        raise UsageError(f"--target-{metric} {fraction} cannot be reached: ratio 0.99 still keeps "
                         f"{size(hi) / (goal / fraction):.3f} of the {metric} (protected layers stay whole)")
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(mid) <= goal else (mid, hi)
    return round(hi, 4)


def plan(model, data=None, *, criterion: str = "l2", scope: str = "layer", max_layer_ratio: float = 0.9,
         round_to: int = 1, calib: int = 256, input_shape=None, arch=None, arch_kwargs=None,
         unsafe_pickle=False, download=False, ratios=DRY_RUN_RATIOS) -> dict:
    """The dry run: groups found, what is protected and why, and the size each ratio would give."""
    job = _prepare(model, data, calib, input_shape, arch, arch_kwargs, unsafe_pickle, download)
    input_shape = tuple(job.x.shape[1:])
    if scope == "global":
        scores = score(job.dense, job.graph, criterion, job.x, job.y).scores
    else:
        scores = {g.name: torch.zeros(g.units) for g in job.graph.groups}
    base = (params(job.dense), macs(job.dense, input_shape))
    rows = []
    for r in ratios:
        p, m = _structure(job.dense, job.graph, _keep(job.graph, scores, r, scope, max_layer_ratio, round_to),
                          input_shape)
        rows.append({"ratio": r, "params": p, "macs": m, "params_fraction": p / base[0], "macs_fraction": m / base[1]})
    return {
        "command": "dry-run", "params": base[0], "macs": base[1], "input_shape": list(input_shape),
        "groups": [{"name": g.name, "units": g.units, "producers": [p.name for p in g.producers],
                    "consumers": [c.name for c in g.consumers], "members": [m.name for m in g.members],
                    "blocks": g.blocks} for g in job.graph.groups],
        "protected": [{"name": p.name, "reason": p.reason} for p in job.graph.protected],
        "ratios": rows, "settings": {"scope": scope, "round_to": round_to, "criterion": criterion},
    }


def _snapshot(model, file_bytes, loader, input_shape, device, bars, label, latency_batches) -> dict:
    model.to(device)
    accuracy, loss = evaluate(model, loader, device, bars, label)
    snap = {
        "params": params(model),
        "macs": macs(model, input_shape),
        "file_bytes": file_bytes,
        "accuracy": accuracy,
        "loss": loss,
        "latency_ms": {str(b): latency(model, input_shape, b, device) for b in latency_batches},
    }
    model.to("cpu")
    return snap


def conclude(job: _Job, command: str, small: nn.Module, settings: dict, layers: list, checks: dict,
             probe: torch.Tensor, expected: torch.Tensor, *, factored: dict, out: str | None, eval: int | None,
             device: str, bars: Bars, latency_batches, measure: bool, extra: dict | None = None,
             onnx: str | None = None) -> dict:
    """The end every command shares: record what was done, save atomically after the reload check, export
    and check ONNX, measure before and after, and build the report."""
    ckpt = job.ckpt
    record = {"command": command, **settings, "layers": layers, "factored": factored, "source_sha256": ckpt.sha256,
              "input_shape": list(job.x.shape[1:]),
              "source": ckpt.path, "prunetool_version": __version__,
              "history": ckpt.record.get("history", []) + [{"command": command, **settings}]}
    blob = serialize(small, ckpt.arch, ckpt.arch_kwargs, record, ckpt.dtypes, format_of(out or ".pt"), ckpt.arch_root)
    if ckpt.arch is not None or out is not None:
        check_reload(blob, probe, expected)
        checks["reload"] = "identical"
    if out is not None and distributed.is_main():
        write_atomic(out, blob)
    shape = tuple(job.x.shape[1:])
    report = {
        "command": command,
        "settings": {**settings, "calib": len(job.x), "eval": eval, "data": job.data.spec, "input_shape": list(shape),
                     "device": device, "source": ckpt.path, "out": out, "prunetool_version": __version__},
        "layers": layers, **(extra or {}), "verify": checks,
    }
    if onnx is not None and distributed.is_main():
        report["onnx"] = export_onnx(small, probe, onnx, latency_batches=latency_batches)
    if measure:
        loader = eval_loader(job.data, eval)
        before_bytes = ckpt.file_bytes or len(serialize(job.dense, ckpt.arch, ckpt.arch_kwargs))
        report["before"] = _snapshot(job.dense, before_bytes, loader, shape, device, bars, "evaluating dense",
                                     latency_batches)
        report["after"] = _snapshot(small, len(blob), loader, shape, device, bars, f"evaluating {command} output",
                                    latency_batches)
        acc_b, acc_a = report["before"]["accuracy"], report["after"]["accuracy"]
        report["accuracy_drop"] = None if acc_b is None else acc_b - acc_a
    return report


def _scores_cpu(scores: Scores) -> Scores:
    return Scores(scores.criterion, {k: v.cpu() for k, v in scores.scores.items()},
                  {g: {c: m.cpu() for c, m in per.items()} for g, per in scores.means.items()})


def shrink(model: nn.Module | Checkpoint | str, data: Data | str | None = None, criterion: str = DEFAULT_CRITERION,
           ratio: float = 0.5, compensate: str = DEFAULT_COMPENSATION, *, calib: int = 1000,
           eval: int | None = None, input_shape: tuple[int, ...] | None = None, device: str = "cpu",
           out: str | None = None, arch: str | None = None, arch_kwargs: dict | None = None,
           unsafe_pickle: bool = False, download: bool = False, progress: bool = False,
           scope: str = "layer", max_layer_ratio: float = 0.9, target_params: float | None = None,
           target_macs: float | None = None, round_to: int = 1,
           latency_batches: tuple[int, ...] = LATENCY_BATCHES, scores: Scores | None = None,
           measure: bool = True, onnx: str | None = None, schedule: list[float] | None = None,
           recalibrate: bool | None = None, finetune_epochs: int = 0, lr: float = 1e-3, batch_size: int = 128,
           optimizer: str = "adam", distill: bool = False) -> tuple[nn.Module, dict]:
    """Remove units from every prunable group, compensate, verify, recover and measure.

    ``model`` is an ``nn.Module``, a :class:`Checkpoint` or a checkpoint path. With ``scope="layer"``
    every group loses ``floor(ratio·n)`` units; with ``"global"`` ``ratio`` of all units go, ranked across
    groups. ``target_params``/``target_macs`` (fractions of the original) pick the ratio instead.
    ``schedule`` (cumulative ratios, e.g. ``[0.1, 0.2, 0.4, 0.6]``) prunes step by step, re-scoring at each
    step, with ``finetune_epochs`` of training after every step. BatchNorm statistics are recalibrated on
    the calibration data after every cut (``recalibrate=None``: when the model has BatchNorm).
    Returns the smaller model and a report dict (the CLI's ``--json``). With ``out`` the model is saved
    there atomically and the saved file is checked to reload to identical outputs.
    """
    check_settings(criterion, ratio, compensate, scope, max_layer_ratio, target_params, target_macs, round_to)
    steps = list(schedule) if schedule else [ratio]
    if any(not 0.0 <= r < 1.0 for r in steps) or steps != sorted(steps):
        raise UsageError(f"--schedule {','.join(map(str, steps))} must be increasing ratios in [0, 1)")
    if distill and finetune_epochs < 1:
        raise UsageError("--distill needs --finetune-epochs N")
    if out is not None and not isinstance(model, (nn.Module, Checkpoint)):
        check_writable(out, str(model))
    bars = Bars(progress)
    job = _prepare(model, data, calib, input_shape, arch, arch_kwargs, unsafe_pickle, download)
    ckpt, dense, x, y, graph = job.ckpt, job.dense, job.x, job.y, job.graph
    input_shape = tuple(x.shape[1:])
    if not graph.groups:
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in graph.protected[:2])
        raise UsageError(f"nothing to prune: every layer is protected ({reasons}); see --dry-run for the reasons")
    if finetune_epochs and not job.data.has_labels:
        raise UsageError("--finetune-epochs needs --data with a train split")
    if not job.data.has_labels and criterion in DATA_CRITERIA:
        warnings.warn(f"no --data: {criterion} scores come from random inputs labelled by the model itself")
    recalibrate = has_batchnorm(dense) if recalibrate is None else recalibrate
    loader = eval_loader(job.data, eval) if measure else None
    original = {g.name: g.units for g in graph.groups}

    current, history = dense, []
    for step, step_ratio in enumerate(steps):
        if step:
            graph = trace(current, x[:2])
        current.to(device)
        if scores is None or step:
            scores = score(current, graph, criterion, x.to(device), y.to(device), bars)
        current.to("cpu")
        scores = _scores_cpu(scores)
        if step == 0 and (target_params is not None or target_macs is not None):
            metric, fraction = ("params", target_params) if target_params is not None else ("macs", target_macs)
            step_ratio = ratio = fit_target(dense, graph, scores.scores, scope, max_layer_ratio, round_to, metric,
                                            fraction, input_shape)
        if schedule:  # cumulative: each group ends the step with n₀ − floor(r·n₀) units
            per_group = {g.name: (g.units - (original[g.name] - n_removed(original[g.name], step_ratio))) / g.units
                         for g in graph.groups}
            keep = select(graph, scores.scores, per_group, round_to)
        else:
            keep = _keep(graph, scores.scores, step_ratio, scope, max_layer_ratio, round_to)
        means = sequential_means(current, graph, keep, x, bars) if compensate == "mean" else scores.means
        small = cut(copy.deepcopy(current), graph, keep, compensate, means, x, bars).eval()
        probe = x[: min(len(x), 64)]
        checks = verify(current, small, graph, keep, probe)
        if recalibrate and any(len(keep[g.name]) < g.units for g in graph.groups):
            recalibrate_bn(small, x)
        entry = {"ratio": step_ratio, "params": params(small)}
        if loader is not None and (finetune_epochs or len(steps) > 1):
            entry["accuracy_after_cut"] = evaluate(small, loader, device, bars, "evaluating the cut")[0]
        if finetune_epochs:
            entry["finetune_loss"] = finetune(small, job.data, finetune_epochs, lr, batch_size, optimizer,
                                              dense if distill else None, device, bars)
            if loader is not None:
                entry["accuracy_after_finetune"] = evaluate(small, loader, device, bars, "evaluating")[0]
        history.append(entry)
        current = small
    with torch.no_grad():
        expected = current(probe)
    checks.pop("outputs")

    layers = [{"name": g.name, "units_before": original.get(g.name, g.units), "units_after": len(keep[g.name]),
               "producers": [p.name for p in g.producers]} for g in graph.groups]
    settings = {"criterion": criterion, "ratio": ratio, "compensation": compensate, "scope": scope,
                "max_layer_ratio": max_layer_ratio, "target_params": target_params, "target_macs": target_macs,
                "round_to": round_to, "schedule": schedule, "recalibrate_bn": recalibrate,
                "finetune_epochs": finetune_epochs, "lr": lr, "batch_size": batch_size, "optimizer": optimizer,
                "distill": distill}
    protected = [{"name": p.name, "reason": p.reason} for p in job.graph.protected]
    extra = {"protected": protected}
    if finetune_epochs or len(steps) > 1:
        extra["steps"] = history
    report = conclude(job, "shrink", current, settings, layers, checks, probe, expected,
                      factored=ckpt.record.get("factored", {}), out=out, eval=eval, device=device, bars=bars,
                      latency_batches=latency_batches, measure=measure, extra=extra, onnx=onnx)
    return current, report
