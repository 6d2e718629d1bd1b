"""Depth: whole residual blocks removed (transformer layers, CNN residual blocks whose shortcut is the identity).

A *block* is a child of an ``nn.ModuleList`` or ``nn.Sequential`` among at least two siblings of its class, with
layers of its own, called once per forward on the whole batch, that returns one tensor of its first input's shape.
Removing it (:class:`prunetool.layers.Skip`) passes that input on: for a residual block (``x + f(x)``) the residual
stream goes on without ``f``. Which blocks go is measured, not assumed: greedily, the block whose removal (with
those already removed) moves the model's outputs least from the dense ones (:func:`prunetool.recover.
output_divergence` on held-out calibration inputs), as BlockPruner does; ShortGPT's block influence (1 − the
cosine of a block's input and output, per position) is reported beside it.

A Hugging Face decoder loses the layers themselves: the layer list is rebuilt without them, the attention
layers' ``layer_idx`` renumbered and the config's ``num_hidden_layers`` (and ``layer_types``) follow, so the
result is a directory ``from_pretrained`` reads. Elsewhere the block is replaced by ``Skip``, which prunetool's
file records (``factored``: ``"skip"``) and a reload rebuilds.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batch import batch_len, call, token_ids
from .layers import SKIPPED, Skip, clone, is_stack, replace, without
from .progress import QUIET, Bars
from .recover import output_divergence


@dataclass
class Block:
    """A removable block: its path, its container's and its index there, and its ShortGPT block influence."""

    name: str
    stack: str
    index: int
    influence: float = 0.0


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None) if not args else None


def _influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − the mean cosine of ``x`` and ``y`` per position (features: dimension 1 of an image map, else the last)."""
    if x.dim() == 4:
        x, y = x.movedim(1, -1), y.movedim(1, -1)
    x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
    return float(1 - F.cosine_similarity(x, y, dim=-1).mean())


def find(model: nn.Module, probe, output_key: str | None = None) -> list[Block]:
    """The blocks of ``model`` that can be removed (see the module docstring), with their block influence on
    ``probe``."""
    candidates = {}
    for stack, container in model.named_modules():
        if not is_stack(container):
            continue
        children = list(container.named_children())
        classes = [type(m) for _, m in children]
        for i, (child, m) in enumerate(children):
            if classes.count(type(m)) >= 2 and any(True for _ in m.children()) and \
                    any(True for _ in m.parameters()) and not isinstance(m, Skip):
                candidates[f"{stack}.{child}" if stack else child] = (stack, i, m)
    seen: dict[str, list] = {name: [] for name in candidates}

    def hook(name):
        def record(module, args, kwargs, out):
            seen[name].append((_first_tensor(args, kwargs), out))
        return record

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, (_, _, m) in candidates.items()]
    try:
        with torch.no_grad():
            call(model, probe, output_key)
    finally:
        for h in handles:
            h.remove()
    n = batch_len(probe)
    found = []
    for name, (stack, i, _) in candidates.items():
        if len(seen[name]) != 1:
            continue
        x, y = seen[name][0]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.shape[0] == n:
            found.append(Block(name, stack, i, _influence(x, y)))
    # blocks within blocks (a stage of residual blocks): only the innermost, so that no removal holds another
    return [b for b in found if not any(o.name.startswith(f"{b.name}.") for o in found)]


@contextmanager
def skipped(model: nn.Module, names: list[str]):
    """Within the context, the blocks ``names`` of ``model`` pass their input on."""
    saved = {name: model.get_submodule(name) for name in names}
    for name in names:
        replace(model, name, Skip())
    try:
        yield
    finally:
        for name, module in reversed(saved.items()):
            replace(model, name, module)


def choose(model: nn.Module, blocks: list[Block], inputs, count: int, output_key: str | None = None,
           bars: Bars = QUIET, metric: str | None = None) -> tuple[list[str], list[dict[str, float]]]:
    """``count`` blocks removed greedily, each time the one whose removal (with those before it) gives the least
    divergence from the dense outputs on ``inputs``; and each round's divergences. ``model`` is left as it was
    (the trials run on a copy sharing its weights)."""
    with torch.no_grad():
        want = call(model, inputs, output_key)
    model = clone(model, share=True)
    removed: list[str] = []
    rounds = []
    for _ in bars.track(range(count), "choosing the blocks to remove"):
        costs = {}
        for b in blocks:
            if b.name in removed:
                continue
            with skipped(model, removed + [b.name]), torch.no_grad():
                got = call(model, inputs, output_key)
                costs[b.name] = max(0.0, float(output_divergence(got, want, token_ids(inputs), metric)))
        best = min(costs, key=costs.get)
        removed.append(best)
        rounds.append({k: round(v, 6) for k, v in costs.items()})
    return removed, rounds


def _decoder_layers(model: nn.Module, stack: str) -> bool:
    """Whether ``stack`` is a Hugging Face model's list of ``num_hidden_layers`` layers."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    layers = model.get_submodule(stack)
    return is_stack(layers) and isinstance(n, int) and len(layers) == n and hasattr(config, "to_dict")


def remove(model: nn.Module, blocks: list[Block], names: list[str]) -> dict[str, str]:
    """Remove the blocks ``names`` of ``model`` (a copy whose modules are its own: the config is copied before it
    changes); returns the structural record of those replaced by :class:`Skip` (name → ``"skip"``)."""
    by_name = {b.name: b for b in blocks}
    record: dict[str, str] = {}
    stacks: dict[str, list[Block]] = {}
    for name in names:
        stacks.setdefault(by_name[name].stack, []).append(by_name[name])
    decoders = [stack for stack in stacks if _decoder_layers(model, stack)]
    if len(decoders) > 1:  # the config's one layer count cannot say which stack lost which layers
        raise ValueError(f"layers of {len(decoders)} stacks ({', '.join(decoders)}) would go; one config holds their "
                         "count")
    for stack, gone in stacks.items():
        if stack not in decoders:
            for b in gone:
                replace(model, b.name, Skip())
                record[b.name] = SKIPPED
            continue
        old = model.get_submodule(stack)
        kept = [i for i in range(len(old)) if i not in {b.index for b in gone}]
        replace(model, stack, without(old, kept))
        for new_index, layer in enumerate(model.get_submodule(stack)):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new_index
        _shrink_config(model, kept)
    return record


def _shrink_config(model: nn.Module, kept: list[int]) -> None:
    """Every module's config (one object, shared) replaced by a copy with only the ``kept`` layers."""
    old = model.config
    new = copy.deepcopy(old)
    new.num_hidden_layers = len(kept)
    types = getattr(old, "layer_types", None)
    if isinstance(types, list) and len(types) > max(kept, default=0):
        new.layer_types = [types[i] for i in kept]
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new
