"""Cut stage: physical removal of units, with compensation for what was removed.

Compensation (docs/METHOD.md):
- ``none``: plain removal.
- ``mean``: each removed unit is replaced by its mean as each consumer reads it, folded into that
  consumer's bias (or, for a consumer without bias followed by BatchNorm, into BN's running mean).
- ``lstsq``: each consumer's kept weights and bias are refit by ridge least squares so that, fed by
  the already-cut model, it reproduces the dense consumer's pre-activations on calibration inputs
  (convs on unfolded patches). Consumers are refit in forward order, so each fit also absorbs the
  error of the cuts before it.

All slices of one layer (it may be a producer of one group, a consumer of several, a member of others)
are collected first as ``(layer, tensor, dimension)`` and applied once, so offsets never shift under a later
slice; then the layer's width attributes follow its tensors (:mod:`prunetool.layers`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import layers
from .calls import capture, design_matrix, targets
from .distributed import reduce_sum, shard
from .options import COMPENSATIONS
from .progress import QUIET, Bars
from .score import Means, consumer_hooks, mean_of, readers, replace_units, unit_means
from .trace import Consumer, Group, Trace

RIDGE = 1e-5  # λ relative to the mean diagonal of XᵀX: only there to keep a rank-deficient fit solvable
ROWS_PER_CHUNK = 2 ** 21  # design-matrix elements per chunk when unfolding conv patches
MAX_FIT_INPUTS = 10_000  # wider consumers (XᵀX over 800 MB) get only their bias refit


def n_removed(units: int, ratio: float) -> int:
    return min(units - 1, math.floor(ratio * units + 1e-9))


def select(trace: Trace, scores: dict[str, torch.Tensor], ratio: float | dict[str, float],
           round_to: int = 1) -> dict[str, torch.Tensor]:
    """Indices of the units kept in each group: the ``floor(ratio·n)`` lowest scores go (ties: lowest index).

    A grouped-conv producer loses the same number from each of its blocks; with ``round_to`` the kept
    count is rounded to a multiple of it (never below it, never above the layer's size).
    """
    keep = {}
    for g in trace.groups:
        r = ratio[g.name] if isinstance(ratio, dict) else ratio
        size = g.units // g.blocks
        kept = size - n_removed(size, r)
        if round_to > 1 and g.blocks == 1:
            kept = min(size, max(round_to, round_to * round(kept / round_to)))
        order = torch.sort(scores[g.name].double().reshape(g.blocks, size), dim=1, stable=True).indices
        kept_idx = order[:, size - kept:] + torch.arange(g.blocks)[:, None] * size
        keep[g.name] = torch.sort(kept_idx.reshape(-1)).values
    return keep


def global_ratios(trace: Trace, scores: dict[str, torch.Tensor], ratio: float,
                  max_layer_ratio: float = 0.9) -> dict[str, float]:
    """Per-group ratios that remove ``floor(ratio·N)`` of all N units, ranked across groups.

    Scores are made comparable by dividing each group's scores by their mean (a layer's typical unit
    scores 1). No group loses more than ``floor(max_layer_ratio·n)`` units, and each keeps at least one.
    """
    caps = {g.name: min(g.units - 1, math.floor(max_layer_ratio * g.units + 1e-9)) for g in trace.groups}
    entries = []
    for g in trace.groups:
        s = scores[g.name].double()
        norm = s / s.mean() if s.mean() > 0 else s
        entries += [(v, g.name) for v in norm.tolist()]
    entries.sort(key=lambda e: e[0])
    target = math.floor(ratio * sum(g.units for g in trace.groups) + 1e-9)
    removed = {g.name: 0 for g in trace.groups}
    total = 0
    for _, name in entries:
        if total >= target:
            break
        if removed[name] < caps[name]:
            removed[name] += 1
            total += 1
    return {g.name: removed[g.name] / g.units for g in trace.groups}


def complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    return torch.nonzero(mask).reshape(-1)


def input_columns(c: Consumer, units: torch.Tensor) -> torch.Tensor:
    """Input columns (linear layout) or channels (conv layout) of ``units`` in consumer ``c``."""
    if c.layout == "linear":
        return ((c.offset + units)[:, None] * c.spatial + torch.arange(c.spatial)).reshape(-1)
    return c.offset + units


def as_matrix(weight: torch.Tensor, in_dim: int) -> torch.Tensor:
    """A weight as out × fan-in (its input dimension ``in_dim`` second, kernels flattened into it)."""
    moved = weight.movedim(in_dim, 1)
    return moved.reshape(moved.shape[0], -1)


def from_matrix(matrix: torch.Tensor, like: torch.Tensor, in_dim: int) -> torch.Tensor:
    """The inverse of :func:`as_matrix` for a weight shaped like ``like``."""
    return matrix.reshape(like.movedim(in_dim, 1).shape).movedim(1, in_dim)


def mean_delta(c: Consumer, module: nn.Module, removed: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """What the removed units contributed to the consumer's output, with each unit held at its mean."""
    w = getattr(module, c.weight).data.movedim(c.dim, 1)
    m = means[removed]
    cols = w[:, input_columns(c, removed)]
    if c.layout == "linear":
        m = m.reshape(-1) if c.spatial > 1 else m[:, 0]
        return cols @ m.to(w.dtype)
    return (cols.sum(tuple(range(2, cols.dim()))) * m[:, 0].to(w.dtype)).sum(1)


