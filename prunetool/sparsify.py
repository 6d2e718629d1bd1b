"""``sparsify``: iterative magnitude pruning of single weights (seed 004: 30% of the remaining weights of
every layer per round, retraining between rounds, optional rewind), then physical removal of the units
left without incoming weights (their output is a constant: bias propagation replaces them exactly) or
without outgoing weights (nothing reads them), so the result is smaller, not just sparse (Evci §2.2)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .api import LATENCY_BATCHES, _prepare, conclude
from .cut import cut, input_columns, sequential_means
from .data import eval_loader
from .errors import UsageError
from .factor import factorable
from .measure import evaluate
from .progress import Bars
from .recover import finetune, has_batchnorm, recalibrate_bn
from .verify import check_forward, verify


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if factorable(m)}


def magnitude_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor], fraction: float) -> None:
    """Drop ``fraction`` of each layer's remaining weights, smallest magnitude first (ties: lowest index)."""
    for name, module in layers.items():
        alive = torch.nonzero(masks[name].flatten()).flatten()
        k = math.floor(fraction * len(alive))
        if k == 0:
            continue
        order = torch.sort(module.weight.detach().abs().flatten()[alive], stable=True).indices[:k]
        flat = masks[name].flatten().clone()
        flat[alive[order]] = False
        masks[name] = flat.reshape(masks[name].shape)


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.mul_(masks[name].to(module.weight.dtype))


def removable_units(graph, model: nn.Module) -> dict[str, torch.Tensor]:
    """Per group, the units kept: those with some incoming weight in a producer and some outgoing weight in a
    consumer."""
    modules = dict(model.named_modules())
    keep = {}
    for g in graph.groups:
        incoming = sum(getattr(modules[p.name], p.weight).detach().movedim(p.dim, 0).reshape(g.units, -1).abs().sum(1)
                       for p in g.producers)
        outgoing = torch.zeros(g.units, dtype=torch.float64)
        for c in g.consumers:
            w = getattr(modules[c.name], c.weight).detach().movedim(c.dim, 0)
            cols = input_columns(c, torch.arange(g.units))
            per = w[cols].abs().reshape(len(cols), -1).sum(1)
            outgoing += per.reshape(g.units, -1).sum(1).double()
        alive = (incoming > 0) & (outgoing > 0)
        if not alive.any():
            alive[int(torch.argmax(incoming))] = True  # every group keeps a unit
        keep[g.name] = torch.nonzero(alive).flatten()
    return keep


def sparsify(model, data, *, imp: float = 0.3, rounds: int = 3, finetune_epochs: int = 1, lr: float = 1e-3,
             batch_size: int = 128, optimizer: str = "adam", rewind: bool = False, calib: int = 1000,
             eval: int | None = None, device: str = "cpu", out: str | None = None, arch=None, arch_kwargs=None,
             unsafe_pickle: bool = False, download: bool = False, progress: bool = False,
             latency_batches=LATENCY_BATCHES, measure: bool = True, onnx: str | None = None,
             input_shape=None) -> tuple[nn.Module, dict]:
    if not 0.0 < imp < 1.0:
        raise UsageError(f"--imp {imp} is outside (0, 1); e.g. 0.3 prunes 30% of the remaining weights per round")
    if rounds < 1:
        raise UsageError("--rounds must be at least 1")
    bars = Bars(progress)
    job = _prepare(model, data, calib, input_shape, arch, arch_kwargs, unsafe_pickle, download)
    if not job.data.has_labels:
        raise UsageError("sparsify retrains between rounds: it needs --data with a train split")
    dense, x = job.dense, job.x
    sparse = copy.deepcopy(dense)
    layers = prunable_weights(sparse)
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    early = None
    loader = eval_loader(job.data, eval)
    history = []
    for r in range(rounds):
        magnitude_masks(layers, masks, imp)
        if rewind and early is not None:
            sparse.load_state_dict(early)
        apply_masks(layers, masks)
        losses = finetune(sparse, job.data, finetune_epochs, lr, batch_size, optimizer, device=device, bars=bars,
                          after_step=lambda m: apply_masks(layers, masks)) if finetune_epochs else []
        if rewind and early is None:
            early = copy.deepcopy(sparse.state_dict())
        total = sum(int(m.numel()) for m in masks.values())
        history.append({"round": r + 1, "sparsity": 1 - sum(int(m.sum()) for m in masks.values()) / total,
                        "finetune_loss": losses, "accuracy": evaluate(sparse, loader, device)[0]})

    graph = job.graph
    keep = removable_units(graph, sparse)
    means = sequential_means(sparse, graph, keep, x, bars)
    small = cut(copy.deepcopy(sparse), graph, keep, "mean", means, x, bars).eval()
    probe = x[: min(len(x), 64)]
    checks = verify(sparse, small, graph, keep, probe)
    checks.pop("outputs")
    if has_batchnorm(small) and any(len(keep[g.name]) < g.units for g in graph.groups):
        recalibrate_bn(small, x)
    expected = check_forward(small, probe, graph.output_shape)

    per_layer = [{"name": n, "weights": int(masks[n].numel()), "nonzero": int(masks[n].sum()),
                  "sparsity": 1 - float(masks[n].float().mean())} for n in layers]
    units = [{"name": g.name, "units_before": g.units, "units_after": len(keep[g.name]),
              "producers": [p.name for p in g.producers]} for g in graph.groups]
    settings = {"imp": imp, "rounds": rounds, "finetune_epochs": finetune_epochs, "lr": lr, "batch_size": batch_size,
                "optimizer": optimizer, "rewind": rewind}
    nonzero = sum(int((p != 0).sum()) for p in small.parameters())
    report = conclude(job, "sparsify", small, settings, units, checks, probe, expected,
                      factored=job.ckpt.record.get("factored", {}), out=out, eval=eval, device=device, bars=bars,
                      latency_batches=latency_batches, measure=measure, onnx=onnx,
                      extra={"rounds": history, "sparsity": per_layer, "nonzero_params_after": nonzero})
    return small, report
