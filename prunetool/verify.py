"""Verify stage: never hand back a silently wrong model.

After every cut: the cut model runs on calibration inputs with the dense output shape; the cut with
nothing removed reproduces the dense model exactly; the cut equals the dense model with the removed
units zeroed at every consumer; a unit made constant and removed with mean compensation leaves the
outputs unchanged; and the saved file reloads to identical outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import layers, precision
from .batch import Batch, batch_slice, call, forward
from .cut import complement, cut, mask_hooks, takes_means
from .errors import UsageError, VerificationError
from .load import load, upcast_half
from .score import unit_means
from .store import trim_heap
from .trace import Trace
from .units import consumer_hooks, mean_key, readers, unit_view

TOLERANCE = 1e-4  # relative to the largest output magnitude


def check_forward(model: nn.Module, x: Batch, output_shape: tuple[int, ...], output_key: str | None = None
                  ) -> torch.Tensor:
    """Run ``model`` on ``x``; its logits must have the dense model's shape and be finite."""
    try:
        with torch.no_grad():
            out = call(model, x, output_key)
    except Exception as e:
        raise VerificationError(f"the cut model fails its forward pass: {str(e).splitlines()[0]}") from None
    if tuple(out.shape[1:]) != tuple(output_shape):
        raise VerificationError(f"output shape changed from {tuple(output_shape)} to {tuple(out.shape[1:])}")
    if not torch.isfinite(out).all():
        raise VerificationError("the cut model produces non-finite outputs")
    return out


def outputs_of(model: nn.Module, x: Batch) -> torch.Tensor:
    """Every tensor the model returns, flattened and joined (a structured output is compared whole)."""
    with torch.no_grad():
        out = forward(model, x)
    return torch.cat([t.reshape(-1).float().cpu() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                      and t.dtype.is_floating_point])  # on the CPU: an offloaded model computes on the GPU


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_identity(dense: nn.Module, trace: Trace, x: Batch) -> None:
    """A cut that keeps every unit must leave the model exactly as it was."""
    keep = {g.name: torch.arange(g.units) for g in trace.groups}
    same = cut(layers.clone(dense, share=True), trace, keep, "none")
    if not torch.equal(outputs_of(same, x), outputs_of(dense, x)):
        raise VerificationError("a cut that removes nothing changes the outputs (ratio 0 is not exact)")


def removal_difference(dense: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], x: Batch) -> float:
    """The relative difference between the cut without compensation and the dense model with the removed units
    zeroed where they are read (0 when the tracer read the model right; NaN counts as a difference)."""
    small = cut(layers.clone(dense, share=True), trace, keep, "none")
    zeros = {g.name: {mean_key(c.name, c.offset): torch.zeros(g.units, c.width) for c in g.consumers}
             for g in trace.groups}
    with mask_hooks(dense, trace, keep, zeros):
        masked = outputs_of(dense, x)
    diff = _relative(outputs_of(small, x), masked)
    return diff if diff == diff else float("inf")


def misread_groups(dense: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], x: Batch) -> dict[str, float]:
    """The groups whose removal alone is not the same as zeroing them (the tracer misread them), each with its
    relative difference; empty when the whole cut agrees. The rest must then agree together: when it does not
    (groups that misread only jointly), :class:`VerificationError`."""
    if removal_difference(dense, trace, keep, x) <= TOLERANCE:
        return {}
    whole = {g.name: torch.arange(g.units) for g in trace.groups}
    failing = {}
    for g in trace.groups:
        if len(keep[g.name]) < g.units:
            diff = removal_difference(dense, trace, {**whole, g.name: keep[g.name]}, x)
            if diff > TOLERANCE:
                failing[g.name] = diff
    check_removal(dense, trace, {**keep, **{name: whole[name] for name in failing}}, x)  # the rest, together
    return failing


def check_removal(dense: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], x: Batch) -> float:
    """Removal must equal zeroing the removed units where they are read (the cut without compensation against
    the dense model with those units zeroed). Returns the relative difference."""
    diff = removal_difference(dense, trace, keep, x)
    if diff > TOLERANCE:
        removed = sum(len(complement(keep[g.name], g.units)) for g in trace.groups)
        raise VerificationError(f"removing {removed} units is not the same as zeroing them "
                                f"(relative difference {diff:.2g}); the tracer misread this model")
    return diff


def _unpadded(consumer) -> bool:
    """No zero padding in the consumer's own call (padding its module does before the call shows up in what the
    call reads, which :func:`_constant_at_consumers` checks)."""
    return consumer.op.exact_for_constants(consumer.padded)


