"""Unit geometry: where a group's units sit in what each consumer reads, and running means of them.

``a_i`` is what a consumer reads from unit i: at every position (pixel, token) a vector of the unit's ``width``
channels (1 for a conv channel or an MLP unit, the head size for an attention head, ``H·W`` for a conv channel
flattened into a Linear). The consumer's op (:mod:`prunetool.ops`) says where those channels are; this module
gives the views, the hooks that read or replace them, and their dataset means, which the calibration passes,
scoring, compensation and verification share.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from . import calls
from .distributed import reduce_sum
from .trace import Consumer, Group, Trace

Means = dict[str, dict[str, torch.Tensor]]  # group → consumer → (units × width)


def unit_view(x: torch.Tensor, group: Group, consumer: Consumer) -> torch.Tensor:
    """The group's units in a consumer's input, as a (batch, units, positions, width) view of ``x``."""
    c = consumer
    if c.repeat == 1:  # an op of a user's written before layouts repeated takes four arguments
        return c.op.unit_view(x, c.offset, group.units, c.spatial)
    return c.op.unit_view(x, c.offset, group.units, c.spatial, c.repeat, c.period)


def input_columns(c: Consumer, units: torch.Tensor) -> torch.Tensor:
    """The indices of ``units`` along consumer ``c``'s weight input dimension."""
    if c.repeat == 1:
        return c.op.columns(c.offset, c.spatial, torch.as_tensor(units))
    return c.op.columns(c.offset, c.spatial, torch.as_tensor(units), c.repeat, c.period)


def readers(trace: Trace, groups: list[Group] | None = None) -> dict[str, list[tuple[Group, Consumer]]]:
    """Consumer layer name → the (group, consumer) pairs it reads."""
    out: dict[str, list] = {}
    for g in groups if groups is not None else trace.groups:
        for c in g.consumers:
            out.setdefault(c.name, []).append((g, c))
    return out


@contextmanager
def consumer_hooks(model: nn.Module, pairs: dict[str, list], on_input):
    """Hooks on what consumer layers read (the input of their own call); ``on_input(x, pairs)`` may return a
    replacement input."""
    handlers = {name: (lambda x, read=read: on_input(x, read)) for name, read in pairs.items()}
    weights = {name: read[0][1].weight for name, read in pairs.items()}
    with calls.hooks(model, on_input=handlers, weights=weights):
        yield


def replace_units(x: torch.Tensor, read, values: dict) -> torch.Tensor:
    """A copy of consumer input ``x`` with units replaced: ``values[(group, consumer)] = (indices, means)``."""
    y = x.contiguous().clone()
    for g, c in read:
        if (g.name, c.name, c.offset) in values:
            idx, m = values[(g.name, c.name, c.offset)]
            if c.repeat > 1:  # the units' view is a copy: write their columns
                y.view(-1, y.shape[-1])[:, input_columns(c, torch.as_tensor(idx))] = m.to(y.dtype).reshape(-1)
            else:
                unit_view(y, g, c)[:, idx] = m.to(y.dtype).reshape(len(idx), 1, -1)
    return y


class Sums:
    """Running sums for dataset means per (group, consumer)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, key, view: torch.Tensor):
        # positions are summed in the view's dtype (callers pass float64), samples in float64
        s = view.sum(2).double().sum(0)
        self.sums[key] = self.sums.get(key, 0) + s
        self.counts[key] = self.counts.get(key, 0) + view.shape[0] * view.shape[2]

    def means(self) -> Means:
        out: Means = {}
        for (g, c, o), s in self.sums.items():
            total, count = reduce_sum(s), reduce_sum(self.counts[(g, c, o)])
            out.setdefault(g, {})[mean_key(c, o)] = (total / count).float()
        return out


def mean_key(name: str, offset: int) -> str:
    """How ``Means`` names a consumer: a layer reading one group at two offsets has two entries."""
    return name if offset == 0 else f"{name}@{offset}"


def mean_of(means: Means, g: Group, c: Consumer) -> torch.Tensor:
    return means[g.name][mean_key(c.name, c.offset)]
