"""Mixture-of-experts: whole experts dropped by their routing on the calibration data.

A *block* is a module with a router child (``gate``: a 2-D ``weight`` of one row per expert, as Hugging Face's
Mixtral, Qwen-MoE and OLMoE routers hold it, or an ``nn.Linear``) and an experts child (``experts``: either an
``nn.ModuleList`` of expert MLPs, or one module whose parameters stack the experts along dimension 0). Removing
expert e slices its router row and its slab of every stacked parameter (or its module), and lowers every
``num_experts`` attribute that counted it; routing then picks among the others. That is exactly the dense model
with the removed experts' router logits at −∞ (:func:`routed_around`), which :func:`prunetool.verify` checks.

Experts are ranked by their *routing mass*: the routing weights they received summed over every calibration token
(a never-chosen expert has none). Each block drops the same number, never below its top-k.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import layers
from .batch import batch_len, batch_slice, batch_to, call, model_dtype
from .progress import QUIET, Bars

ROUTERS = ("gate", "router")
COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class Block:
    """One mixture-of-experts block: its name, router and experts."""

    name: str
    module: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def count(self) -> int:
        return self.router.weight.shape[0]

    @property
    def top_k(self) -> int:
        for m in (self.router, self.module, self.experts):
            for attr in ("top_k", "num_experts_per_tok"):
                if isinstance(getattr(m, attr, None), int):
                    return getattr(m, attr)
        return 1


def blocks(model: nn.Module) -> list[Block]:
    """The mixture-of-experts blocks of ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        router = next((getattr(module, r) for r in ROUTERS if isinstance(getattr(module, r, None), nn.Module)), None)
        experts = getattr(module, "experts", None)
        weight = getattr(router, "weight", None) if router is not None else None
        if not isinstance(experts, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        n = weight.shape[0]
        if _listed(experts, n) or any(p.dim() >= 2 and p.shape[0] == n for p in experts.parameters(recurse=False)):
            found.append(Block(name, module, router, experts))
    return found


def _listed(experts: nn.Module, n: int) -> bool:
    """Whether ``experts`` holds its ``n`` experts as children named 0 … n−1 (an ``nn.ModuleList``)."""
    return list(experts._modules) == [str(i) for i in range(n)]


def trace_example(model: nn.Module, probe, output_key: str | None = None, first: int = 2):
    """The batch to trace ``model`` on: the probe's ``first`` samples, or, where experts are modules that run only
    on the tokens routed to them, the fewest of the probe's samples that reach every one of them (doubling); and
    the expert modules even the whole probe does not reach."""
    listed = [m for b in blocks(model) if _listed(b.experts, b.count) for m in b.experts.children()]
    n, total = first, batch_len(probe)
    if not listed:
        return batch_slice(probe, 0, min(n, total)), []
    called: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in listed]
    try:
        with torch.no_grad():
            while True:
                called.clear()
                example = batch_slice(probe, 0, min(n, total))
                call(model, example, output_key)
                if len(called) == len(listed) or n >= total:
                    break
                n *= 2
    finally:
        for h in handles:
            h.remove()
    names = {id(m): name for name, m in model.named_modules()}
    return example, [names[id(m)] for m in listed if id(m) not in called]


def routing_mass(model: nn.Module, found: list[Block], samples, output_key: str | None = None,
                 bars: Bars = QUIET, batch: int = 16, device: str | None = None) -> dict[str, torch.Tensor]:
    """Per block, the routing weight each expert received, summed over the calibration tokens."""
    mass = {b.name: torch.zeros(b.count, dtype=torch.float64) for b in found}

    def hook(block):
        def record(module, args, out):
            logits = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(out, (tuple, list)) and len(out) >= 3 and out[2].dtype in (torch.int64, torch.int32):
                weights, index = out[1], out[2]
            else:  # a router that returns logits: the top-k of their softmax
                weights, index = torch.topk(F.softmax(logits.float(), -1), block.top_k, dim=-1)
            if weights.shape != index.shape:  # scores for every expert beside the chosen indices
                weights = weights.gather(-1, index.long())
            mass[block.name].index_add_(0, index.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
        return record

    handles = [b.router.register_forward_hook(hook(b)) for b in found]
    try:
        with torch.no_grad():
            for xb, _, _ in bars.track(list(samples.batches(batch)), "routing the calibration data"):
                call(model, batch_to(xb, device, model_dtype(model)), output_key)
    finally:
        for h in handles:
            h.remove()
    return mass


def choose(found: list[Block], mass: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Per block, the experts kept: the same number in every block, the highest routing mass, never fewer than
    the block's top-k."""
    keep = {}
    for b in found:
        n = max(b.top_k, b.count - int(ratio * b.count + 1e-9))
        order = torch.sort(mass[b.name], stable=True, descending=True).indices[:n]
        keep[b.name] = torch.sort(order).values
    return keep


def drop(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Remove the experts not in ``keep`` (block name → kept indices) from ``model`` in place."""
    for b in blocks(model):
        if b.name not in keep or len(keep[b.name]) == b.count:
            continue
        idx, n = keep[b.name], b.count
        for module in (b.router, b.experts):
            for attr, p in list(module.named_parameters(recurse=False)):
                if p.dim() >= 1 and p.shape[0] == n:
                    setattr(module, attr, nn.Parameter(p.detach()[idx].clone(), requires_grad=p.requires_grad))
            for attr, t in list(module.named_buffers(recurse=False)):  # per-expert buffers (a score correction)
                if t is not None and t.dim() >= 1 and t.shape[0] == n:
                    module._buffers[attr] = t[idx].clone()
        if _listed(b.experts, n):
            kept = [b.experts._modules[str(i)] for i in idx.tolist()]
            b.experts._modules.clear()
            b.experts._modules.update((str(j), m) for j, m in enumerate(kept))
        layers.kind_of(b.router).sync(b.router, {n: len(idx)})  # an nn.Linear router's out_features
        for m in (b.module, b.router, b.experts):
            for attr in COUNTS:
                if getattr(m, attr, None) == n:
                    setattr(m, attr, len(idx))


@contextmanager
def eager(model: nn.Module):
    """Within the context, Hugging Face experts run their per-expert loop (``experts_implementation="eager"``),
    whose calls read one expert's slab each, instead of a grouped matmul over all of them."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None),
                                                               "_experts_implementation_internal")}
    saved = {k: c._experts_implementation_internal for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation_internal = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._experts_implementation_internal = saved[k]


class _MaskedRouting(TorchFunctionMode):
    """Router logits of removed experts at −∞: the dense model routed as the cut one is."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        super().__init__()
        self.masks = masks  # id of a router weight → bool mask of its removed experts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            mask = self.masks.get(id(weight))
            if mask is not None:
                out = out.masked_fill(mask.to(out.device), float("-inf"))
        return out


@contextmanager
def routed_around(model: nn.Module, keep: dict[str, torch.Tensor]):
    """Within the context, ``model`` (dense) routes no token to the experts not in ``keep``."""
    masks = {}
    for b in blocks(model):
        if b.name in keep:
            mask = torch.ones(b.count, dtype=torch.bool)
            mask[keep[b.name]] = False
            masks[id(b.router.weight)] = mask
    with _MaskedRouting(masks):
        yield
