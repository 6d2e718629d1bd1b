"""Score stage: one number per unit, low = removed first (formulas in METHOD.md).

``a_i`` is what the consumer reads from unit i. For a conv consumer the unit mean is one scalar
per channel; when a conv output is flattened into a Linear, each flattened position keeps its own
mean (the compensation that goes with it is then exact).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .progress import QUIET, Bars
from .trace import Group, Trace

CRITERIA = ("mrs", "mrp", "taylor", "l1", "l2", "fp", "random")
DATA_CRITERIA = ("mrs", "mrp", "taylor")
BATCH = 256


@dataclass
class Scores:
    """Per-group unit scores and the unit means (shape units × positions) that compensation uses."""

    criterion: str
    scores: dict[str, torch.Tensor]
    means: dict[str, torch.Tensor]


def unit_view(x: torch.Tensor, group: Group) -> torch.Tensor:
    """A consumer's input as (batch, units, positions)."""
    if isinstance(group.consumers[0].module, nn.Conv2d):
        return x.reshape(x.shape[0], group.units, -1)
    if group.consumers[0].spatial > 1:
        return x.reshape(x.shape[0], group.units, -1)
    return x.movedim(-1, 1).reshape(x.shape[0], group.units, -1)


def from_unit_view(a: torch.Tensor, group: Group, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`unit_view`."""
    if isinstance(group.consumers[0].module, nn.Conv2d) or group.consumers[0].spatial > 1:
        return a.reshape(shape)
    return a.reshape(shape[0], group.units, *shape[1:-1]).movedim(1, -1)


def per_position(group: Group) -> bool:
    return group.consumers[0].spatial > 1


def _batches(x: torch.Tensor, y: torch.Tensor):
    return list(zip(x.split(BATCH), y.split(BATCH)))


@contextmanager
def _hooks(model: nn.Module, trace: Trace, on_input):
    modules = dict(model.named_modules())
    handles = []
    for g in trace.groups:
        def pre(module, args, g=g):
            return on_input(g, args)
        handles.append(modules[g.consumers[0].name].register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _reduce_positions(a: torch.Tensor, group: Group) -> torch.Tensor:
    return a if per_position(group) else a.sum(2, keepdim=True)


def unit_means(model: nn.Module, trace: Trace, x: torch.Tensor, bars: Bars = QUIET) -> dict[str, torch.Tensor]:
    """Dataset means of every unit as its consumer reads it, over all of ``x``."""
    sums, counts = {}, {}

    def on_input(g, args):
        a = unit_view(args[0].detach(), g).double()
        s = a.sum(0)
        sums[g.name] = sums.get(g.name, 0) + (s if per_position(g) else s.sum(1, keepdim=True))
        counts[g.name] = counts.get(g.name, 0) + (a.shape[0] if per_position(g) else a.shape[0] * a.shape[2])

    with torch.no_grad(), _hooks(model, trace, on_input):
        for xb in bars.track(x.split(BATCH), "unit means"):
            model(xb)
    return {k: (sums[k] / counts[k]).float() for k in sums}


def _gradient_pass(model, trace, x, y, bars: Bars):
    """One forward+backward per batch; keeps per-sample sums so MRS needs no second pass for the mean."""
    sums, counts, grads, dots = {}, {}, {}, {}

    def on_input(g, args):
        a = args[0]
        if not a.requires_grad:
            a = a.detach().requires_grad_()
        view = unit_view(a.detach(), g)
        s = view.double().sum(0)
        sums[g.name] = sums.get(g.name, 0) + (s if per_position(g) else s.sum(1, keepdim=True))
        counts[g.name] = counts.get(g.name, 0) + (view.shape[0] if per_position(g) else view.shape[0] * view.shape[2])

        def on_grad(grad, g=g, view=view):
            gv = unit_view(grad, g)
            grads.setdefault(g.name, []).append(_reduce_positions(gv, g).double())
            dots.setdefault(g.name, []).append((view * gv).sum(2).double())

        a.register_hook(on_grad)
        return (a, *args[1:])

    with _hooks(model, trace, on_input):
        for xb, yb in bars.track(_batches(x, y), "scoring (forward+backward)"):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    means = {k: sums[k] / counts[k] for k in sums}
    return means, {k: torch.cat(v) for k, v in grads.items()}, {k: torch.cat(v) for k, v in dots.items()}


def mrs(model, trace, x, y, bars: Bars = QUIET) -> Scores:
    means, grads, dots = _gradient_pass(model, trace, x, y, bars)
    scores = {k: ((grads[k] * means[k]).sum(2) - dots[k]).abs().sum(0).float() for k in means}
    return Scores("mrs", scores, {k: v.float() for k, v in means.items()})


def taylor(model, trace, x, y, bars: Bars = QUIET) -> Scores:
    means, _, dots = _gradient_pass(model, trace, x, y, bars)
    return Scores("taylor", {k: v.abs().sum(0).float() for k, v in dots.items()}, {k: v.float() for k, v in means.items()})


def _losses(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.cross_entropy(model(xb), yb, reduction="none") for xb, yb in _batches(x, y)])


def mrp(model, trace, x, y, bars: Bars = QUIET) -> Scores:
    """Exact: the loss change when each unit alone is replaced by its mean. One forward pass per unit."""
    means = unit_means(model, trace, x)
    base = _losses(model, x, y)
    modules = dict(model.named_modules())
    scores = {}
    jobs = [(g, i) for g in trace.groups for i in range(g.units)]
    for g in trace.groups:
        scores[g.name] = torch.zeros(g.units)
    for g, i in bars.track(jobs, "MRP (one forward per unit)"):
        def pre(module, args, g=g, i=i):
            a = unit_view(args[0].clone(), g)
            a[:, i, :] = means[g.name][i]
            return (from_unit_view(a, g, args[0].shape),)
        handle = modules[g.consumers[0].name].register_forward_pre_hook(pre)
        try:
            scores[g.name][i] = (_losses(model, x, y) - base).abs().sum()
        finally:
            handle.remove()
    return Scores("mrp", scores, means)


def _rows(group: Group) -> torch.Tensor:
    return group.producer.weight.detach().reshape(group.units, -1)


def frame_potential_order(w: torch.Tensor) -> torch.Tensor:
    """Greedy removal order by frame-potential contribution, updated in closed form after each removal."""
    w = F.normalize(w.double(), dim=1)
    gram2 = (w @ w.T) ** 2
    contrib = gram2.sum(1)
    alive = torch.ones(len(w), dtype=torch.bool)
    order = torch.empty(len(w))
    for step in range(len(w)):
        i = int(torch.where(alive, contrib, torch.inf).argmin())
        order[i] = step
        alive[i] = False
        contrib -= gram2[:, i]
    return order


def weight_scores(trace: Trace, criterion: str) -> dict[str, torch.Tensor]:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for g in trace.groups:
        if criterion == "l1":
            out[g.name] = _rows(g).abs().sum(1)
        elif criterion == "l2":
            out[g.name] = _rows(g).norm(dim=1)
        elif criterion == "fp":
            out[g.name] = frame_potential_order(_rows(g))
        elif criterion == "random":
            out[g.name] = torch.rand(g.units, generator=gen)
    return out


def score(model: nn.Module, trace: Trace, criterion: str, x: torch.Tensor, y: torch.Tensor,
          bars: Bars = QUIET) -> Scores:
    """Score every unit of every group with ``criterion`` on calibration data ``x, y``."""
    model.eval()
    if criterion == "mrs":
        return mrs(model, trace, x, y, bars)
    if criterion == "taylor":
        return taylor(model, trace, x, y, bars)
    if criterion == "mrp":
        return mrp(model, trace, x, y, bars)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}")
    return Scores(criterion, weight_scores(trace, criterion), unit_means(model, trace, x, bars))
