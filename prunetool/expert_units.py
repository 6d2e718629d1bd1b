"""Units inside mixture-of-experts blocks whose experts are stacked in 3-D parameters (Hugging Face's Mixtral,
Qwen-MoE, OLMoE, gpt-oss): every expert's MLP units, removed per expert, the router untouched.

Expert e of a stacked module computes ``h = f(x·A[e]ᵀ …)`` then ``y = h·B[e]ᵀ``: its *input* parameters A read
the hidden state and give one or more rows per unit (gate|up concatenated, or interleaved), its *output*
parameter B reads the units. The tracer cannot follow a weight sliced in the forward, so the units are found from
the calls themselves, run eagerly (:func:`prunetool.experts.eager`): a call whose weight is one expert's slab of
a stacked parameter. The parts' layout is the one under which zeroing a unit's rows changes that unit's column of
``h`` alone, checked on both halves of the units; a block where neither layout holds is left whole, with the reason.

Every expert keeps the same number of units (the parameters stay stacked), each its own best by mean-replacement
saliency on the tokens routed to it: the variance of the unit's activation times its output column's squared norm.
``lstsq`` refits each expert's kept output columns (and its output bias, where it has one) by least squares to the
dense expert's outputs on those tokens; ``mean`` adds the removed units' means through their columns to an output
bias where the experts have one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from . import experts, ops
from .batch import batch_to, call, model_dtype
from .cut import FLOAT32_NOISE, RIDGE, n_removed
from .progress import QUIET, Bars

GRAM_BUDGET = 2 ** 31  # bytes of float64 Gram matrices kept for the refit; beyond it the experts are not refit
ALIGN = 8  # units kept per expert come in multiples of 8: grouped matmuls need 16-byte strides (8 half floats)
TOLERANCE = 1e-4  # relative difference allowed between the cut experts and the dense ones with the units zeroed


@dataclass
class Part:
    """An input parameter: ``parts`` rows per unit along dimension ``dim`` of the stacked tensor, and its bias."""

    attr: str
    dim: int
    parts: int
    bias: str | None = None


@dataclass
class Units:
    """The units inside one stacked experts module (``name``, in ``block``): its input parts, its output parameter
    (units along ``dim``) with its bias, ``units`` per expert, and whether the parts interleave (gate₀ up₀ gate₁
    up₁ …)."""

    name: str
    module: nn.Module
    block: str  # the mixture-of-experts block around it (router and experts), rerun by the checks
    inputs: list[Part]
    output: str
    dim: int
    bias: str | None
    units: int
    interleaved: bool = False

    @property
    def experts(self) -> int:
        return getattr(self.module, self.output).shape[0]

    def rows(self, part: Part, keep: torch.Tensor) -> torch.Tensor:
        """The rows of ``part`` that hold units ``keep``, in the order the layout keeps."""
        if part.parts == 1:
            return keep
        if self.interleaved:
            return (keep[:, None] * part.parts + torch.arange(part.parts)).reshape(-1)
        return (torch.arange(part.parts)[:, None] * self.units + keep).reshape(-1)

    def matrix(self, e: int) -> torch.Tensor:
        """Expert e's output weight as (outputs, units)."""
        w = getattr(self.module, self.output)[e]
        return w if self.dim == 2 else w.T

    def describe(self) -> dict:
        return {"name": f"{self.name}.units", "units_before": self.experts * self.units,
                "producers": [f"{self.name}.{p.attr}" for p in self.inputs]}


@dataclass
class Stats:
    """Per expert: tokens routed to it, and the sum, sum of squares and Gram matrix (None beyond
    :data:`GRAM_BUDGET`) of its units' activations over them."""

    count: torch.Tensor
    sums: torch.Tensor
    squares: torch.Tensor
    gram: torch.Tensor | None
    args: tuple = ()  # the experts module's call on the first batch (the checks rerun it)
    kwargs: dict = field(default_factory=dict)


class _SlabCalls(TorchFunctionMode):
    """Records ``(attr, expert, transposed, input, output)`` for every weighted call (:mod:`prunetool.ops`) whose
    weight is one expert's slab of a watched stacked parameter (id → (owner key, attr, parameter));
    ``transposed``: the call reads the slab's dimensions as (inputs, outputs)."""

    def __init__(self, watched: dict[int, tuple[str, str, torch.Tensor]], record):
        super().__init__()
        self.watched, self.record = watched, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = ops.of_call(ops.call_name(func).rstrip("_"))  # x @ W arrives as __matmul__
        if op is not None:
            w = op.weight_of(args, kwargs)
            found = _slab(w, self.watched) if isinstance(w, torch.Tensor) else None
            if found is not None:
                key, attr, e, p = found
                matrix = op.as_matrix(w)  # (outputs, inputs) as the call reads it
                transposed = not (matrix.shape == p.shape[1:] and matrix.stride() == p.stride()[1:])
                self.record(key, attr, e, transposed, op.input_of(args, kwargs), out)
        return out


