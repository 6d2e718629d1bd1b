"""What a trace finds: groups of units removed together, the layers that produce, carry and read them, and what
is protected and why (:func:`prunetool.trace.trace` builds them; every later stage reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops


@dataclass
class Producer:
    """A layer whose outputs are the group's units: rows (``dim``) of its ``weight`` and entries of ``bias``.

    Unit u is rows ``offset + u·width … offset + (u+1)·width``: ``width`` > 1 for an attention head (its channels),
    ``offset`` for one part of a fused projection (the keys of a q|k|v layer)."""

    name: str
    module: nn.Module
    weight: str = "weight"
    bias: str | None = "bias"
    dim: int = 0
    offset: int = 0
    width: int = 1

    def rows(self, units: torch.Tensor) -> torch.Tensor:
        return (self.offset + units[:, None] * self.width + torch.arange(self.width)).reshape(-1)


@dataclass
class Consumer:
    """A layer that reads a group's units: input channels ``offset … offset+units`` (× ``spatial`` features),
    repeated ``repeat`` times every ``period`` input channels (:class:`prunetool.channels.Channels`).

    ``op`` is its weighted call (:mod:`prunetool.ops`): how it reads them, and all arithmetic on its weight, whose
    input dimension is ``dim``.
    """

    name: str
    module: nn.Module
    offset: int = 0
    spatial: int = 1
    norm_after: str | None = None  # BatchNorm right after it, which can absorb a constant when it has no bias
    weight: str = "weight"
    dim: int = 1
    op: ops.Op = ops.LINEAR
    padded: bool = False  # its call pads the input (a constant unit is then not constant at the borders)
    bias: str | None = "bias"
    repeat: int = 1
    period: int = 0
    new_bias: bool = True  # the cut may give it a bias it lacks (not where the output's format cannot hold one)

    @property
    def width(self) -> int:
        """The input channels of one unit."""
        return self.spatial * self.repeat


@dataclass
class Member:
    """Per-channel tensors cut with the units: a BatchNorm, a depthwise conv, a PReLU, a layer scale."""

    name: str
    module: nn.Module
    offset: int = 0
    tensors: tuple[tuple[str, int], ...] = ()  # (attribute, channel dimension)


@dataclass
class Group:
    """Units removed together: the outputs of coupled producers, with their members and consumers."""

    name: str
    producers: list[Producer]
    units: int
    members: list[Member] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    blocks: int = 1  # a grouped-conv producer: remove the same count from each of these contiguous blocks

    @property
    def heads(self) -> bool:
        """Whether the units are attention heads (or key/value groups): a producer's unit spans several rows."""
        return any(p.width > 1 for p in self.producers)


@dataclass
class Protected:
    name: str
    reason: str


@dataclass
class Trace:
    groups: list[Group]
    protected: list[Protected]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    order: dict[str, int] = field(default_factory=dict)  # layer name → position of its first call
    heads: list[str] = field(default_factory=list)  # producers whose units are the model's outputs
    activation_bytes: int = 0  # every intermediate tensor of one sample's forward pass (sizes batches)

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)
