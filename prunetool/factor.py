"""Low-rank factorisation of layers (the surgery behind ``prunetool lowrank``; formulas in docs/METHOD.md).

``W (m×n) ≈ A B`` with ``A = U_k √Σ_k`` and ``B = √Σ_k V_kᵀ``. A Linear becomes ``Linear(n→k, no bias)``
then ``Linear(k→m)``; a ``kh×kw`` Conv2d (groups=1) becomes a ``kh×kw`` conv to k channels (same stride,
padding, dilation) then a 1×1 conv. Both are plain ``nn.Sequential`` blocks of standard layers, so they
trace, export to ONNX and reload like anything else.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from . import layers
from .errors import UsageError


@dataclass
class Spectrum:
    """Singular values of a layer's weight matrix, or of ``W·L`` (``C = L·Lᵀ``) when data-aware."""

    sigma: torch.Tensor
    u: torch.Tensor
    vh: torch.Tensor
    chol: torch.Tensor | None = None

    def energy(self, k: int) -> float:
        s2 = self.sigma.double() ** 2
        return float(s2[:k].sum() / s2.sum()) if s2.sum() > 0 else 1.0

    def residual(self) -> torch.Tensor:
        """``r(k) = Σ_{i>k} σ_i²`` for k = 0 … rank."""
        s2 = self.sigma.double() ** 2
        return torch.cat([s2.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=s2.dtype)])


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight as out × fan-in (convs reshaped to out × in·kh·kw), in float64."""
    return layers.op_of(module).as_matrix(module.weight.detach()).double()


def saves(module: nn.Module, k: int) -> bool:
    """Whether rank k stores fewer weights (for convs the MACs then drop by the same factor)."""
    m, n = matrix(module).shape
    return k * (m + n) < m * n


def spectrum(module: nn.Module, cov: torch.Tensor | None = None) -> Spectrum:
    w = matrix(module)
    if cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return Spectrum(s, u, vh)
    # Any square root of C gives the same singular values (W·L = W·C^½·Q, Q orthogonal); the Cholesky factor
    # is the cheap one. A tiny ridge keeps it defined when some inputs never vary.
    chol = cholesky(cov.double())
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    return Spectrum(s, u, vh, chol)


def cholesky(cov: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of a covariance, with the smallest ridge (1e-8 of the mean variance, then ten times
    more until it works) that makes it defined: inputs that never vary, and float32 sums, leave it at the edge
    of positive-definite."""
    scale = cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(cov), dtype=cov.dtype)
    for jitter in (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        chol, info = torch.linalg.cholesky_ex(cov + eye * jitter * scale)
        if int(info) == 0:
            return chol
    return torch.linalg.cholesky(cov + eye * 1e-2 * scale)


def elbow(spec: Spectrum) -> int:
    """Kneedle on the residual curve r(k): normalised to [0, 1], the point farthest below the chord."""
    from kneed import KneeLocator

    r = spec.residual().numpy()
    ks = list(range(len(r)))
    if len(r) < 3 or r[0] <= 0:
        return 1
    knee = KneeLocator(ks, r, curve="convex", direction="decreasing").knee
    return max(1, int(knee)) if knee is not None else max(1, len(r) // 2)


def rank_for_energy(spec: Spectrum, energy: float) -> int:
    s2 = spec.sigma.double() ** 2
    kept = s2.cumsum(0) / s2.sum()
    return int(min(len(s2), int((kept < energy - 1e-12).sum()) + 1))


def factor(module: nn.Module, k: int, spec: Spectrum | None = None) -> nn.Sequential:
    """``module`` as a rank-``k`` product (truncated SVD of W, or of W·C^½ multiplied back)."""
    spec = spec or spectrum(module)
    root = spec.sigma[:k].sqrt()
    a = spec.u[:, :k] * root
    b = root[:, None] * spec.vh[:k]
    if spec.chol is not None:
        b = torch.linalg.solve_triangular(spec.chol, b, upper=False, left=False)  # b·L⁻¹
    out = layers.op_of(module).factored(module, k)  # the two layers, weights not yet set
    dtype = module.weight.dtype
    with torch.no_grad():
        out[0].weight.copy_(b.reshape(out[0].weight.shape).to(dtype))
        out[1].weight.copy_(a.reshape(out[1].weight.shape).to(dtype))
        if module.bias is not None:
            out[1].bias.copy_(module.bias.detach())
    return out.train(module.training)


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inside_factored(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is one half of a factorisation already made."""
    parent, _, _ = name.rpartition(".")
    return bool(parent) and layers.is_factored(model.get_submodule(parent))


def candidates(model: nn.Module, heads: list[str], layers_glob: str | None) -> tuple[list[str], list[str]]:
    """Layers to factor, and the output heads among them: those matching ``layers_glob`` (comma-separated globs;
    a head only when named exactly), else every factorable layer but the output heads."""
    names = [n for n, m in model.named_modules() if layers.factorable(m) and not inside_factored(model, n)]
    if not layers_glob:
        return [n for n in names if n not in heads], []
    patterns = [g.strip() for g in layers_glob.split(",") if g.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in patterns)
              and (n not in heads or n in patterns)]
    if not chosen:
        hint = f"names look like {names[0]!r}" if names else "the model has no Linear or Conv2d layer to factor"
        raise UsageError(f"--layers {layers_glob!r} matches no Linear or Conv2d layer (output heads only when named "
                         f"exactly); {hint}")
    return chosen, [n for n in chosen if n in heads]


# --- choosing ranks ----------------------------------------------------------------------------------------

def relative_error(spec: Spectrum, k: int) -> float:
    """``r(k) / r(0)``: the share of the layer's output energy a rank-k factorisation loses (data-aware: of
    ``E‖W x‖²`` over the calibration inputs, the expected relative output error)."""
    r = spec.residual()
    return float(r[min(k, len(r) - 1)] / r[0]) if r[0] > 0 else 0.0


def capped_rank(spec: Spectrum, k: int, max_error: float) -> tuple[int, str]:
    """``k`` if it loses at most ``max_error`` of the output energy, else the smallest rank that does."""
    r = spec.residual()
    if r[0] <= 0 or r[min(k, len(r) - 1)] / r[0] <= max_error:
        return k, "elbow"
    within = torch.nonzero(r / r[0] <= max_error).reshape(-1)
    return int(within[0]) if len(within) else len(r) - 1, "output-error cap"


@dataclass
class Candidate:
    """A layer that may be factored: its spectrum, what each rank costs and (with data) the loss it predicts."""

    name: str
    spec: Spectrum
    m: int
    n: int
    bias: int
    positions: int  # output positions per sample (tokens, conv pixels): MACs = positions × weights
    upper: int  # the largest rank that still saves
    loss: torch.Tensor | None = None  # predicted loss increase at rank k = 0 … len(σ)

    def params(self, k: int | None) -> int:
        return (self.m * self.n if k is None else k * (self.m + self.n)) + self.bias

    def macs(self, k: int | None) -> int:
        return self.positions * (self.m * self.n if k is None else k * (self.m + self.n))

    def predicted(self, k: int | None) -> float:
        if k is None:
            return 0.0
        if self.loss is not None:
            return float(self.loss[min(k, len(self.loss) - 1)])
        return relative_error(self.spec, k)  # without data: the share of the output energy lost


def predicted_loss(spec: Spectrum, fisher: torch.Tensor) -> torch.Tensor:
    """Second-order estimate of the loss a rank-k factorisation adds, for every k: ``½ Σ_{i>k} σ_i² Σ_j F_j U_ji²``
    (``F_j``: mean squared gradient of the loss at output unit j; ``U, σ``: the whitened spectrum), since the output
    error ``(W − W_k) x`` has covariance ``U_{>k} Σ²_{>k} U_{>k}ᵀ``."""
    w = (fisher.double()[:, None] * spec.u.double() ** 2).sum(0)
    terms = 0.5 * spec.sigma.double() ** 2 * w
    return torch.cat([terms.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=terms.dtype)])


def choices(c: Candidate, limit: int = 48) -> list[int | None]:
    """The ranks worth considering for a layer (about ``limit``, denser at small ranks) and None (kept whole)."""
    if c.upper < 1:
        return [None]
    ks = sorted({max(1, round(c.upper * (i / limit) ** 2)) for i in range(1, limit + 1)} | {1, c.upper})
    return ks + [None]


def allocate(cands: list[Candidate], lam: float, key: str) -> dict[str, int | None]:
    """Per layer, the rank that minimises predicted loss + λ × cost (``key``: params or macs)."""
    out = {}
    for c in cands:
        cost = c.params if key == "params" else c.macs
        out[c.name] = min(choices(c), key=lambda k: (c.predicted(k) + lam * cost(k), -(k or 10 ** 9)))
    return out


def cost_of(cands: list[Candidate], ranks: dict[str, int | None], key: str) -> int:
    return sum((c.params if key == "params" else c.macs)(ranks[c.name]) for c in cands)


def lambda_scale(cands: list[Candidate], key: str) -> float:
    """A λ at which factoring everything at rank 1 is preferred (the top of the search range)."""
    top = 0.0
    for c in cands:
        cost = c.params if key == "params" else c.macs
        saved = cost(None) - cost(1)
        if saved > 0:
            top = max(top, c.predicted(1) / saved)
    return max(top * 10, 1e-12)


def fit_budget(cands: list[Candidate], key: str, goal: int, fixed: int) -> tuple[dict[str, int | None], bool]:
    """The allocation of the smallest λ (bisection in log space) whose total cost, with ``fixed`` (what cannot be
    factored), meets ``goal``; False when even the most compressing allocation does not."""
    hi = lambda_scale(cands, key)
    if fixed + cost_of(cands, allocate(cands, hi, key), key) > goal:
        return allocate(cands, hi, key), False
    lo = hi * 1e-15
    if fixed + cost_of(cands, allocate(cands, lo, key), key) <= goal:
        return allocate(cands, lo, key), True
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        if fixed + cost_of(cands, allocate(cands, mid, key), key) <= goal:
            hi = mid
        else:
            lo = mid
    return allocate(cands, hi, key), True


def search_drop(cands: list[Candidate], key: str, evaluate_ranks, base: float, max_drop: float,
                steps: int = 8, floor: dict[str, int | None] | None = None) -> tuple[dict[str, int | None], int]:
    """The most compressing λ (bisection in log space, ``steps`` full evaluations) whose calibration accuracy is
    within ``max_drop`` points of ``base``; ``evaluate_ranks(ranks)`` gives the accuracy of an allocation. With
    ``floor``, no layer's rank goes below its entry there (None there: the layer stays whole)."""
    hi = lambda_scale(cands, key)
    lo = hi * 1e-12
    best = {c.name: None for c in cands}
    evaluations = 0
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        ranks = allocate(cands, mid, key)
        if floor is not None:
            ranks = {n: None if k is None or floor[n] is None else max(k, floor[n]) for n, k in ranks.items()}
        evaluations += 1
        if base - evaluate_ranks(ranks) <= max_drop:
            best, lo = ranks, mid
        else:
            hi = mid
    return best, evaluations


def greedy_baseline(cands: list[Candidate], key: str, goal: int, fixed: int, evaluate_ranks, candidates: int = 10
                    ) -> tuple[dict[str, int | None], int, dict]:
    """AIMET's SVD selection, the standard of the field: each layer alone factored at ``candidates`` ranks (even
    steps of compression) and the whole network evaluated each time; then the target accuracy is bisected, each
    layer taking the smallest rank whose own score reaches it (interpolated between candidates), until the total
    meets ``goal``. Returns the ranks, the number of full evaluations and the per-layer scores."""
    table, evaluations = {}, 0
    for c in cands:
        ranks = sorted({max(1, round(c.upper * i / candidates)) for i in range(1, candidates + 1)})
        scores = []
        for k in ranks:
            allocation = {d.name: None for d in cands}
            allocation[c.name] = k
            scores.append((k, evaluate_ranks(allocation)))
            evaluations += 1
        table[c.name] = scores

    def pick(target: float) -> dict[str, int | None]:
        out = {}
        for c in cands:
            scores = table[c.name]
            good = [k for k, acc in scores if acc >= target]
            if not good:
                out[c.name] = None
                continue
            k = min(good)
            below = [(kk, acc) for kk, acc in scores if kk < k]
            if below:  # interpolate towards the next smaller candidate
                k0, a0 = below[-1]
                a1 = dict(scores)[k]
                if a1 > a0:
                    k = max(1, round(k0 + (k - k0) * (target - a0) / (a1 - a0)))
            out[c.name] = k
        return out

    lo = min(acc for s in table.values() for _, acc in s) - 1
    hi = max(acc for s in table.values() for _, acc in s)
    best = pick(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        ranks = pick(mid)
        if fixed + cost_of(cands, ranks, key) <= goal:
            best, lo = ranks, mid
        else:
            hi = mid
    return best, evaluations, table