def _slab(w: torch.Tensor, watched) -> tuple[str, str, int, torch.Tensor] | None:
    """``(key, attr, expert, parameter)`` when ``w`` is a 2-D view of one expert's slab of a watched parameter."""
    base = getattr(w, "_base", None)
    if base is None or id(base) not in watched or w.dim() != 2:
        return None
    key, attr, p = watched[id(base)]
    e, rest = divmod(w.storage_offset() - p.storage_offset(), p.stride(0))
    if rest or not 0 <= e < p.shape[0] or sorted(w.stride()) != sorted(p.stride()[1:]):
        return None
    return key, attr, e, p


@contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """``module`` with some parameters replaced (new tensors; the originals are put back untouched)."""
    saved = {a: module._parameters[a] for a in tensors}
    try:
        for a, t in tensors.items():
            module._parameters[a] = nn.Parameter(t, requires_grad=False)
        yield module
    finally:
        module._parameters.update(saved)


def stacked(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, experts module, block name)`` of every block whose experts are stacked parameters."""
    out = []
    names = {id(m): n for n, m in model.named_modules()}
    for b in experts.blocks(model):
        if not experts._listed(b.experts, b.count):  # a ModuleList of MLPs: their layers are the tracer's groups
            out.append((names[id(b.experts)], b.experts, b.name))
    return out


def _capture(model: nn.Module, stacked: list[tuple[str, nn.Module, str]], run, on_call, on_args=None) -> None:
    """``run()`` with every slab call of the ``stacked`` experts passed to ``on_call`` and their blocks' call
    arguments to ``on_args(experts name, args, kwargs)``."""
    watched = {id(p): (name, attr, p) for name, m, _ in stacked for attr, p in m.named_parameters(recurse=False)
               if p.dim() == 3}
    handles = []
    if on_args is not None:
        modules = dict(model.named_modules())
        for name, _, block in stacked:
            handles.append(modules[block].register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: on_args(name, args, kwargs), with_kwargs=True))
    try:
        with torch.no_grad(), experts.eager(model), _SlabCalls(watched, on_call):
            run()
    finally:
        for h in handles:
            h.remove()


def find(model: nn.Module, example, output_key: str | None = None) -> tuple[list[Units], list[tuple[str, str]]]:
    """The stacked experts modules of ``model`` whose units can be cut, and the others with the reason, from one
    forward pass on ``example``."""
    modules = stacked(model)
    if not modules:
        return [], []
    calls: dict[str, list] = {name: [] for name, _, _ in modules}
    args: dict[str, tuple] = {}
    _capture(model, modules, lambda: call(model, example, output_key),
             lambda key, attr, e, t, x, y: calls[key].append((attr, e, t, x.shape[-1], y.shape[-1])),
             lambda name, a, k: args.setdefault(name, (a, k)))
    found, left = [], []
    for name, module, block in modules:
        units = _structure(name, module, block, calls[name])
        if isinstance(units, str):
            left.append((f"{name}", units))
            continue
        why = _layout(model, units, *args[name])
        if why:
            left.append((name, why))
        else:
            found.append(units)
    return found, left


def _structure(name: str, module: nn.Module, block: str, calls: list) -> Units | str:
    """The units of ``module`` read off its slab calls (``(attr, expert, transposed, in, out)``, in order), or why
    there are none."""
    if not calls:
        return "no expert was routed a token on the probe batch"
    per_expert: dict[int, list] = {}
    for attr, e, t, n_in, n_out in calls:
        per_expert.setdefault(e, []).append((attr, t, n_in, n_out))
    sequences = {tuple(c[0] for c in seq) for seq in per_expert.values()}
    if len(sequences) != 1:
        return "its experts do not all make the same calls"
    seq = next(iter(per_expert.values()))
    (out_attr, out_t, units, width), ins = seq[-1], seq[:-1]
    if not ins or len({c[0] for c in seq}) != len(seq):
        return "its experts are not one or more input projections followed by one output projection"
    params = dict(module.named_parameters(recurse=False))
    inputs = []
    for attr, t, n_in, n_out in ins:
        if n_in != width or n_out % units:
            return f"{attr} does not read the hidden state into a whole number of rows per unit"
        dim = 2 if t else 1
        bias = _bias_of(params, attr, params[attr].shape[0], params[attr].shape[dim])
        inputs.append(Part(attr, dim, n_out // units, bias))
    out_dim = 1 if out_t else 2
    out_bias = _bias_of(params, out_attr, params[out_attr].shape[0], width)
    return Units(name, module, block, inputs, out_attr, out_dim, out_bias, units)


def _bias_of(params: dict, attr: str, experts_n: int, rows: int) -> str | None:
    """The 2-D (experts, rows) parameter that biases ``attr``'s call: ``<attr>_bias``, else the only one of that
    shape."""
    named = params.get(f"{attr}_bias")
    if named is not None and tuple(named.shape) == (experts_n, rows):
        return f"{attr}_bias"
    shaped = [a for a, p in params.items() if tuple(p.shape) == (experts_n, rows)]
    return shaped[0] if len(shaped) == 1 else None


def _zeroed(units: Units, removed: torch.Tensor, outputs: bool = False) -> dict[str, torch.Tensor]:
    """New tensors for ``units``' inputs (and with ``outputs`` its output) with the units ``removed`` zeroed:
    ``removed`` is a (experts, units) mask, or a 1-D index of the units zeroed in every expert."""
    if removed.dim() == 1:
        mask = torch.zeros(units.experts, units.units, dtype=torch.bool)
        mask[:, removed] = True
        removed = mask
    new = {}
    for p in units.inputs:
        new[p.attr] = getattr(units.module, p.attr).detach().clone()
        if p.bias is not None:
            new[p.bias] = getattr(units.module, p.bias).detach().clone()
    if outputs:
        new[units.output] = getattr(units.module, units.output).detach().clone()
    for e in range(units.experts):
        gone = removed[e].nonzero().flatten()
        for p in units.inputs:
            rows = units.rows(p, gone)
            new[p.attr][e].index_fill_(p.dim - 1, rows.to(new[p.attr].device), 0)
            if p.bias is not None:
                new[p.bias][e].index_fill_(0, rows.to(new[p.bias].device), 0)
        if outputs:
            new[units.output][e].index_fill_(units.dim - 1, gone.to(new[units.output].device), 0)
    return new


def _hidden(model: nn.Module, units: Units, args, kwargs, tensors: dict | None = None) -> dict[int, torch.Tensor]:
    """Per expert, the units' activations (the output call's input) on the module's call ``args``."""
    out = {}

    def record(key, attr, e, t, x, y):
        if attr == units.output:
            out[e] = x.detach().reshape(-1, x.shape[-1]).clone()

    block = dict(model.named_modules())[units.block]
    with _swapped(units.module, tensors or {}):
        _capture(model, [(units.name, units.module, units.block)], lambda: block(*args, **kwargs), record)
    return out


