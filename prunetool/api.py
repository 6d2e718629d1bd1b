"""The Python API: ``shrink`` runs load → trace → score → cut → verify → measure, like the CLI."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .cut import COMPENSATIONS, cut, select, sequential_means
from .data import Data, calibration, eval_loader, load_data
from .errors import UsageError
from .load import Checkpoint, check_writable, load, serialize, write_atomic
from .measure import evaluate, latency, macs, params
from .progress import Bars
from .score import CRITERIA, DATA_CRITERIA, Scores, score
from .trace import trace
from .verify import check_forward, check_reload

DEFAULT_CRITERION = "mrs"
DEFAULT_COMPENSATION = "lstsq"
LATENCY_BATCHES = (1, 32)


def default_out(path: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.shrunk.pt"))


def check_settings(criterion: str, ratio: float, compensate: str) -> None:
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if compensate not in COMPENSATIONS:
        raise UsageError(f"unknown compensation {compensate!r}; choose one of {', '.join(COMPENSATIONS)}")
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio {ratio} is outside [0, 1); give the fraction of units to remove, e.g. 0.5")


def _as_checkpoint(model, arch, arch_kwargs, unsafe_pickle) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    if isinstance(model, nn.Module):
        return Checkpoint(model.eval(), arch, arch_kwargs or {})
    return load(model, arch, arch_kwargs, unsafe_pickle)


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


def shrink(model: nn.Module | Checkpoint | str, data: Data | str | None = None, criterion: str = DEFAULT_CRITERION,
           ratio: float = 0.5, compensate: str = DEFAULT_COMPENSATION, *, calib: int = 1000,
           eval: int | None = None, input_shape: tuple[int, ...] | None = None, device: str = "cpu",
           out: str | None = None, arch: str | None = None, arch_kwargs: dict | None = None,
           unsafe_pickle: bool = False, download: bool = False, progress: bool = False,
           latency_batches: tuple[int, ...] = LATENCY_BATCHES, scores: Scores | None = None,
           measure: bool = True) -> tuple[nn.Module, dict]:
    """Remove ``floor(ratio·n)`` units from every prunable hidden layer, compensate, verify and measure.

    ``model`` is an ``nn.Module``, a :class:`Checkpoint` or a checkpoint path. Returns the smaller
    model and a report dict (the CLI's ``--json``). With ``out`` the model is saved there atomically
    and the saved file is checked to reload to identical outputs.
    """
    check_settings(criterion, ratio, compensate)
    ckpt = _as_checkpoint(model, arch, arch_kwargs, unsafe_pickle)
    if out is not None:
        check_writable(out, ckpt.path)
    bars = Bars(progress)
    if not isinstance(data, Data):
        data = load_data(data, download, input_shape)
    dense = ckpt.model.eval()
    x, y = calibration(data, calib, input_shape, dense)
    input_shape = tuple(x.shape[1:])
    graph = trace(dense, x[:2])
    if not data.has_labels and criterion in DATA_CRITERIA:
        warnings.warn(f"no --data: {criterion} scores come from random inputs labelled by the model itself")

    dense.to(device)
    if scores is None:
        scores = score(dense, graph, criterion, x.to(device), y.to(device), bars)
    dense.to("cpu")
    scores = Scores(scores.criterion, {k: v.cpu() for k, v in scores.scores.items()},
                    {g: {c: m.cpu() for c, m in per.items()} for g, per in scores.means.items()})
    keep = select(graph, scores.scores, ratio)
    means = sequential_means(dense, graph, keep, x, bars) if compensate == "mean" else scores.means
    small = cut(copy.deepcopy(dense), graph, keep, compensate, means, x, bars).eval()
    probe = x[: min(len(x), 64)]
    expected = check_forward(small, probe, graph.output_shape)

    layers = [{"name": g.name, "units_before": g.units, "units_after": len(keep[g.name])} for g in graph.groups]
    record = {
        "command": "shrink", "criterion": criterion, "ratio": ratio, "compensation": compensate,
        "layers": layers, "source_sha256": ckpt.sha256, "source": ckpt.path,
        "prunetool_version": __version__, "history": ckpt.record.get("history", []) + [
            {"command": "shrink", "criterion": criterion, "ratio": ratio, "compensation": compensate}],
    }
    blob = serialize(small, ckpt.arch, ckpt.arch_kwargs, record)
    if ckpt.arch is not None or out is not None:
        check_reload(blob, probe, expected)
    if out is not None:
        write_atomic(out, blob)

    report = {
        "command": "shrink",
        "settings": {"criterion": criterion, "ratio": ratio, "compensation": compensate, "calib": len(x),
                     "eval": eval, "data": data.spec, "input_shape": list(input_shape), "device": device,
                     "source": ckpt.path, "out": out, "prunetool_version": __version__},
        "layers": layers,
        "protected": [{"name": p.name, "reason": p.reason} for p in graph.protected],
    }
    if measure:
        loader = eval_loader(data, eval)
        before_bytes = ckpt.file_bytes or len(serialize(dense, ckpt.arch, ckpt.arch_kwargs))
        report["before"] = _snapshot(dense, before_bytes, loader, input_shape, device, bars, "evaluating dense",
                                     latency_batches)
        report["after"] = _snapshot(small, len(blob), loader, input_shape, device, bars, "evaluating shrunk",
                                    latency_batches)
        acc_b, acc_a = report["before"]["accuracy"], report["after"]["accuracy"]
        report["accuracy_drop"] = None if acc_b is None else acc_b - acc_a
    return small, report
