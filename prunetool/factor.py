"""Low-rank factorisation of layers (the surgery behind ``prunetool lowrank``; formulas in docs/METHOD.md).

``W (m×n) ≈ A B`` with ``A = U_k √Σ_k`` and ``B = √Σ_k V_kᵀ``. A Linear becomes ``Linear(n→k, no bias)``
then ``Linear(k→m)``; a ``kh×kw`` Conv2d (groups=1) becomes a ``kh×kw`` conv to k channels (same stride,
padding, dilation) then a 1×1 conv. Both are plain ``nn.Sequential`` blocks of standard layers, so they
trace, export to ONNX and reload like anything else.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from . import layers
from .calls import capture, design_matrix
from .data import as_samples, batch_to, call
from .errors import UsageError
from .progress import QUIET, Bars

FACTORABLE = (nn.Linear, nn.Conv2d)


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
    """The weight as out × fan-in (convs reshaped to out × in·kh·kw)."""
    return module.weight.detach().reshape(module.weight.shape[0], -1).double()


def factorable(module: nn.Module) -> bool:
    """A Linear or a Conv2d (groups=1; subclasses too, if they hold nothing but weight and bias)."""
    if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                              and module.padding_mode == "zeros")):
        return False
    own = set(dict(module.named_parameters(recurse=False))) | set(dict(module.named_buffers(recurse=False)))
    return own <= {"weight", "bias"}


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


def _narrowed(module: nn.Module, k: int) -> nn.Module:
    """A copy of a layer subclass with ``k`` outputs and no bias: it keeps whatever its ``forward`` does around its
    call (padding of its own, say)."""
    first = copy.deepcopy(module)
    w = module.weight
    first.weight = nn.Parameter(torch.empty((k, *w.shape[1:]), dtype=w.dtype, device=w.device))
    first.register_parameter("bias", None)
    layers.kind_of(first).sync(first, {w.shape[0]: k})
    return first


def empty_factored(module: nn.Module, k: int) -> nn.Sequential:
    """The two-layer replacement of ``module`` at rank ``k``, weights not yet set."""
    bias = module.bias is not None
    kw = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, k, bias=False, **kw) if type(module) is nn.Linear \
            else _narrowed(module, k)
        return nn.Sequential(first, nn.Linear(k, module.out_features, bias=bias, **kw))
    first = nn.Conv2d(module.in_channels, k, module.kernel_size, module.stride, module.padding, module.dilation,
                      bias=False, **kw) if type(module) is nn.Conv2d else _narrowed(module, k)
    return nn.Sequential(first, nn.Conv2d(k, module.out_channels, 1, bias=bias, **kw))


def factor(module: nn.Module, k: int, spec: Spectrum | None = None) -> nn.Sequential:
    """``module`` as a rank-``k`` product (truncated SVD of W, or of W·C^½ multiplied back)."""
    spec = spec or spectrum(module)
    root = spec.sigma[:k].sqrt()
    a = spec.u[:, :k] * root
    b = root[:, None] * spec.vh[:k]
    if spec.chol is not None:
        b = torch.linalg.solve_triangular(spec.chol, b, upper=False, left=False)  # b·L⁻¹
    out = empty_factored(module, k)
    dtype = module.weight.dtype
    with torch.no_grad():
        out[0].weight.copy_(b.reshape(out[0].weight.shape).to(dtype))
        out[1].weight.copy_(a.reshape(out[1].weight.shape).to(dtype))
        if module.bias is not None:
            out[1].bias.copy_(module.bias.detach())
    return out.train(module.training)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def refactor(model: nn.Module, factored: dict[str, int]) -> None:
    """Give a freshly built model the factored structure recorded in a saved file (shapes only)."""
    for name, k in factored.items():
        replace(model, name, empty_factored(model.get_submodule(name), k))


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def input_covariance(model: nn.Module, name: str, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``C = E[x xᵀ]`` of the inputs a layer's weight multiplies (conv: unfolded patches) over ``x``."""
    module = model.get_submodule(name)
    total, count = None, 0
    for xb in x.split(batch):
        design = design_matrix(capture(model, name, xb), module.weight).double()
        total = design.T @ design if total is None else total + design.T @ design
        count += len(design)
    return total / count


def inside_factored(model: nn.Module, name: str) -> bool:
    parent, _, _ = name.rpartition(".")
    return bool(parent) and isinstance(model.get_submodule(parent), nn.Sequential) and \
        len(model.get_submodule(parent)) == 2 and all(factorable(m) for m in model.get_submodule(parent))


def candidates(model: nn.Module, heads: list[str], layers_glob: str | None) -> list[str]:
    """Layers to factor: those matching ``layers_glob`` (comma-separated globs), else every factorable layer but
    the output head."""
    names = [n for n, m in model.named_modules() if factorable(m) and not inside_factored(model, n)]
    if layers_glob:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in layers_glob.split(","))]
        if not chosen:
            raise UsageError(f"--layers {layers_glob!r} matches no Linear or Conv2d layer; names look like "
                             f"{names[0]!r}" if names else f"--layers {layers_glob!r}: the model has no Linear or "
                             "Conv2d layer to factor")
        return chosen
    return [n for n in names if n not in heads]


def accuracy_on(model: nn.Module, samples) -> float:
    """Top-1 accuracy in percent on labelled calibration samples."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    correct = total = 0
    with torch.no_grad():
        for xb, yb, _ in as_samples(samples).batches(256):
            correct += int((call(model, batch_to(xb, None, dtype)).argmax(-1) == yb).sum())
            total += len(yb)
    return 100.0 * correct / max(1, total)


def search_ranks(dense: nn.Module, specs: dict[str, Spectrum], upper: dict[str, int], samples, max_drop: float,
                 bars: Bars = QUIET) -> tuple[dict[str, int], int]:
    """Greedy: largest layers first, the smallest rank (binary search) that keeps the calibration accuracy
    within ``max_drop`` points of the dense model, with the layers already chosen in place."""
    base = accuracy_on(dense, samples)
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
            if base - accuracy_on(model, samples) <= max_drop:
                best, hi = k, k - 1
            else:
                lo = k + 1
        replace(model, name, factor(original, best, specs[name]) if best else copy.deepcopy(original))
        if best:
            chosen[name] = best
    return chosen, evaluations