def _layout(model: nn.Module, units: Units, args, kwargs) -> str | None:
    """Fix ``units.interleaved`` to the layout under which each unit's rows feed its column alone; the reason
    when neither does."""
    dense = _hidden(model, units, args, kwargs)
    half = torch.randperm(units.units, generator=torch.Generator().manual_seed(0))[:units.units // 2]
    other = torch.ones(units.units, dtype=torch.bool)
    other[half] = False
    halves = [(half, other.nonzero().flatten()), (other.nonzero().flatten(), half)]
    for interleaved in (False, True):
        units.interleaved = interleaved
        if all(_unchanged(dense, _hidden(model, units, args, kwargs, _zeroed(units, gone)), kept)
               for gone, kept in halves):
            return None
        if all(p.parts == 1 for p in units.inputs):
            break
    return "zeroing a unit's rows changes other units' activations under both gate|up layouts"


def _unchanged(before: dict, after: dict, columns: torch.Tensor) -> bool:
    for e, h in before.items():
        a, b = h[:, columns], after[e][:, columns]
        if (a - b).norm() > TOLERANCE * a.norm().clamp_min(1e-12):
            return False
    return bool(before)


def statistics(model: nn.Module, found: list[Units], samples, output_key: str | None = None, bars: Bars = QUIET,
               batch: int = 16, device: str | None = None) -> dict[str, Stats]:
    """The units' activation statistics per expert over the calibration ``samples`` (no pass without units)."""
    if not found:
        return {}
    full = sum(u.experts * u.units ** 2 * 8 for u in found) <= GRAM_BUDGET
    stats = {u.name: Stats(torch.zeros(u.experts, dtype=torch.float64),
                           torch.zeros(u.experts, u.units, dtype=torch.float64),
                           torch.zeros(u.experts, u.units, dtype=torch.float64),
                           torch.zeros(u.experts, u.units, u.units, dtype=torch.float64) if full else None)
             for u in found}
    outputs = {u.name: u.output for u in found}

    def record(key, attr, e, t, x, y):
        if attr == outputs[key]:
            h = x.detach().reshape(-1, x.shape[-1]).double().cpu()
            s = stats[key]
            s.count[e] += len(h)
            s.sums[e] += h.sum(0)
            s.squares[e] += h.pow(2).sum(0)
            if s.gram is not None:
                s.gram[e] += h.T @ h

    def first(name, args, kwargs):
        if not stats[name].args:  # kept on the CPU, where the checks run
            stats[name].args, stats[name].kwargs = tree_map(_cpu, (args, kwargs))

    batches = list(samples.batches(batch))

    def run():
        for xb, _, _ in bars.track(batches, "reading the experts' units"):
            call(model, batch_to(xb, device, model_dtype(model)), output_key)

    _capture(model, [(u.name, u.module, u.block) for u in found], run, record, first)
    return stats


def _cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def scores(found: list[Units], stats: dict[str, Stats]) -> dict[str, torch.Tensor]:
    """Per module, (experts, units) mean-replacement saliencies: activation variance × squared output column norm."""
    out = {}
    for u in found:
        s = stats[u.name]
        n = s.count.clamp_min(1)[:, None]
        var = (s.squares / n - (s.sums / n) ** 2).clamp_min(0)
        norms = torch.stack([u.matrix(e).detach().double().cpu().pow(2).sum(0) for e in range(u.experts)])
        out[u.name] = var * norms + 1e-12 * norms  # an expert no token reached: by its weights alone
    return out


def first(found: list[Units], kept: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per module, the first ``kept`` units of every expert (sizes only: which ones does not change them)."""
    return {u.name: torch.arange(kept[u.name]).expand(u.experts, -1) for u in found}


def kept_count(units: int, ratio: float, round_to: int = 1) -> int:
    """Units each expert keeps at ``ratio``: a multiple of :data:`ALIGN` and of ``round_to`` (nearest, at least
    one multiple; all of them when fewer)."""
    step = math.lcm(ALIGN, max(round_to, 1))
    kept = units - n_removed(units, ratio)
    if kept == units:
        return units  # nothing asked: never rounded away
    return min(units, max(step, step * round(kept / step)))


def choose(found: list[Units], saliency: dict[str, torch.Tensor], kept: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per module, the (experts, kept) units each expert keeps: its highest saliencies, in index order."""
    out = {}
    for u in found:
        top = torch.sort(saliency[u.name], dim=1, descending=True, stable=True).indices[:, :kept[u.name]]
        out[u.name] = torch.sort(top, dim=1).values
    return out


def cut(model: nn.Module, found: list[Units], keep: dict[str, torch.Tensor]) -> None:
    """Slice the units not in ``keep`` out of every expert of ``model`` (whose modules are named as ``found``'s),
    with new tensors: the tensors ``found`` reads are left as they are."""
    modules = dict(model.named_modules())
    for u in found:
        k, module = keep[u.name], modules[u.name]
        if k.shape[1] == u.units:
            continue
        for p in u.inputs:
            _restack(module, p.attr, p.dim, [u.rows(p, k[e]) for e in range(len(k))])
            if p.bias is not None:
                _restack(module, p.bias, 1, [u.rows(p, k[e]) for e in range(len(k))])
        _restack(module, u.output, u.dim, list(k))
        for attr in ("intermediate_size", "intermediate_dim", "expert_dim", "moe_intermediate_size"):
            if getattr(module, attr, None) == u.units:
                setattr(module, attr, k.shape[1])


def _restack(module: nn.Module, attr: str, dim: int, rows: list[torch.Tensor]) -> None:
    p = getattr(module, attr)
    new = torch.stack([p.detach()[e].index_select(dim - 1, r.to(p.device)) for e, r in enumerate(rows)])
    setattr(module, attr, nn.Parameter(new.contiguous(), requires_grad=p.requires_grad))


def compensate(model: nn.Module, found: list[Units], keep: dict[str, torch.Tensor], stats: dict[str, Stats],
               how: str) -> list[str]:
    """Compensate the cut experts of ``model`` in place (``lstsq``: refit each expert's kept output columns, and
    its output bias if it has one, to the dense expert's outputs on its tokens; ``mean``: the removed units' means
    into the output bias). Returns the modules left uncompensated: ``mean`` without an output bias, ``lstsq``
    beyond the Gram budget."""
    modules = dict(model.named_modules())
    missed = []
    for u in found:
        module, k, s = modules[u.name], keep[u.name], stats[u.name]
        if how == "none" or k.shape[1] == u.units:
            continue
        if (how == "mean" and u.bias is None) or (how == "lstsq" and s.gram is None):
            missed.append(u.name)
            continue
        weight = getattr(module, u.output)
        bias = getattr(module, u.bias) if u.bias is not None else None
        new_w, new_b = weight.detach().clone(), None if bias is None else bias.detach().clone()
        for e in range(len(k)):
            if s.count[e] == 0:
                continue
            dense = u.matrix(e).detach().double().cpu()  # (outputs, units) of the dense expert
            kept = k[e]
            gone = torch.ones(u.units, dtype=torch.bool)
            gone[kept] = False
            if how == "mean":
                new_b[e] += (dense[:, gone] @ (s.sums[e, gone] / s.count[e])).to(new_b.dtype).to(new_b.device)
                continue
            w, b = _refit(dense, kept, s.gram[e], s.sums[e], s.count[e], bias is not None)
            w = w if u.dim == 2 else w.T
            new_w[e] = w.to(new_w.dtype).to(new_w.device)
            if b is not None:
                new_b[e] += b.to(new_b.dtype).to(new_b.device)
        setattr(module, u.output, nn.Parameter(new_w, requires_grad=weight.requires_grad))
        if new_b is not None:
            setattr(module, u.bias, nn.Parameter(new_b, requires_grad=bias.requires_grad))
    return missed


def _refit(dense: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor, sums: torch.Tensor, count: torch.Tensor,
           intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares for the kept columns of ``dense`` (outputs, units) reproducing ``h·denseᵀ`` from the
    kept activations (and a constant when ``intercept``), from the activations' Gram matrix; ridge towards the
    columns as they are."""
    d = len(kept)
    # design Gram [[HₖᵀHₖ, Σhₖ], [Σhₖᵀ, n]] and right-hand side [HₖᵀH·denseᵀ; Σh·denseᵀ]
    xtx = gram[kept][:, kept]
    xtz = gram[kept] @ dense.T
    if intercept:
        xtx = torch.cat([torch.cat([xtx, sums[kept, None]], 1),
                         torch.cat([sums[None, kept], count.reshape(1, 1)], 1)], 0)
        xtz = torch.cat([xtz, (sums @ dense.T)[None]], 0)
    diag = xtx.diagonal()[:d]
    lam = max(RIDGE * float(diag.mean()), FLOAT32_NOISE * float(diag.sum()), 1e-12)
    reg = torch.zeros_like(xtx)
    reg.diagonal()[:d] = lam
    prior = torch.zeros_like(xtz)
    prior[:d] = lam * dense[:, kept].T
    sol = torch.linalg.lstsq(xtx + reg, xtz + prior).solution
    return sol[:d].T, (sol[d] if intercept else None)


def check(small: nn.Module, found: list[Units], keep: dict[str, torch.Tensor],
          stats: dict[str, Stats]) -> float:
    """The largest relative difference, over the blocks, between ``small``'s block with its cut experts (before
    any compensation) and with the dense experts (``found``'s), the removed units zeroed, on the first calibration
    batch."""
    modules = dict(small.named_modules())
    worst = 0.0
    for u in found:
        s = stats[u.name]
        if keep[u.name].shape[1] == u.units or not s.args:
            continue
        masks = torch.ones(u.experts, u.units, dtype=torch.bool)
        masks.scatter_(1, keep[u.name], False)
        # small's own block both times: what else the cut changed in it (a shared expert) is the same in both
        with torch.no_grad(), experts.eager(small), _swapped(modules[u.name], _zeroed(u, masks, outputs=True)):
            want = _output(modules[u.block](*s.args, **s.kwargs))
        with torch.no_grad(), experts.eager(small):
            got = _output(modules[u.block](*s.args, **s.kwargs))
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-12)))
    return worst


def _output(out) -> torch.Tensor:
    """A block's hidden states (some blocks also return their router logits)."""
    return out[0] if isinstance(out, (tuple, list)) else out
