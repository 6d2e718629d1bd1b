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
are collected first and applied once, so offsets never shift under a later slice.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .distributed import reduce_sum, shard
from .progress import QUIET, Bars
from .score import Means, input_hooks, mean_of, readers, replace_units, unit_means
from .trace import Consumer, Group, Trace

COMPENSATIONS = ("mean", "lstsq", "none")
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
    """Input columns (Linear) or channels (Conv) of ``units`` in consumer ``c``."""
    if isinstance(c.module, nn.Linear):
        return ((c.offset + units)[:, None] * c.spatial + torch.arange(c.spatial)).reshape(-1)
    return c.offset + units


def mean_delta(c: Consumer, removed: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """What the removed units contributed to the consumer's output, with each unit held at its mean."""
    w = c.module.weight.data
    m = means[removed]
    if isinstance(c.module, nn.Linear):
        m = m.reshape(-1) if c.spatial > 1 else m[:, 0]
        return w[:, input_columns(c, removed)] @ m.to(w.dtype)
    return (w[:, input_columns(c, removed)].sum((2, 3)) * m[:, 0].to(w.dtype)).sum(1)


def _add_to_bias(modules: dict, c: Consumer, delta: torch.Tensor) -> None:
    module = modules[c.name]
    if module.bias is not None:
        module.bias.data += delta
        return
    norm = modules.get(c.norm_after) if c.norm_after else None
    if norm is not None and norm.running_mean is not None:
        norm.running_mean -= delta  # BN((y' + δ) − μ) = BN(y' − (μ − δ))
    else:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


class _Plan:
    """What to drop from each layer: output units (producers, BatchNorms, depthwise convs), input columns
    (consumers) and per-channel parameters, collected over all groups before anything is sliced."""

    def __init__(self):
        self.outputs: dict[str, set[int]] = {}
        self.inputs: dict[str, set[int]] = {}
        self.params: dict[tuple[str, str, int], set[int]] = {}

    def add(self, table, key, idx: torch.Tensor):
        table.setdefault(key, set()).update(idx.tolist())


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _slice_outputs(module: nn.Module, drop: set[int]) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        idx = _keep(module.num_features, drop)
        if module.weight is not None:
            module.weight = _param(module.weight.data[idx], module.weight)
            module.bias = _param(module.bias.data[idx], module.bias)
        if module.running_mean is not None:
            module.running_mean = module.running_mean[idx].clone()
            module.running_var = module.running_var[idx].clone()
        module.num_features = len(idx)
        return
    idx = _keep(module.weight.shape[0], drop)
    module.weight = _param(module.weight.data[idx], module.weight)
    if module.bias is not None:
        module.bias = _param(module.bias.data[idx], module.bias)
    if isinstance(module, nn.Linear):
        module.out_features = len(idx)
    elif module.groups > 1 and module.groups == module.in_channels == module.out_channels:  # depthwise member
        module.in_channels = module.out_channels = module.groups = len(idx)
    else:
        module.out_channels = len(idx)


def _slice_inputs(module: nn.Module, drop: set[int]) -> None:
    idx = _keep(module.weight.shape[1], drop)
    module.weight = _param(module.weight.data[:, idx], module.weight)
    if isinstance(module, nn.Linear):
        module.in_features = len(idx)
    else:
        module.in_channels = len(idx)


def cut(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], compensate: str = "mean",
        means: Means | None = None, x: torch.Tensor | None = None, bars: Bars = QUIET) -> nn.Module:
    """Remove the units not in ``keep`` from ``model`` in place, compensating as asked; returns ``model``."""
    if compensate not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {compensate!r}")
    modules = dict(model.named_modules())
    dense = copy.deepcopy(model) if compensate == "lstsq" else None
    plan = _Plan()
    for g in trace.groups:
        removed = complement(keep[g.name], g.units)
        if not len(removed):
            continue
        for p in g.producers:
            plan.add(plan.outputs, p.name, removed)
        for m in g.members:
            if m.param is None:
                plan.add(plan.outputs, m.name, m.offset + removed)
            else:
                plan.add(plan.params, (m.name, m.param, m.dim), m.offset + removed)
        for c in g.consumers:
            plan.add(plan.inputs, c.name, input_columns(c, removed))
            if compensate == "mean":
                c = Consumer(c.name, modules[c.name], c.offset, c.spatial, c.norm_after)
                _add_to_bias(modules, c, mean_delta(c, removed, mean_of(means, g, c)))
    for name, drop in plan.outputs.items():
        _slice_outputs(modules[name], drop)
    for name, drop in plan.inputs.items():
        _slice_inputs(modules[name], drop)
    for (name, attr, dim), drop in plan.params.items():
        p = getattr(modules[name], attr)
        setattr(modules[name], attr, _param(p.data.index_select(dim, _keep(p.shape[dim], drop)), p))
    if compensate == "lstsq":
        for name in bars.track(sorted(plan.inputs, key=trace.order.get), "least-squares refit"):
            out_drop = plan.outputs.get(name)
            kept = None if out_drop is None else _keep(modules[name].weight.shape[0] + len(out_drop), out_drop)
            refit(model, dense, name, kept, x)
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
    return input_hooks(model, readers(trace, groups), lambda a, read: replace_units(a, read, values))


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