def check_constant_unit(dense: nn.Module, trace: Trace, x: Batch, skip: frozenset = frozenset()) -> float | None:
    """Make one unit constant, remove it with mean compensation: outputs must not change.

    Unit 0 of a group is made constant by zeroing its incoming weights in every producer. Only a group in
    which that really yields a constant at every consumer qualifies (zero padding or a padded average pool on
    the way makes the borders differ); returns the relative difference, or None when no group qualifies.
    """
    for group in trace.groups:
        if group.name in skip:  # a group the tracer misread (kept whole): no test of compensation
            continue
        if group.units < 2 or not all(_unpadded(c) for c in group.consumers):
            continue
        modules = dict(dense.named_modules())
        if not all(takes_means(modules[c.name], c, modules) for c in group.consumers):
            continue  # a consumer that may not be given a bias: no place for the constant
        model = layers.clone(dense, share=True)
        modules = dict(model.named_modules())
        _own_float32([modules[n] for n in {p.name for p in group.producers} | {c.name for c in group.consumers}
                      | {c.norm_after for c in group.consumers if c.norm_after}])
        with torch.no_grad():
            for p in group.producers:
                rows = p.rows(torch.tensor([0]))
                getattr(modules[p.name], p.weight).index_fill_(p.dim, rows, 0.0)
                if p.bias is not None:
                    getattr(modules[p.name], p.bias)[rows] = 0.5
        if not _constant_at_consumers(model, trace, group, x):
            continue
        keep = {g.name: torch.arange(1 if g is group else 0, g.units) for g in trace.groups}
        means = unit_means(model, trace, x, groups=[group])
        want = outputs_of(model, x)
        diff = _relative(outputs_of(cut(model, trace, keep, "mean", means), x), want)  # in place: one copy
        if diff > TOLERANCE:
            raise VerificationError(f"removing a constant unit of {group.name} with mean compensation changes "
                                    f"the outputs (relative difference {diff:.2g})")
        return diff
    return None


def _own_float32(modules: list[nn.Module]) -> None:
    """Copies of these modules' own tensors, half precision made float32, to write into without touching the
    model they were cloned from (and, for a half-precision model, to check the compensation without rounding)."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32 if t.dtype in precision.HALF else t.dtype, copy=True)

    with torch.no_grad():
        for module in modules:
            for attr, t in list(module._parameters.items()):
                if t is not None:
                    module._parameters[attr] = nn.Parameter(copy(t.detach()), requires_grad=t.requires_grad)
            for attr, t in list(module._buffers.items()):
                if t is not None:
                    module._buffers[attr] = copy(t)


def _constant_at_consumers(model: nn.Module, trace: Trace, group, x: Batch) -> bool:
    spans = []

    def on_input(a, read):
        for g, c in read:
            v = unit_view(a.detach(), g, c)[:, 0]
            spans.append(((v.max() - v.min()) / v.abs().max().clamp_min(1e-12)).item())

    with torch.no_grad(), consumer_hooks(model, readers(trace, [group]), on_input):
        forward(model, x)
    return bool(spans) and max(spans) < 1e-6


def check_reload(path: str, x: Batch, expected: torch.Tensor, arch: str | None = None,
                 arch_kwargs: dict | None = None, reuse: dict[str, torch.Tensor] | None = None) -> str:
    """Load a written file back as a later :func:`prunetool.load` with no flags will; outputs must be identical (an
    output that overflows to inf or NaN, as random weights in some deep nets do, must do so at the same places).
    When the file's architecture is refused without flags (no signing key could be kept on this machine), it is
    loaded with ``arch`` as the user gave it. ``reuse``: the written model's state dict (see :func:`load`: the file
    is still read whole and checked, bit for bit). Returns ``"identical"`` or ``"identical with --arch"``."""
    how = "identical"
    try:
        model = load(path, reuse=reuse).model.eval()
    except UsageError:
        if arch is None:
            raise
        model, how = load(path, arch=arch, arch_kwargs=arch_kwargs, reuse=reuse).model.eval(), "identical with --arch"
    if precision.active() is None:  # computed in float32 like the model it is compared with
        upcast_half(model)
    out = outputs_of(model, x)
    if not torch.allclose(out, expected, rtol=0.0, atol=0.0, equal_nan=True):
        diff = (out - expected).abs().nan_to_num(nan=float("inf")).max().item()
        raise VerificationError(f"the saved model reloads with different outputs (max abs diff {diff:.3g})")
    return how


EXACT_PROBE = 8  # samples for the checks that must hold exactly (ratio 0, a constant unit)
REMOVAL_PROBE = 16  # a misread graph differs by orders of magnitude more than the tolerance on any sample


def verify(dense: nn.Module, small: nn.Module, trace: Trace, keep: dict[str, torch.Tensor],
           x: Batch, output_key: str | None = None, misread: frozenset = frozenset()) -> dict:
    """Every check on the cut model; raises :class:`VerificationError` on the first failure."""
    out = check_forward(small, x, trace.output_shape, output_key)
    check_identity(dense, trace, batch_slice(x, 0, EXACT_PROBE))
    trim_heap()  # each check's copies go back to the system before the next makes its own
    removal = check_removal(dense, trace, keep, batch_slice(x, 0, REMOVAL_PROBE))
    trim_heap()
    constant = check_constant_unit(dense, trace, batch_slice(x, 0, EXACT_PROBE), misread)
    trim_heap()
    return {"forward": "ok", "ratio_zero": "exact", "removal_rel_diff": removal,
            "constant_unit_rel_diff": constant, "outputs": out}
