"""Trace stage: which units exist, who consumes them, and which channels are coupled.

The model is traced from one real forward pass. A ``TorchFunctionMode`` records every top-level torch call
(``linear``, ``conv2d``, ``batch_norm``, ``x.view(n, -1)``, in-place activations, residual adds,
``torch.cat``), and each call that uses a module's own weight is that module's: a layer is recognised by what
it does, whatever its class or children (a ``Conv2d`` subclass that pads in its ``forward``, a norm that also
activates). Each recorded tensor carries its *channel structure*: which dimension holds the channels and which
unit space each channel range belongs to.

- ``linear``/``conv`` with a module's own weight: that module consumes the input's units and its outputs
  open a new unit space (it is a *producer*).
- Ops that act on each channel separately pass the structure through: known element-wise functions, and any
  other op for which perturbing one input channel changes only that channel of the output (probed on the
  traced tensors). BatchNorm, depthwise convs, PReLU and per-channel parameters are *members*: sliced with
  the units.
- An element-wise op between two tensors (a residual add, a squeeze-excitation product) couples their spaces:
  channel i of one is channel i of the other, so they are removed together (union-find).
- ``cat`` along channels lays spaces side by side; a consumer then reads each at an offset.
- A flatten of a conv output into a Linear gives each unit ``H·W`` input features.
- Anything else (LayerNorm, a reshape that splits channels, attention, an op that mixes channels, the model's
  outputs) protects the spaces it touches, with the layer and op named. Protected units are never cut.

Layers registered as atomic in :mod:`prunetool.layers` are recorded as one call, their ``forward`` unread.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .analysis import Analysis
from .groups import Consumer, Group, Member, Producer, Protected, Trace
from .record import record

__all__ = ["Consumer", "Group", "Member", "Producer", "Protected", "Trace", "record", "trace"]


def trace(model: nn.Module, example, output_key: str | None = None) -> Trace:
    """Find the prunable groups of ``model`` from one forward pass on ``example`` (a tensor, or a dict of keyword
    tensors); ``output_key`` picks the logits in a structured output (:func:`prunetool.task.logits`)."""
    was_training = model.training
    model.eval()
    try:
        graph, input_tokens, output_tokens, output_shape = record(model, example, output_key)
    finally:
        model.train(was_training)
    analysis = Analysis(graph, model)
    analysis.run(input_tokens, output_tokens)
    groups, protected = [], []
    output_roots = {analysis.spaces.find(i) for i in analysis.output_roots}
    heads = [p.name for r in output_roots for p in analysis.spaces.spaces[r].producers]
    roots = dict.fromkeys(analysis.spaces.find(i) for i in range(len(analysis.spaces.spaces)))
    for root in roots:
        space = analysis.spaces.spaces[root]
        if not space.producers:
            continue
        names = ", ".join(dict.fromkeys(p.name for p in space.producers))
        reason = space.reason
        if reason is None and not space.consumers:
            reason = "no layer reads its units"
        if reason is None and space.size % space.blocks:
            reason = f"{space.size} units do not split into {space.blocks} conv groups"
        if reason is not None:
            protected.append(Protected(names, reason))
            continue
        producers = list({(p.name, p.weight, p.offset): p for p in space.producers}.values())
        groups.append(Group(producers[0].name, producers, space.size, _unique(space.members),
                            _unique(space.consumers), space.blocks))
    order = analysis.order
    groups.sort(key=lambda g: min(order[p.name] for p in g.producers))
    shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else ()
    n = len(example) if isinstance(example, torch.Tensor) else len(next(iter(example.values())))
    produced = [t for node in graph.nodes for t in node.outputs]
    activations = sum(math.prod(graph.shapes[t]) * graph.tensors[t].element_size() for t in produced) // max(1, n)
    return Trace(groups, protected, shape, output_shape[1:], order, heads, activations)


def _unique(items: list) -> list:
    seen, out = set(), []
    for item in items:
        key = (item.name, item.offset, getattr(item, "tensors", None))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
