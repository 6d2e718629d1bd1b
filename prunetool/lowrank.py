"""``lowrank``: factor layers into rank-k products, the rank chosen by a fixed k, an energy threshold, the
elbow of the residual curve, or an accuracy budget. Same loading, data, verification and report as shrink."""

from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn

from .api import LATENCY_BATCHES, _prepare, conclude
from .calls import capture, design_matrix
from .data import eval_loader
from .errors import UsageError
from .factor import elbow, factor, factorable, matrix, params_of, rank_for_energy, replace, saves, spectrum
from .load import check_writable
from .measure import evaluate
from .progress import Bars
from .recover import finetune
from .verify import check_forward


def input_covariance(model: nn.Module, name: str, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``C = E[x xᵀ]`` of the inputs a layer's weight multiplies (conv: unfolded patches) over ``x``."""
    module = model.get_submodule(name)
    total, count = None, 0
    for xb in x.split(batch):
        design = design_matrix(capture(model, name, xb), module.weight).double()
        total = design.T @ design if total is None else total + design.T @ design
        count += len(design)
    return total / count


def candidates(model: nn.Module, heads: list[str], layers: str | None) -> list[str]:
    names = [n for n, m in model.named_modules() if factorable(m) and not _inside_factored(model, n)]
    if layers:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in layers.split(","))]
        if not chosen:
            raise UsageError(f"--layers {layers!r} matches no Linear or Conv2d layer; names look like {names[0]!r}")
        return chosen
    return [n for n in names if n not in heads]


def _inside_factored(model: nn.Module, name: str) -> bool:
    parent, _, _ = name.rpartition(".")
    return bool(parent) and isinstance(model.get_submodule(parent), nn.Sequential) and \
        len(model.get_submodule(parent)) == 2 and all(factorable(m) for m in model.get_submodule(parent))


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((torch.cat([model(b).argmax(-1) for b in x.split(256)]) == y).float().mean())


def search_ranks(dense, specs, upper, x, y, max_drop, bars) -> tuple[dict[str, int], int]:
    """Greedy: largest layers first, the smallest rank (binary search) that keeps the calibration accuracy
    within ``max_drop`` points of the dense model, with the layers already chosen in place."""
    base = _accuracy(dense, x, y)
    model = copy.deepcopy(dense)
    chosen, evaluations = {}, 0
    order = sorted(upper, key=lambda n: -params_of(dense.get_submodule(n)))
    for name in bars.track(order, "rank search"):
        original = dense.get_submodule(name)
        lo, hi, best = 1, upper[name], None
        while lo <= hi:
            k = (lo + hi) // 2
            replace(model, name, factor(original, k, specs[name]))
            evaluations += 1
            if base - _accuracy(model, x, y) <= max_drop:
                best, hi = k, k - 1
            else:
                lo = k + 1
        replace(model, name, factor(original, best, specs[name]) if best else copy.deepcopy(original))
        if best:
            chosen[name] = best
    return chosen, evaluations


def lowrank(model, data=None, *, rank: int | None = None, energy: float | None = None, layers: str | None = None,
            data_aware: bool = False, max_drop: float | None = None, calib: int = 1000, eval: int | None = None,
            input_shape=None, device: str = "cpu", out: str | None = None, arch=None, arch_kwargs=None,
            unsafe_pickle: bool = False, download: bool = False, progress: bool = False,
            latency_batches=LATENCY_BATCHES, measure: bool = True, onnx: str | None = None,
            finetune_epochs: int = 0, lr: float = 1e-3, batch_size: int = 128, optimizer: str = "adam",
            distill: bool = False) -> tuple[nn.Module, dict]:
    """Factor layers into rank-k products; the rank by ``rank``, ``energy``, or the elbow (default)."""
    if rank is not None and energy is not None:
        raise UsageError("give one of --rank, --energy and --elbow")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy {energy} is outside (0, 1]; e.g. 0.9 keeps 90% of Σσ²")
    method = "rank" if rank is not None else "energy" if energy is not None else "elbow"
    if out is not None and not isinstance(model, nn.Module):
        check_writable(out, str(model))
    bars = Bars(progress)
    job = _prepare(model, data, calib, input_shape, arch, arch_kwargs, unsafe_pickle, download)
    if (data_aware or max_drop is not None) and not job.data.has_labels:
        raise UsageError("--data-aware and --max-drop need --data (calibration inputs and labels)")
    dense, x, y = job.dense, job.x, job.y
    names = candidates(dense, job.graph.heads, layers)

    specs, entries, upper = {}, [], {}
    for name in bars.track(names, "singular values"):
        module = dense.get_submodule(name)
        specs[name] = spectrum(module, input_covariance(dense, name, x) if data_aware else None)
        full = len(specs[name].sigma)
        k = min(full, rank) if method == "rank" else rank_for_energy(specs[name], energy) if method == "energy" \
            else elbow(specs[name])
        m, n = matrix(module).shape
        max_saving = max(0, (m * n - 1) // (m + n))
        upper[name] = min(full, max_saving)
        entries.append({"name": name, "shape": [m, n], "full_rank": full, "elbow": elbow(specs[name]), "rank": k,
                        "params_before": params_of(module)})
    evaluations = 0
    if max_drop is not None:
        chosen, evaluations = search_ranks(dense, specs, {n: u for n, u in upper.items() if u >= 1}, x, y, max_drop,
                                           bars)
        for e in entries:
            e["rank"] = chosen.get(e["name"])

    small = copy.deepcopy(dense)
    factored = dict(job.ckpt.record.get("factored", {}))
    for e in entries:
        module = dense.get_submodule(e["name"])
        k = e["rank"]
        if k is None or not saves(module, k):
            e.update(rank=None, energy=None, params_after=e["params_before"],
                     skipped=f"rank {k} would not save parameters" if k else "no rank within the accuracy budget")
            continue
        new = factor(module, k, specs[e["name"]])
        replace(small, e["name"], new)
        factored[e["name"]] = k
        e.update(energy=specs[e["name"]].energy(k), params_after=params_of(new))
    small.eval()
    probe = x[: min(len(x), 64)]
    expected = check_forward(small, probe, job.graph.output_shape)
    extra = {}
    if finetune_epochs:
        if not job.data.has_labels:
            raise UsageError("--finetune-epochs needs --data with a train split")
        loader = eval_loader(job.data, eval)
        step = {"accuracy_after_cut": evaluate(small, loader, device, bars, "evaluating the factored model")[0]}
        step["finetune_loss"] = finetune(small, job.data, finetune_epochs, lr, batch_size, optimizer,
                                         dense if distill else None, device, bars)
        step["accuracy_after_finetune"] = evaluate(small, loader, device, bars, "evaluating")[0]
        extra["steps"] = [step]
        expected = check_forward(small, probe, job.graph.output_shape)

    settings = {"method": method, "rank": rank, "energy": energy, "layers": layers, "data_aware": data_aware,
                "max_drop": max_drop, "search_evaluations": evaluations, "finetune_epochs": finetune_epochs,
                "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "distill": distill}
    report = conclude(job, "lowrank", small, settings, entries, {"forward": "ok"}, probe, expected,
                      factored=factored, out=out, eval=eval, device=device, bars=bars,
                      latency_batches=latency_batches, measure=measure, onnx=onnx, extra=extra)
    return small, report
