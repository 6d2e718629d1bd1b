"""Score stage: one number per unit, low = removed first (formulas in docs/METHOD.md).

A unit's mean is what a consumer reads of it (:mod:`prunetool.units`) averaged over samples and positions, so
replacing a unit by its mean is exact for a unit that is constant. A group read by several consumers (coupled
channels) is scored as one unit of removal: the first-order loss changes at all its consumers are added per
sample *before* the absolute value, because the unit disappears from all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import calls, task
from .batch import batch_to, call, model_dtype
from .calibrate import Settings, statistics
from .data import Samples, as_samples
from .distributed import reduce_sum
from .options import CRITERIA
from .progress import QUIET, Bars
from .store import batch_size
from .trace import Group, Trace
from .units import Means, consumer_hooks, input_columns, mean_of, readers, replace_units, unit_view


@dataclass
class Scores:
    """Per-group unit scores and the unit means each consumer reads, which compensation uses."""

    criterion: str
    scores: dict[str, torch.Tensor]
    means: Means


def unit_means(model: nn.Module, trace: Trace, samples, bars: Bars = QUIET, groups: list[Group] | None = None,
               settings=None) -> Means:
    """Dataset means of every unit as each consumer reads it, over all of ``samples`` (a :class:`Samples` or a
    tensor of inputs)."""
    return statistics(model, trace, as_samples(samples), settings or Settings(), bars, groups=groups).means


def _first_order(model, trace, samples: Samples, means: Means, use_mean: bool, settings, bars: Bars,
                 label: str) -> dict[str, torch.Tensor]:
    """One forward+backward per batch, differentiating activations only. For each sample and unit, the
    first-order loss change of replacing what every consumer reads of the unit by its mean (``use_mean``) or by
    zero, summed over the group's consumers, then its absolute value summed over samples: memory in
    O(batch × units), whatever the number of samples."""
    scores = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in trace.groups}
    changes: dict[str, torch.Tensor] = {}

    def on_input(a, read):
        # A view of its own per consumer: a tensor read by several layers (a residual stream) must give each
        # consumer the gradient through that consumer alone, not the sum over all of them.
        a = a.view_as(a) if a.requires_grad else a.detach().requires_grad_()

        def on_grad(grad, a=a.detach(), read=read):
            for g, c in read:
                gv, av = unit_view(grad, g, c), unit_view(a, g, c)
                # Σ_p (μ − a_p)·g_p per sample and unit; positions reduced in float32, samples kept in float64
                change = -(av * gv).sum((2, 3)).double()
                if use_mean:
                    mu = mean_of(means, g, c).to(gv.device, gv.dtype)
                    change += (gv.sum(2) * mu).sum(2).double()
                changes[g.name] = changes[g.name] + change if g.name in changes else change

        a.register_hook(on_grad)
        return a

    device = settings.device
    dtype = model_dtype(model)
    size = batch_size(trace, settings, backward=True)
    shard = samples.shard()
    model.eval()
    with calls.activation_gradients(model), consumer_hooks(model, readers(trace), on_input):
        for xb, yb, _ in bars.track(shard.batches(size), label, total=-(-len(shard) // size)):
            changes.clear()
            out = call(model, batch_to(xb, device, dtype), settings.output_key)
            task.loss(out, yb.to(device), "sum").backward()
            for name, change in changes.items():
                scores[name] += change.abs().sum(0).cpu()
    return {k: reduce_sum(v).float() for k, v in scores.items()}


def mrs(model, trace, samples, means: Means, settings, bars: Bars = QUIET) -> Scores:
    """Mean Replacement Saliency: the dataset means come from a forward pass before (:func:`unit_means`)."""
    return Scores("mrs", _first_order(model, trace, as_samples(samples), means, True, settings, bars,
                                      "scoring MRS (forward+backward)"), means)


def taylor(model, trace, samples, means: Means, settings, bars: Bars = QUIET) -> Scores:
    return Scores("taylor", _first_order(model, trace, as_samples(samples), means, False, settings, bars,
                                         "scoring Taylor (forward+backward)"), means)


def _losses(model, samples: Samples, size: int, output_key: str | None = None) -> torch.Tensor:
    dtype = model_dtype(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([task.loss(call(model, batch_to(xb, device, dtype), output_key), yb.to(device), "none")
                          for xb, yb, _ in samples.batches(size)])


def mrp(model, trace, samples, means: Means, settings, bars: Bars = QUIET) -> Scores:
    """Exact: the loss change when each unit alone is replaced by its mean. One forward pass per unit."""
    samples = as_samples(samples).shard()
    size = batch_size(trace, settings)
    base = _losses(model, samples, size, settings.output_key)
    scores = {g.name: torch.zeros(g.units) for g in trace.groups}
    jobs = [(g, i) for g in trace.groups for i in range(g.units)]
    for g, i in bars.track(jobs, "MRP (one forward per unit)"):
        values = {(g.name, c.name, c.offset): ([i], mean_of(means, g, c)[i]) for c in g.consumers}
        with consumer_hooks(model, readers(trace, [g]), lambda a, read: replace_units(a, read, values)):
            scores[g.name][i] = reduce_sum((_losses(model, samples, size, settings.output_key) - base).abs().sum())
    return Scores("mrp", scores, means)


def incoming(group: Group) -> torch.Tensor:
    """Each unit's incoming weights, all coupled producers side by side (units × fan-in)."""
    rows = torch.arange(group.units)
    return torch.cat([getattr(p.module, p.weight).detach().movedim(p.dim, 0)[p.rows(rows)].reshape(group.units, -1)
                      for p in group.producers], 1)


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
            out[g.name] = incoming(g).abs().sum(1)
        elif criterion == "l2":
            out[g.name] = incoming(g).norm(dim=1)
        elif criterion == "fp":
            out[g.name] = frame_potential_order(incoming(g))
        elif criterion == "random":
            out[g.name] = torch.rand(g.units, generator=gen)
    return out


