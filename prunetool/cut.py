"""Cut stage: physical removal of units, with compensation for what was removed.

Compensation (METHOD.md):
- ``none``: plain removal.
- ``mean``: each removed unit is replaced by its dataset mean, folded into the consumer's bias
  (or, for a consumer without bias followed by BatchNorm, into that BatchNorm's running mean).
- ``lstsq``: each consumer's kept weights and bias are refit by ridge least squares so that, fed by
  the already-cut model, it reproduces the dense consumer's pre-activations on calibration inputs
  (convs on unfolded patches). Consumers are refit in forward order, so each fit also absorbs the
  error of the cuts before it.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .progress import QUIET, Bars
from .score import from_unit_view, unit_means, unit_view
from .trace import Consumer, Group, Trace

COMPENSATIONS = ("mean", "lstsq", "none")
RIDGE = 1e-5  # λ relative to the mean diagonal of XᵀX: only there to keep a rank-deficient fit solvable
ROWS_PER_CHUNK = 2 ** 21  # design-matrix elements per chunk when unfolding conv patches


def n_removed(units: int, ratio: float) -> int:
    return min(units - 1, math.floor(ratio * units + 1e-9))


def select(trace: Trace, scores: dict[str, torch.Tensor], ratio: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Indices of the units kept in each group: the ``floor(ratio·n)`` lowest scores go."""
    keep = {}
    for g in trace.groups:
        r = ratio[g.name] if isinstance(ratio, dict) else ratio
        k = n_removed(g.units, r)
        order = torch.sort(scores[g.name].double(), stable=True).indices
        keep[g.name] = torch.sort(order[k:]).values
    return keep


def _input_columns(idx: torch.Tensor, spatial: int) -> torch.Tensor:
    return (idx[:, None] * spatial + torch.arange(spatial)).reshape(-1)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


def _keep_outputs(module: nn.Module, idx: torch.Tensor) -> None:
    module.weight = _param(module.weight.data[idx], module.weight)
    if module.bias is not None:
        module.bias = _param(module.bias.data[idx], module.bias)
    if isinstance(module, nn.Linear):
        module.out_features = len(idx)
    else:
        module.out_channels = len(idx)


def _keep_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    if norm.weight is not None:
        norm.weight = _param(norm.weight.data[idx], norm.weight)
        norm.bias = _param(norm.bias.data[idx], norm.bias)
    if norm.running_mean is not None:
        norm.running_mean = norm.running_mean[idx].clone()
        norm.running_var = norm.running_var[idx].clone()
    norm.num_features = len(idx)


def _keep_inputs(module: nn.Module, idx: torch.Tensor, spatial: int) -> None:
    if isinstance(module, nn.Linear):
        cols = _input_columns(idx, spatial)
        module.weight = _param(module.weight.data[:, cols], module.weight)
        module.in_features = len(cols)
    else:
        module.weight = _param(module.weight.data[:, idx], module.weight)
        module.in_channels = len(idx)


def mean_delta(consumer: Consumer, removed: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """What the removed units contributed to the consumer's output, with each unit held at its mean."""
    w = consumer.module.weight.data
    if isinstance(consumer.module, nn.Linear):
        cols = _input_columns(removed, consumer.spatial)
        m = means[removed]
        m = m.reshape(-1) if consumer.spatial > 1 else m[:, 0]
        return w[:, cols] @ m.to(w.dtype)
    return (w[:, removed].sum((2, 3)) * means[removed, 0].to(w.dtype)).sum(1)


def _add_to_bias(model: nn.Module, consumer: Consumer, delta: torch.Tensor) -> None:
    module = consumer.module
    if module.bias is not None:
        module.bias.data += delta
        return
    norm = dict(model.named_modules()).get(consumer.norm_after) if consumer.norm_after else None
    if norm is not None and norm.running_mean is not None:
        norm.running_mean -= delta  # BN((y' + δ) − μ) = BN(y' − (μ − δ))
    else:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)


def cut(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], compensate: str = "mean",
        means: dict[str, torch.Tensor] | None = None, x: torch.Tensor | None = None,
        bars: Bars = QUIET) -> nn.Module:
    """Remove the units not in ``keep`` from ``model`` in place, compensating as asked; returns ``model``."""
    if compensate not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {compensate!r}")
    modules = dict(model.named_modules())
    # The trace may come from another copy of the model: resolve every layer by name in this one.
    groups = [_rebind(g, modules) for g in trace.groups]
    dense = copy.deepcopy(model) if compensate == "lstsq" else None
    if compensate == "mean":
        for g in groups:
            removed = _complement(keep[g.name], g.units)
            if len(removed):
                for c in g.consumers:
                    _add_to_bias(model, c, mean_delta(c, removed, means[g.name]))
    for g in groups:
        idx = keep[g.name]
        _keep_outputs(g.producer, idx)
        for name in g.norms:
            _keep_norm(modules[name], idx)
        for c in g.consumers:
            _keep_inputs(c.module, idx, c.spatial)
    if compensate == "lstsq":
        consumers = list(dict.fromkeys(c.name for g in groups for c in g.consumers
                                       if len(keep[g.name]) < g.units))
        for name in bars.track(consumers, "least-squares refit"):
            refit(model, dense, name, keep.get(name), x)
    return model


