"""How many units each group loses under a size target: allocation by measured sensitivity.

For every group, the model is cut at a few fractions of that group alone (its lowest-scored units, compensated as
the real cut will be: the least-squares refit by default) and the divergence of its outputs from the dense
model's is measured on the probe inputs (:func:`prunetool.recover.output_divergence`: KL divergence of the
softmax for logits, per token or per pixel; the relative squared error otherwise). Each group's curve (units
removed → divergence, from 0 at 0) is replaced by its lower convex hull; the hull's segments, cost per unit of
size saved (parameters or MACs, measured on the structure-only cut of that group), are taken cheapest first
across all groups until the size removed reaches a budget, the last one in part. :func:`fit` searches the
smallest budget whose cut meets the target.

The divergence of several groups cut together is taken to be the sum of their own, and it is not: groups
interact (an error in a residual stream compounds). So the allocation is one of several :func:`candidates` that
meet the target (the curves', one ratio everywhere, and blends of the two), the one whose joint trial cut
measures the least divergence (:func:`choose`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .batch import batch_len, batch_slice, batch_to, call, model_dtype, token_ids
from .cut import cut, n_removed, select
from .data import OUTPUT_BYTES, Samples
from .groups import Trace
from .layers import clone, unshare
from .progress import QUIET, Bars
from .recover import output_divergence, recalibrate_bn

FRACTIONS = (0.25, 0.5, 0.75)  # of a group's units, with --max-layer-ratio as the last point
TRIAL_SAMPLES = 512  # calibration samples each trial cut's refit reads (at most two thirds of those taken)
PROBE_SAMPLES = 64  # held-out inputs each curve point is measured on
CHOICE_SAMPLES = 256  # held-out inputs the candidate allocations are measured on (the last third taken)
BLENDS = (0.25, 0.5, 0.75)  # weights of the sensitivity allocation against one ratio everywhere, besides 1 and 0


@dataclass
class Curve:
    """One group's measured divergence after removing ``removed[i]`` of its ``units`` (``removed[0]`` = 0), and
    the size one unit holds."""

    group: str
    units: int
    removed: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    size: float = 0.0
    members: list[str] = field(default_factory=list)  # the groups that lose this many units (default: ``group``)

    def __post_init__(self):
        self.members = self.members or [self.group]

    def hull(self) -> list[tuple[int, float]]:
        """The lower convex hull of (removed, cost), from (0, 0): marginal costs that only grow."""
        points = sorted(zip(self.removed, self.cost))
        out: list[tuple[int, float]] = []
        for p in points:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


class Trials:
    """Trial cuts of ``model``: each compensated by ``compensate`` (``means`` for ``mean``) on up to
    :data:`TRIAL_SAMPLES` calibration samples, BatchNorm recalibrated when ``recalibrate`` (as the real cut will
    be), and measured by its divergence from the dense outputs on up to :data:`PROBE_SAMPLES` calibration samples
    held out of the refit (no more than ``probe`` holds; ``probe`` itself when there are too few samples), by
    :func:`prunetool.recover.output_divergence` (``metric``: as it)."""

    def __init__(self, model, trace: Trace, scores, compensate: str, samples, probe, settings, means=None,
                 recalibrate: bool = False, metric: str | None = None):
        self.model, self.trace, self.scores, self.compensate, self.means = model, trace, scores, compensate, means
        self.settings, self.recalibrate, self.metric = settings, recalibrate, metric
        x, y = samples.take(TRIAL_SAMPLES + CHOICE_SAMPLES)
        n = batch_len(x)
        with torch.no_grad():
            first = call(model, batch_slice(probe, 0, 1), settings.output_key)
        one = first.numel() * first.element_size()
        # measured on calibration samples the refits did not read (in-sample, a refit's divergence favours the
        # wide consumers that overfit most), as many as the outputs of two models fit in OUTPUT_BYTES
        held = min(CHOICE_SAMPLES, n // 3, OUTPUT_BYTES // (2 * max(one, 1))) if n >= 16 else 0
        self.samples = Samples(batch_slice(x, 0, n - held), y[:n - held] if y is not None else None)
        device = next(iter(probe.values())).device if isinstance(probe, dict) else probe.device
        self.held = batch_to(batch_slice(x, n - held, n), device, model_dtype(model)) if held >= 2 else \
            batch_slice(probe, 0, PROBE_SAMPLES)
        self.probe = batch_slice(self.held, 0, PROBE_SAMPLES)
        self.want = self._outputs(model, self.held)

    def divergence(self, keep: dict[str, torch.Tensor], every: bool = False) -> float:
        """The divergence of the model cut to ``keep`` (0 or more) on the first :data:`PROBE_SAMPLES` held-out
        samples, or on all of them (``every``)."""
        small = cut(clone(self.model, share=True), self.trace, keep, self.compensate, self.means, self.samples,
                    settings=self.settings).eval()
        if self.recalibrate:
            unshare(small, self.model)
            recalibrate_bn(small, self.samples)
        n = batch_len(self.held) if every else batch_len(self.probe)
        got = self._outputs(small, batch_slice(self.held, 0, n))
        return max(0.0, float(output_divergence(got, self.want[:n], token_ids(self.held), self.metric)))

    def _outputs(self, model, inputs) -> torch.Tensor:
        """``model``'s outputs on ``inputs``, :data:`PROBE_SAMPLES` at a time (a forward's activations bounded)."""
        with torch.no_grad():
            return torch.cat([call(model, batch_slice(inputs, i, i + PROBE_SAMPLES), self.settings.output_key)
                              for i in range(0, batch_len(inputs), PROBE_SAMPLES)])


def measure(trials: Trials, size_of, max_layer_ratio: float, bars: Bars = QUIET, skip=()) -> dict[str, Curve]:
    """Every group's :class:`Curve` (but those in ``skip``): the divergence of trial cuts of that group alone;
    ``size_of(keep)`` gives the size of a structure-only cut."""
    trace = trials.trace
    whole = {g.name: torch.arange(g.units) for g in trace.groups}
    base = size_of(whole)
    fractions = sorted({*(f for f in FRACTIONS if f < max_layer_ratio), max_layer_ratio})
    curves = {}
    jobs = [(g, f) for g in trace.groups if g.name not in skip for f in fractions]
    for g, f in bars.track(jobs, "measuring each layer's sensitivity"):
        curve = curves.setdefault(g.name, Curve(g.name, g.units, [0], [0.0]))
        k = n_removed(g.units, f)
        if k <= curve.removed[-1]:
            continue
        keep = {**whole, g.name: select(trace, trials.scores, {h.name: (k / g.units if h is g else 0.0)
                                                               for h in trace.groups})[g.name]}
        curve.removed.append(k)
        curve.cost.append(trials.divergence(keep))
        if len(curve.removed) == 2:
            curve.size = (base - size_of(keep)) / k
    return curves


def tied(curves: dict[str, Curve], ties: list[list[str]] = (), whole: list[str] = ()) -> dict[str, Curve]:
    """The curves with every set of ``ties`` (groups that must keep one count: a Hugging Face config's one width)
    as one curve, its divergence and size the members' sums at the counts all of them measured; groups in
    ``whole`` cannot lose units."""
    out = {name: c for name, c in curves.items() if name not in whole}
    for names in ties:
        members = [out.pop(n) for n in names if n in out]
        if len(members) < 2:
            out.update((c.group, c) for c in members)
            continue
        common = sorted(set.intersection(*(set(c.removed) for c in members)))
        cost = [sum(c.cost[c.removed.index(k)] for c in members) for k in common]
        out[members[0].group] = Curve(members[0].group, members[0].units, common, cost,
                                      sum(c.size for c in members), [c.group for c in members])
    return out


def allocation(curves: dict[str, Curve], budget: float) -> dict[str, int]:
    """Units removed per curve (each of its members) when ``budget`` of size is removed, the cheapest hull
    segments first (the last one in part)."""
    segments = []
    for c in curves.values():
        if c.size <= 0:
            continue
        hull = c.hull()
        for (k0, c0), (k1, c1) in zip(hull, hull[1:]):
            segments.append(((c1 - c0) / ((k1 - k0) * c.size), c.group, k0, k1))
    segments.sort(key=lambda s: (s[0], s[2]))
    removed = {name: 0 for name in curves}
    left = budget
    for _, name, k0, k1 in segments:
        if left <= 0:
            break
        if removed[name] != k0:  # a group's segments come in order: never skip one
            continue
        size = curves[name].size
        take = min(k1 - k0, math.ceil(left / size))
        removed[name] = k0 + take
        left -= take * size
    return removed


def fit(curves: dict[str, Curve], size_of, goal: float, trace: Trace, scores, round_to: int = 1
        ) -> tuple[dict[str, torch.Tensor], float]:
    """The kept units of the smallest budget whose cut (``size_of(keep)``) is at most ``goal``, and that budget;
    raises ``ValueError`` when removing everything the curves allow is not enough."""

    def keep_for(budget: float) -> dict[str, torch.Tensor]:
        removed = {m: k for name, k in allocation(curves, budget).items() for m in curves[name].members}
        return select(trace, scores, {g.name: removed.get(g.name, 0) / g.units for g in trace.groups}, round_to)

    whole = sum(c.size * c.removed[-1] for c in curves.values())
    if size_of(keep_for(whole)) > goal:
        raise ValueError("removing every unit the sensitivity curves measured still misses the target")
    budget = _least(lambda b: size_of(keep_for(b)) <= goal, whole, 30, 1e-6)
    return keep_for(budget), budget


def _least(meets, hi: float, steps: int, rel: float) -> float:
    """The least ``t`` in (0, ``hi``] for which ``meets(t)`` (true at ``hi``, and for every larger ``t``), by
    bisection to ``rel · hi``."""
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
        if hi - lo <= rel * hi:
            break
    return hi


def removed_fractions(trace: Trace, keep: dict[str, torch.Tensor]) -> dict[str, float]:
    return {g.name: 1 - len(keep[g.name]) / g.units for g in trace.groups}


def scaled(fractions: dict[str, float], size_of, goal: float, trace: Trace, scores, round_to: int = 1,
           cap: float = 0.99) -> dict[str, torch.Tensor] | None:
    """The kept units of the smallest ``t`` for which removing ``min(cap, t·fractions[g])`` of every group meets
    ``goal``; None when even ``cap`` everywhere ``fractions`` is positive does not."""

    def keep_for(t: float) -> dict[str, torch.Tensor]:
        return select(trace, scores, {g.name: min(cap, t * fractions.get(g.name, 0.0)) for g in trace.groups},
                      round_to)

    positive = [f for f in fractions.values() if f > 0]
    if not positive:
        return None
    hi = cap / min(positive)
    if size_of(keep_for(hi)) > goal:
        return None
    return keep_for(_least(lambda t: size_of(keep_for(t)) <= goal, hi, 24, 1e-4))


def candidates(trace: Trace, sensitive: dict[str, torch.Tensor], size_of, goal: float, scores, round_to: int = 1,
               whole=(), cap: float = 0.99) -> dict[str, dict[str, torch.Tensor]]:
    """Allocations that meet ``goal``: the sensitivity one (``sensitive``), one ratio in every group but those in
    ``whole``, and blends of the two (:data:`BLENDS`), each scaled to the goal with no group losing more than
    ``cap`` of its units (``--max-layer-ratio``).

    The curves add divergences of groups measured alone; cut together, groups interact (a residual stream's
    error compounds), so the allocation that wins is the one whose joint cut measures best
    (:func:`choose`), never worse than one ratio everywhere."""
    out = {"sensitivity": sensitive}
    free = [g.name for g in trace.groups if g.name not in whole]
    uniform = scaled({n: 1.0 for n in free}, size_of, goal, trace, scores, round_to, cap)
    if uniform is None:
        return out
    out["uniform"] = uniform
    ratio, fractions = removed_fractions(trace, uniform), removed_fractions(trace, sensitive)
    for w in BLENDS:
        mixed = scaled({n: w * fractions[n] + (1 - w) * ratio[n] for n in free}, size_of, goal, trace, scores,
                       round_to, cap)
        if mixed is not None:
            out[f"blend {w:g}"] = mixed
    return out


def choose(trials: Trials, options: dict[str, dict[str, torch.Tensor]], bars: Bars = QUIET
           ) -> tuple[str, dict[str, float]]:
    """The name of the allocation among ``options`` whose joint trial cut diverges least, and every one's
    divergence."""
    measured = {name: trials.divergence(keep, every=True) for name, keep in bars.track(list(options.items()),
                                                                           "measuring the allocations together")}
    return min(measured, key=measured.get), measured