def _torch_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def bias_attr(module: nn.Module, c: Consumer) -> str | None:
    """The consumer's bias, also one an earlier compensation gave it."""
    if c.bias is not None:
        return c.bias
    return "bias" if _torch_layer(module) and module.bias is not None else None


def can_add_bias(module: nn.Module, c: Consumer) -> bool:
    """Whether the consumer's own call would use a new ``bias`` (the torch layers and their subclasses)."""
    return bias_attr(module, c) is None and _torch_layer(module)


def _add_to_bias(modules: dict, c: Consumer, delta: torch.Tensor) -> None:
    module = modules[c.name]
    attr = bias_attr(module, c)
    if attr is not None:
        getattr(module, attr).data += delta
        return
    norm = modules.get(c.norm_after) if c.norm_after else None
    if norm is not None and norm.running_mean is not None:
        norm.running_mean -= delta  # BN((y' + δ) − μ) = BN(y' − (μ − δ))
    elif can_add_bias(module, c):
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)


class Plan:
    """What to drop, as ``(layer, tensor, dimension) → indices``, collected over all groups before anything is
    sliced."""

    def __init__(self):
        self.drops: dict[tuple[str, str, int], set[int]] = {}
        self.consumers: dict[str, Consumer] = {}
        self.producers: dict[str, tuple[str, int]] = {}  # layer → (weight, output dim)

    def add(self, name: str, attr: str | None, dim: int, idx: torch.Tensor) -> None:
        if attr is not None:
            self.drops.setdefault((name, attr, dim), set()).update(idx.tolist())

    def kept_outputs(self, name: str, module: nn.Module) -> torch.Tensor | None:
        """The original indices of a consumer's outputs that remain (None when it loses none)."""
        if name not in self.producers:
            return None
        attr, dim = self.producers[name]
        drop = self.drops.get((name, attr, dim))
        if not drop:
            return None
        n = getattr(module, attr).shape[dim] + len(drop)
        return _keep(n, drop)


def plan_cut(trace: Trace, keep: dict[str, torch.Tensor]) -> Plan:
    plan = Plan()
    for g in trace.groups:
        removed = complement(keep[g.name], g.units)
        if not len(removed):
            continue
        for p in g.producers:
            plan.add(p.name, p.weight, p.dim, removed)
            plan.add(p.name, p.bias, 0, removed)
            plan.producers[p.name] = (p.weight, p.dim)
        for m in g.members:
            for attr, dim in m.tensors:
                plan.add(m.name, attr, dim, m.offset + removed)
        for c in g.consumers:
            plan.add(c.name, c.weight, c.dim, input_columns(c, removed))
            plan.consumers.setdefault(c.name, c)
    return plan


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def apply(model: nn.Module, plan: Plan) -> None:
    """Slice every planned tensor, then let each touched layer (and the containers recording its width) sync."""
    modules = dict(model.named_modules())
    before = layers.widths(model)
    changed: dict[str, dict[int, int]] = {}
    for (name, attr, dim), drop in plan.drops.items():
        module = modules[name]
        n = getattr(module, attr).shape[dim]
        layers.slice_tensor(module, attr, dim, _keep(n, drop))
        changed.setdefault(name, {})[n] = n - len(drop)
    for name, sizes in changed.items():
        layers.kind_of(modules[name]).sync(modules[name], sizes)
    layers.sync_containers(model, before)


def cut(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], compensate: str = "mean",
        means: Means | None = None, x: torch.Tensor | None = None, bars: Bars = QUIET) -> nn.Module:
    """Remove the units not in ``keep`` from ``model`` in place, compensating as asked; returns ``model``."""
    if compensate not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {compensate!r}")
    modules = dict(model.named_modules())
    dense = copy.deepcopy(model) if compensate == "lstsq" else None
    plan = plan_cut(trace, keep)
    if compensate == "mean":
        for g in trace.groups:
            removed = complement(keep[g.name], g.units)
            if not len(removed):
                continue
            for c in g.consumers:
                _add_to_bias(modules, c, mean_delta(c, modules[c.name], removed, mean_of(means, g, c)))
    apply(model, plan)
    if compensate == "lstsq":
        for name in bars.track(sorted(plan.consumers, key=lambda n: trace.order.get(n, 0)), "least-squares refit"):
            c = plan.consumers[name]
            refit(model, dense, c, plan.kept_outputs(name, modules[name]), x)
    return model