class _Captured(Exception):
    pass


class _LayerCall(TorchFunctionMode):
    """Catches the conv2d/linear call that uses ``weight``: its real input and arguments, whatever a layer
    subclass does before it (its own padding, say)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.call = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("conv2d", "linear") and \
                (args[1] if len(args) > 1 else kwargs.get("weight")) is self.weight:
            self.call = _conv_arguments(func.__name__, args, kwargs)
            raise _Captured
        return func(*args, **kwargs)


def _conv_arguments(name: str, args: tuple, kwargs: dict) -> dict:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = {**dict(zip(names, args)), **kwargs}
    if name == "conv2d":
        weight = call["weight"]
        call.setdefault("stride", 1), call.setdefault("padding", 0), call.setdefault("dilation", 1)
        if call["padding"] == "valid":
            call["padding"] = 0
        elif call["padding"] == "same":
            dil = call["dilation"] if isinstance(call["dilation"], tuple) else (call["dilation"],) * 2
            call["padding"] = tuple(d * (k - 1) // 2 for d, k in zip(dil, weight.shape[2:]))
    return call


def layer_call(model: nn.Module, module: nn.Module, xb: torch.Tensor) -> dict:
    """Run ``model`` on ``xb`` only as far as ``module``'s conv/linear call; return that call's arguments."""
    catcher = _LayerCall(module.weight)
    try:
        with torch.no_grad(), catcher:
            model(xb)
    except _Captured:
        pass
    if catcher.call is None:
        raise RuntimeError(f"{type(module).__name__} never called conv2d/linear with its own weight")
    return catcher.call


def _layer_output(model: nn.Module, name: str, xb: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``xb`` only as far as layer ``name``; return that layer's output."""
    module = dict(model.named_modules())[name]
    box = []

    def hook(mod, args, out):
        box.append(out)
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(xb)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box[0]


def design_matrix(module: nn.Module, call: dict) -> torch.Tensor:
    inp = call["input"]
    if isinstance(module, nn.Linear):
        return inp.reshape(-1, module.in_features)
    cols = F.unfold(inp, module.kernel_size, call["dilation"], call["padding"], call["stride"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return out.reshape(-1, out.shape[-1])
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def refit(model: nn.Module, dense: nn.Module, name: str, kept_outputs: torch.Tensor | None,
          x: torch.Tensor, ridge: float | None = None, batch: int = 64) -> None:
    """Ridge least-squares refit of consumer ``name`` in ``model`` to the dense model's pre-activations."""
    ridge = RIDGE if ridge is None else ridge
    module = dict(model.named_modules())[name]
    bias_only = module.weight[0].numel() + 1 > MAX_FIT_INPUTS
    xtx = xtz = None
    for xb in shard(x).split(batch):
        call = layer_call(model, module, xb)
        target = _layer_output(dense, name, xb)
        per_sample = design_matrix(module, {**call, "input": call["input"][:1]}).numel()
        step = max(1, ROWS_PER_CHUNK // max(per_sample, 1))
        for ib, tb in zip(call["input"].split(step), target.split(step)):
            design = design_matrix(module, {**call, "input": ib})
            z = _targets(module, tb)
            if kept_outputs is not None:
                z = z[:, kept_outputs]
            if bias_only:  # accumulate E[z − W·x] only
                r = (z - design @ module.weight.data.reshape(len(z[0]), -1).T).double()
                xtx = (0 if xtx is None else xtx) + len(r)
                xtz = (0 if xtz is None else xtz) + r.sum(0)
                continue
            design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype)], 1).double()
            xtx = design.T @ design if xtx is None else xtx + design.T @ design
            xtz = design.T @ z.double() if xtz is None else xtz + design.T @ z.double()
    xtx, xtz = reduce_sum(xtx), reduce_sum(xtz)
    if bias_only:
        _set_bias(module, (xtz / xtx).to(module.weight.dtype))
        return
    d = xtx.shape[0] - 1
    reg = torch.zeros_like(xtx)
    reg.diagonal()[:d] = ridge * xtx.diagonal()[:d].mean().clamp_min(1e-12)
    try:
        sol = torch.linalg.solve(xtx + reg, xtz)
    except RuntimeError:
        sol = torch.linalg.lstsq(xtx + reg, xtz).solution
    w, b = sol[:d].T, sol[d]
    module.weight = _param(w.reshape(module.weight.shape).to(module.weight.dtype), module.weight)
    _set_bias(module, b.to(module.weight.dtype))


def _set_bias(module: nn.Module, b: torch.Tensor) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(b, requires_grad=module.weight.requires_grad)
    else:
        module.bias = _param(b, module.bias)
