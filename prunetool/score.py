"""Score stage: one number per unit, low = removed first (formulas in docs/METHOD.md).

A unit's mean is what a consumer reads of it (:mod:`prunetool.units`) averaged over samples and positions, so
replacing a unit by its mean is exact for a unit that is constant. A group read by several consumers (coupled
channels) is scored as one unit of removal: the first-order loss changes at all its consumers are added per
sample *before* the absolute value, because the unit disappears from all of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import calls, task
from .batch import batch_to, call, model_dtype
from .calibrate import Settings, covariances, statistics
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


OBS_MAX_INPUTS = 6144  # a consumer wider than this (its inverse covariance over 300 MB) leaves its group to mrs
OBS_MAX_WORK = 2e8  # units · inputs² over a group's consumers above which greedy OBS takes minutes: mrs instead
OBS_DAMPING = 1e-2  # relative to the mean variance, added to each consumer's covariance before inverting


def obs(model, trace, samples, means: Means, settings, bars: Bars = QUIET) -> Scores:
    """Compensation-aware scores by greedy structured OBS (as ZipLM, SlimGPT and structured OBC): per group, at
    every step the unit whose removal the least-squares refit of its consumers repairs best goes — the least
    increase of their output error after the refit, ``tr(W_S (H_SS)⁻¹ W_Sᵀ)`` with ``H`` the inverse of the
    consumer's centered input covariance — and each consumer's weights and ``H`` are updated for that removal.
    A unit's score is the error accumulated when it goes (so the lowest go first, in greedy order); the last
    unit scores highest. Groups with a consumer too wide (:data:`OBS_MAX_INPUTS`) or too costly to score
    (:data:`OBS_MAX_WORK`: a ResNet-50's 3×3 convolutions), whose weight is not called
    ``weight`` (a registered layer of its own) or whose design columns are not its units' (a grouped conv) are
    scored by mrs."""
    samples = as_samples(samples)
    modules = dict(model.named_modules())

    def fan_in(c) -> int:
        return c.op.as_matrix(getattr(modules[c.name], c.weight)).shape[1]

    # only the consumers of groups within the cost bound have their covariance collected (a ViT's 3072-wide MLP
    # output would cost a pass for a group scored by mrs anyway)
    affordable = {g.name for g in trace.groups if sum(g.units * fan_in(c) ** 2 for c in g.consumers) <= OBS_MAX_WORK}
    names = sorted({c.name for g in trace.groups if g.name in affordable for c in g.consumers
                    if c.weight == "weight" and fan_in(c) <= OBS_MAX_INPUTS})  # what covariances reads
    covs = covariances(model, names, samples, settings, trace, bars, centered=True) if names else {}
    out, rest = {}, []
    for g in bars.track(trace.groups, "greedy structured OBS"):
        states = [_obs_state(c, modules[c.name], covs.get(c.name), g.units) for c in g.consumers] \
            if g.name in affordable else []
        if not states or any(st is None for st in states):
            rest.append(g)
        else:
            out[g.name] = _greedy_obs(states, g.units)
    if rest:
        out.update(mrs(model, replace(trace, groups=rest), samples, means, settings, bars).scores)
    return Scores("obs", out, means)


def _obs_state(c, module: nn.Module, cov: torch.Tensor | None, units: int):
    """A consumer's (W's columns of the group's units as out × units·b, H = the inverse damped covariance on those
    columns, each unit's columns there as units × b), or None when its covariance does not match its weight's
    columns."""
    weight = getattr(module, c.weight).detach()
    w = c.op.as_matrix(weight).double().cpu()  # out × d: d = input channels × kernel positions
    per = w.shape[1] // weight.shape[c.op.in_dim]  # design columns per input channel (a conv's kernel positions)
    if cov is None or cov.shape[0] != w.shape[1] or (weight.shape[c.op.in_dim] * per != w.shape[1]):
        return None
    channels = torch.stack([input_columns(c, torch.tensor([u])) for u in range(units)])  # units × channels
    cols = (channels[:, :, None] * per + torch.arange(per)).flatten(1)  # units × b
    damp = OBS_DAMPING * float(cov.diagonal().mean().clamp_min(1e-12))
    h = torch.linalg.inv(cov.double() + damp * torch.eye(len(cov), dtype=torch.float64))
    # The costs and the updates of the greedy read W and H on the group's own columns only (the Schur downdate of
    # H restricted to them needs nothing else), so both are kept there: units·b wide instead of d.
    own = cols.reshape(-1)
    return w[:, own].contiguous(), h[own][:, own].contiguous(), torch.arange(len(own)).reshape(cols.shape)


def _greedy_obs(states: list, units: int) -> torch.Tensor:
    """Each unit's score (see :func:`obs`) from the consumers' states (:func:`_obs_state`: unit i's columns are
    i·b … i·b+b−1). The states are compacted as units go: W and H keep the columns of the units still there."""
    scores = torch.zeros(units, dtype=torch.float64)
    alive = list(range(units))
    total = 0.0
    states = [(w.clone(), h.clone(), cols.shape[1]) for w, h, cols in states]
    while len(alive) > 1:
        m = len(alive)
        costs = torch.zeros(m, dtype=torch.float64)
        every = torch.arange(m)
        for w, h, b in states:
            blocks = h.view(m, b, m, b)[every, :, every, :]  # m × b × b: each unit's own block of H
            wb = w.view(w.shape[0], m, b)  # out × m × b
            costs += torch.einsum("omb,mbc,omc->m", wb, torch.linalg.pinv(blocks, hermitian=True), wb)
        j = int(torch.argmin(costs))
        u = alive.pop(j)
        total += max(float(costs[j]), 0.0)
        scores[u] = total
        for i, (w, h, b) in enumerate(states):
            s = slice(j * b, (j + 1) * b)
            rest = torch.cat([torch.arange(j * b), torch.arange((j + 1) * b, m * b)])
            inv = torch.linalg.pinv(h[s, s], hermitian=True)
            hs = h[s][:, rest]  # b × rest
            # the refit of the other columns (OBS update) and the Schur downdate of H, both on what stays
            states[i] = (w[:, rest] - w[:, s] @ inv @ hs, h[rest][:, rest] - hs.T @ inv @ hs, b)
    scores[alive[0]] = total + 1.0 + total  # the last unit is never removed
    return scores


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
    if criterion == "obs":
        return obs(model, trace, samples, means, settings, bars)
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