def mask_hooks(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], means: dict[str, torch.Tensor]):
    """Hooks that make a dense model behave like the cut one: removed units read as their means."""
    modules = dict(model.named_modules())
    handles = []
    for g in trace.groups:
        removed = _complement(keep[g.name], g.units)
        if not len(removed) or g.name not in means:
            continue

        def pre(module, args, g=g, removed=removed):
            a = unit_view(args[0].clone(), g)
            a[:, removed, :] = means[g.name][removed].to(a.dtype)
            return (from_unit_view(a, g, args[0].shape), *args[1:])

        for c in g.consumers:
            handles.append(modules[c.name].register_forward_pre_hook(pre))
    return handles


def sequential_means(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], x: torch.Tensor,
                     bars: Bars = QUIET) -> dict[str, torch.Tensor]:
    """Unit means measured layer by layer with the earlier layers already cut.

    Cutting layer ℓ shifts what layer ℓ+1 produces, so the dense means no longer describe the units
    that replace layer ℓ+1's removed ones; measuring each layer behind the earlier cuts keeps the
    replacement the mean of what the cut model actually computes.
    """
    means: dict[str, torch.Tensor] = {}
    for g in bars.track(trace.groups, "unit means behind earlier cuts"):
        handles = mask_hooks(model, trace, keep, means)
        try:
            means[g.name] = unit_means(model, Trace([g], [], trace.input_shape, trace.output_shape), x)[g.name]
        finally:
            for h in handles:
                h.remove()
    return means


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    return torch.nonzero(mask).reshape(-1)


def _rebind(g: Group, modules: dict[str, nn.Module]) -> Group:
    consumers = [Consumer(c.name, modules[c.name], c.spatial, c.norm_after) for c in g.consumers]
    return Group(g.name, modules[g.name], g.units, list(g.norms), consumers)


class _Captured(Exception):
    pass


def _capture(model: nn.Module, name: str, xb: torch.Tensor, output: bool) -> torch.Tensor:
    """Run ``model`` on ``xb`` only as far as layer ``name``; return that layer's input or output."""
    module = dict(model.named_modules())[name]
    box = []

    def hook(mod, args, out=None):
        box.append(out if output else args[0])
        raise _Captured

    handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(xb)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box[0]


def _design(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return inp.reshape(-1, module.in_features)
    cols = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return out.reshape(-1, out.shape[-1])
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def refit(model: nn.Module, dense: nn.Module, name: str, kept_outputs: torch.Tensor | None,
          x: torch.Tensor, ridge: float | None = None, batch: int = 64) -> None:
    """Ridge least-squares refit of consumer ``name`` in ``model`` to the dense model's pre-activations."""
    module = dict(model.named_modules())[name]
    xtx = xtz = None
    for xb in x.split(batch):
        inp = _capture(model, name, xb, output=False)
        target = _capture(dense, name, xb, output=True)
        per_sample = _design(module, inp[:1]).numel()
        step = max(1, ROWS_PER_CHUNK // max(per_sample, 1))
        for ib, tb in zip(inp.split(step), target.split(step)):
            design = _design(module, ib)
            z = _targets(module, tb)
            if kept_outputs is not None:
                z = z[:, kept_outputs]
            design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype)], 1).double()
            xtx = design.T @ design if xtx is None else xtx + design.T @ design
            xtz = design.T @ z.double() if xtz is None else xtz + design.T @ z.double()
    ridge = RIDGE if ridge is None else ridge
    d = xtx.shape[0] - 1
    reg = torch.zeros_like(xtx)
    reg.diagonal()[:d] = ridge * xtx.diagonal()[:d].mean().clamp_min(1e-12)
    try:
        sol = torch.linalg.solve(xtx + reg, xtz)
    except RuntimeError:
        sol = torch.linalg.lstsq(xtx + reg, xtz).solution
    w, b = sol[:d].T, sol[d]
    module.weight = _param(w.reshape(module.weight.shape).to(module.weight.dtype), module.weight)
    if module.bias is None:
        module.bias = nn.Parameter(b.to(module.weight.dtype), requires_grad=module.weight.requires_grad)
    else:
        module.bias = _param(b.to(module.bias.dtype), module.bias)