def mask_hooks(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], means: Means,
               groups: list[Group] | None = None):
    """A context in which a dense model behaves like the cut one: removed units read as their means."""
    values = {}
    groups = [g for g in (groups if groups is not None else trace.groups) if g.name in means]
    for g in groups:
        removed = complement(keep[g.name], g.units)
        for c in g.consumers:
            if len(removed):
                values[(g.name, c.name, c.offset)] = (removed, mean_of(means, g, c)[removed])
    return consumer_hooks(model, readers(trace, groups), lambda a, read: replace_units(a, read, values))


def sequential_means(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], x: torch.Tensor,
                     bars: Bars = QUIET) -> Means:
    """Unit means measured group by group with the earlier groups already cut.

    Cutting layer ℓ shifts what layer ℓ+1 produces, so the dense means no longer describe the units
    that replace layer ℓ+1's removed ones; measuring each group behind the earlier cuts keeps the
    replacement the mean of what the cut model actually computes.
    """
    means: Means = {}
    for i, g in enumerate(bars.track(trace.groups, "unit means behind earlier cuts")):
        with mask_hooks(model, trace, keep, means, trace.groups[:i]):
            means.update(unit_means(model, trace, x, groups=[g]))
    return means


def refit(model: nn.Module, dense: nn.Module, c: Consumer, kept_outputs: torch.Tensor | None,
          x: torch.Tensor, ridge: float | None = None, batch: int = 64) -> None:
    """Ridge least-squares refit of consumer ``c`` in ``model`` to the dense model's pre-activations."""
    ridge = RIDGE if ridge is None else ridge
    module = model.get_submodule(c.name)
    weight = getattr(module, c.weight)
    w2d = as_matrix(weight.data, c.dim)
    fit_bias = bias_attr(module, c) is not None or can_add_bias(module, c)
    bias_only = w2d.shape[1] + 1 > MAX_FIT_INPUTS
    xtx = xtz = None
    for xb in shard(x).split(batch):
        call = capture(model, c.name, xb, c.weight)
        target = targets(capture(dense, c.name, xb, c.weight))
        if kept_outputs is not None:
            target = target[:, kept_outputs]
        per_sample = design_matrix(call, weight, call.input[:1]).numel()
        step = max(1, ROWS_PER_CHUNK // max(per_sample, 1))
        rows = 0
        for ib in call.input.split(step):
            design = design_matrix(call, weight, ib)
            z = target[rows:rows + len(design)]
            rows += len(design)
            if bias_only:  # accumulate E[z − W·x] only
                r = (z - design @ w2d.T).double()
                xtx = (0 if xtx is None else xtx) + len(r)
                xtz = (0 if xtz is None else xtz) + r.sum(0)
                continue
            if fit_bias:
                design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype)], 1)
            design = design.double()
            xtx = design.T @ design if xtx is None else xtx + design.T @ design
            xtz = design.T @ z.double() if xtz is None else xtz + design.T @ z.double()
    xtx, xtz = reduce_sum(xtx), reduce_sum(xtz)
    if bias_only:
        if fit_bias:
            _set_bias(module, c, (xtz / xtx).to(weight.dtype))
        return
    d = w2d.shape[1]
    reg = torch.zeros_like(xtx)
    reg.diagonal()[:d] = ridge * xtx.diagonal()[:d].mean().clamp_min(1e-12)
    try:
        sol = torch.linalg.solve(xtx + reg, xtz)
    except RuntimeError:
        sol = torch.linalg.lstsq(xtx + reg, xtz).solution
    new = from_matrix(sol[:d].T.to(weight.dtype), weight, c.dim)
    setattr(module, c.weight, nn.Parameter(new.contiguous(), requires_grad=weight.requires_grad))
    if fit_bias:
        _set_bias(module, c, sol[d].to(weight.dtype))


def _set_bias(module: nn.Module, c: Consumer, b: torch.Tensor) -> None:
    attr = bias_attr(module, c)
    if attr is None:
        module.bias = nn.Parameter(b.contiguous(), requires_grad=module.weight.requires_grad)
    else:
        setattr(module, attr, nn.Parameter(b.contiguous(), requires_grad=getattr(module, attr).requires_grad))


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights a mask drops (iterative magnitude pruning)."""
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.mul_(masks[name].to(module.weight.dtype))
