"""How many units each group loses under a size target: allocation by measured sensitivity.

For every group, the model is cut at a few fractions of that group alone (its lowest-scored units, compensated as
the real cut will be: the least-squares refit by default) and the divergence of its outputs from the dense
model's is measured on the probe inputs (:func:`prunetool.recover.output_divergence`: KL divergence of the
softmax for logits, per token or per pixel; the relative squared error otherwise). Each group's curve (units
removed → divergence, from 0 at 0) is replaced by its lower convex hull; the hull's segments, cost per unit of
size saved (parameters or MACs, measured on the structure-only cut of that group), are taken cheapest first
across all groups until the size removed reaches a budget, the last one in part. :func:`fit` searches the
smallest budget whose cut meets the target.

The divergence of several groups cut together is taken to be the sum of their own: the curves do not see how
groups interact, which is why the target search measures sizes on the real cut, and the report gives the
measured quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .batch import batch_slice, call
from .cut import cut, n_removed, select
from .data import Samples
from .groups import Trace
from .layers import clone, unshare
from .progress import QUIET, Bars
from .recover import output_divergence, recalibrate_bn

FRACTIONS = (0.25, 0.5, 0.75)  # of a group's units, with --max-layer-ratio as the last point
TRIAL_SAMPLES = 256  # calibration samples each trial cut's refit reads
PROBE_SAMPLES = 64  # inputs the divergence is measured on


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


def measure(model, trace: Trace, scores, compensate: str, samples, probe, settings, size_of, max_layer_ratio: float,
            bars: Bars = QUIET, means=None, skip=(), recalibrate: bool = False) -> dict[str, Curve]:
    """Every group's :class:`Curve` (but those in ``skip``): trial cuts of that group alone, compensated by
    ``compensate`` (``means`` for ``mean``) and with their BatchNorm statistics recalibrated when ``recalibrate``
    (as the real cut will be), their divergence on ``probe``; ``size_of(keep)`` gives the size of a
    structure-only cut."""
    probe = batch_slice(probe, 0, PROBE_SAMPLES)
    trial = Samples(*samples.take(min(TRIAL_SAMPLES, len(samples))))
    with torch.no_grad():
        want = call(model, probe, settings.output_key)
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
        keep = {**whole, g.name: select(trace, scores, {h.name: (k / g.units if h is g else 0.0)
                                                        for h in trace.groups})[g.name]}
        small = cut(clone(model, share=True), trace, keep, compensate, means, trial, settings=settings).eval()
        if recalibrate:
            unshare(small, model)
            recalibrate_bn(small, trial)
        with torch.no_grad():
            got = call(small, probe, settings.output_key)
        curve.removed.append(k)
        curve.cost.append(max(0.0, float(output_divergence(got, want))))
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
    lo, hi = 0.0, whole
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size_of(keep_for(mid)) <= goal else (mid, hi)
        if hi - lo <= 1e-6 * whole:
            break
    return keep_for(hi), hi