def score(model: nn.Module, trace: Trace, criterion: str, samples, y: torch.Tensor | None = None,
          bars: Bars = QUIET, means: Means | None = None, settings=None) -> Scores:
    """Score every unit of every group with ``criterion`` on calibration ``samples`` (a :class:`Samples`, or a
    tensor of inputs with labels ``y``). ``means`` (from the statistics pass) are measured when not given."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}")
    settings = settings or Settings()
    samples = as_samples(samples, y)
    model.eval()
    if means is None:
        means = unit_means(model, trace, samples, bars, settings=settings)
    if criterion == "mrs":
        return mrs(model, trace, samples, means, settings, bars)
    if criterion == "taylor":
        return taylor(model, trace, samples, means, settings, bars)
    if criterion == "mrp":
        return mrp(model, trace, samples, means, settings, bars)
    return Scores(criterion, weight_scores(trace, criterion), means)


# --- weights, for iterative magnitude pruning (seed 004) ----------------------------------------------------

def magnitude_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor], fraction: float) -> None:
    """Drop ``fraction`` of each layer's remaining weights, smallest magnitude first (ties: lowest index)."""
    for name, module in layers.items():
        alive = torch.nonzero(masks[name].flatten()).flatten()
        k = int(fraction * len(alive))
        if k == 0:
            continue
        order = torch.sort(module.weight.detach().abs().flatten()[alive], stable=True).indices[:k]
        flat = masks[name].flatten().clone()
        flat[alive[order]] = False
        masks[name] = flat.reshape(masks[name].shape)


def removable_units(trace: Trace, model: nn.Module) -> dict[str, torch.Tensor]:
    """Per group, the units kept: those with some incoming weight in a producer and some outgoing weight in a
    consumer (Evci §2.2)."""
    modules = dict(model.named_modules())
    keep = {}
    for g in trace.groups:
        rows = torch.arange(g.units)
        incoming = sum(getattr(modules[p.name], p.weight).detach().movedim(p.dim, 0)[p.rows(rows)]
                       .reshape(g.units, -1).abs().sum(1) for p in g.producers)
        outgoing = torch.zeros(g.units, dtype=torch.float64)
        for c in g.consumers:
            w = getattr(modules[c.name], c.weight).detach().movedim(c.dim, 0)
            cols = input_columns(c, torch.arange(g.units))
            outgoing += w[cols].abs().reshape(len(cols), -1).sum(1).reshape(g.units, -1).sum(1).double()
        alive = (incoming > 0) & (outgoing > 0)
        if not alive.any():
            alive[int(torch.argmax(incoming))] = True  # every group keeps a unit
        keep[g.name] = torch.nonzero(alive).flatten()
    return keep
