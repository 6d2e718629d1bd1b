"""``inspect``: where a model is redundant, as numbers (Evci ch. 3; Heitmann; Martin & Mahoney).

Per prunable group: dead units (replacing them by their mean changes the loss by less than ``DEAD_NATS`` per
sample: MRP when the model is small enough, MRS otherwise), frozen units (the loss gradient at the unit's
pre-activation is ``FROZEN_RELATIVE`` of the layer's median or less, over the whole calibration set), the MRS
distribution, and how many units could go with an estimated loss change under 1%.

Per weight matrix (convs as out × in·kh·kw): singular values, stable and effective rank, elbow rank and the
energy kept there, eigenvalues of ``W·Wᵀ/n`` against the Marchenko–Pastur edge, frame potential, and what
lowrank at the elbow would save.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import calls, task
from .batch import batch_to, call, model_dtype
from .data import Samples
from .factor import Spectrum, elbow, matrix, spectrum
from .layers import factorable
from .progress import QUIET, Bars
from .score import mrp, mrs, unit_means
from .store import batch_size
from .trace import Trace

DEAD_NATS = 1e-6  # mean |loss change| per sample below which a unit is dead
FROZEN_RELATIVE = 1e-6  # mean |∂L/∂h_i| at or below this fraction of the layer's median: frozen
MRP_MAX_UNITS = 2048  # above this many units, dead units are found with MRS (one pass) instead of MRP
BUDGET = 0.01  # "units that could go": estimated loss change under 1% of the mean calibration loss


def stable_rank(sigma: torch.Tensor) -> float:
    return float((sigma.double() ** 2).sum() / sigma.double().max() ** 2) if sigma.max() > 0 else 0.0


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli: exp of the entropy of σ / Σσ."""
    p = sigma.double() / sigma.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def marchenko_pastur(w: torch.Tensor) -> dict:
    """Eigenvalues of X = W·Wᵀ/n (W oriented m ≤ n) against the MP bulk of i.i.d. entries of W's variance."""
    w = w.double()
    if w.shape[0] > w.shape[1]:
        w = w.T
    m, n = w.shape
    eig = torch.linalg.eigvalsh(w @ w.T / n).clamp_min(0)
    var = float(w.var(unbiased=False))
    q = m / n
    edge = var * (1 + math.sqrt(q)) ** 2
    return {"q": q, "sigma2": var, "lambda_plus": edge, "lambda_minus": var * (1 - math.sqrt(q)) ** 2,
            "spikes": int((eig > edge).sum()), "eigenvalues": eig.tolist()}


def mp_density(lam: torch.Tensor, q: float, var: float) -> torch.Tensor:
    lo, hi = var * (1 - math.sqrt(q)) ** 2, var * (1 + math.sqrt(q)) ** 2
    inside = (lam > lo) & (lam < hi)
    dens = torch.zeros_like(lam)
    dens[inside] = torch.sqrt((hi - lam[inside]) * (lam[inside] - lo)) / (2 * math.pi * var * q * lam[inside])
    return dens


def frame_potential(w: torch.Tensor) -> float:
    """FP(Ŵ) = ‖Ŵ Ŵᵀ‖²_F over the normalised rows."""
    wn = F.normalize(w.double(), dim=1)
    return float(((wn @ wn.T) ** 2).sum())


def matrix_report(name: str, module: nn.Module) -> tuple[dict, Spectrum]:
    w = matrix(module)
    spec = spectrum(module)
    k = elbow(spec)
    m, n = w.shape
    mp = marchenko_pastur(w)
    saved = m * n - k * (m + n)
    return {
        "name": name, "kind": type(module).__name__, "shape": [m, n], "singular_values": spec.sigma.tolist(),
        "stable_rank": stable_rank(spec.sigma), "effective_rank": effective_rank(spec.sigma),
        "elbow_rank": k, "elbow_energy": spec.energy(k), "mp": mp,
        "frame_potential": frame_potential(w), "frame_potential_min": float(max(m, m * m / n)),
        "lowrank_at_elbow": {"rank": k, "params_saved": max(0, saved), "worth_it": saved > 0},
    }, spec


def _frozen(model: nn.Module, trace: Trace, samples: Samples, size: int,
            output_key: str | None = None) -> dict[str, torch.Tensor]:
    """Mean |∂L/∂h_i| at each group's producer outputs (pre-activation), per unit."""
    sums: dict[str, torch.Tensor] = {}
    on_output, weights = {}, {}
    readers: dict[str, list] = {}
    for g in trace.groups:
        for p in g.producers:
            readers.setdefault(p.name, []).append((g, p))
    for name, read in readers.items():
        def hook(out, read=read):
            def on_grad(grad):
                cdim = 1 if grad.dim() == 4 else -1
                rows = grad.detach().abs().movedim(cdim, 0)
                for g, p in read:  # a fused projection holds several groups' rows (queries, keys, values)
                    v = rows[p.rows(torch.arange(g.units)).to(rows.device)].reshape(g.units, -1).double()
                    sums[g.name] = sums.get(g.name, 0) + v.sum(1) / v.shape[1]
            if out.requires_grad:
                out.register_hook(on_grad)
        on_output[name], weights[name] = hook, read[0][1].weight
    dtype = model_dtype(model)
    with calls.activation_gradients(model), calls.hooks(model, on_output=on_output, weights=weights):
        for xb, yb, _ in samples.batches(size):
            task.loss(call(model, batch_to(xb, None, dtype), output_key), yb, "sum").backward()
    return {k: v / len(samples) for k, v in sums.items()}


def unit_report(model: nn.Module, trace: Trace, samples: Samples, settings, bars: Bars = QUIET) -> list[dict]:
    model.eval()
    size = batch_size(trace, settings, backward=True)
    dtype = model_dtype(model)
    with torch.no_grad():
        mean_loss = float(torch.cat([task.loss(call(model, batch_to(xb, None, dtype), settings.output_key), yb, "none")
                                     for xb, yb, _ in samples.batches(size)]).mean())
    means = unit_means(model, trace, samples, settings=settings)
    saliency = mrs(model, trace, samples, means, settings, bars).scores
    units = sum(g.units for g in trace.groups)
    exact = units <= MRP_MAX_UNITS
    penalty = mrp(model, trace, samples, means, settings, bars).scores if exact else saliency
    frozen = _frozen(model, trace, samples, size, settings.output_key)
    n = len(samples)
    out = []
    for g in trace.groups:
        per_sample = saliency[g.name].double() / n
        dead = (penalty[g.name].double() / n < DEAD_NATS).nonzero().reshape(-1).tolist()
        grad = frozen[g.name]
        frozen_idx = (grad <= FROZEN_RELATIVE * grad.median().clamp_min(1e-30)).nonzero().reshape(-1).tolist()
        order = per_sample.sort().values
        could_go = int((order.cumsum(0) < BUDGET * mean_loss).sum())
        out.append({
            "name": g.name, "producers": [p.name for p in g.producers], "units": g.units,
            "dead": dead, "dead_by": "mrp" if exact else "mrs", "frozen": frozen_idx,
            "mrs_per_sample": per_sample.tolist(), "mean_abs_grad": grad.tolist(),
            "could_go_under_1pct": could_go, "mean_loss": mean_loss,
        })
    return out


def matrices(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if factorable(m)]
