"""Cut stage: physical removal of units, with compensation for what was removed.

Compensation (docs/METHOD.md):
- ``none``: plain removal.
- ``mean``: each removed unit is replaced by its mean as each consumer reads it, folded into that
  consumer's bias (or, for a consumer without bias followed by BatchNorm, into BN's running mean).
- ``lstsq``: each consumer's kept weights and bias are refit by ridge least squares so that, fed by
  the already-cut model, it reproduces the dense consumer's pre-activations on calibration inputs
  (convs on unfolded patches). Consumers are refit in forward order, so each fit also absorbs the
  error of the cuts before it: stage by stage when the forward replays call by call (:mod:`prunetool.replay`),
  else consumer by consumer on a streaming pass stopped at each consumer's call; a consumer whose rows are not
  the samples' (a seq-first layout) is fitted on every row, batch by batch. One without rows (a conv3d) gets
  mean compensation, with a warning.

All slices of one layer (it may be a producer of one group, a consumer of several, a member of others)
are collected first as ``(layer, tensor, dimension)`` and applied once, so offsets never shift under a later
slice; then the layer's width attributes follow its tensors (:mod:`prunetool.layers`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import torch
from torch import nn

from . import calls, layers, ops
from .batch import batch_slice, batch_to, forward, model_dtype
from .calibrate import Settings, statistics
from .calls import Call, Stop, first_call
from .replay import Program, boundaries_for, replay
from .store import batch_size
from .data import Samples, as_samples
from .distributed import reduce_sum
from .options import COMPENSATIONS, ShrinkOptions
from .progress import QUIET, Bars
from .score import unit_means
from .trace import Consumer, Group, Trace, trace as trace_model
from .units import Means, Sums, consumer_hooks, input_columns, mean_of, readers, replace_units, unit_view

RIDGE = 1e-5  # λ relative to the mean diagonal of XᵀX: only there to keep a rank-deficient fit solvable
FLOAT32_NOISE = 16 * 2 ** -24  # λ never below this times trace(XᵀX): the rounding of a float32 Gram matrix
ROWS_PER_CHUNK = 2 ** 21  # design-matrix elements per chunk when every row of a batch is fitted
MAX_FIT_INPUTS = 10_000  # wider consumers (XᵀX over 800 MB) get only their bias refit


def n_removed(units: int, ratio: float) -> int:
    return min(units - 1, math.floor(ratio * units + 1e-9))


def select(trace: Trace, scores: dict[str, torch.Tensor], ratio: float | dict[str, float],
           round_to: int = 1) -> dict[str, torch.Tensor]:
    """Indices of the units kept in each group: the ``floor(ratio·n)`` lowest scores go (ties: lowest index).

    A grouped-conv producer loses the same number from each of its blocks; with ``round_to`` the kept
    count is rounded to a multiple of it (never below it, never above the layer's size).
    """
    keep = {}
    for g in trace.groups:
        r = ratio[g.name] if isinstance(ratio, dict) else ratio
        size = g.units // g.blocks
        kept = size - n_removed(size, r)
        if round_to > 1 and g.blocks == 1:
            kept = min(size, max(round_to, round_to * round(kept / round_to)))
        keep[g.name] = top(scores[g.name], g.blocks, kept)
    return keep


def top(scores: torch.Tensor, blocks: int, kept: int) -> torch.Tensor:
    """The sorted indices of the ``kept`` highest ``scores`` in each of ``blocks`` equal blocks (ties: the lowest
    index goes first)."""
    size = len(scores) // blocks
    order = torch.sort(scores.double().reshape(blocks, size), dim=1, stable=True).indices
    kept_idx = order[:, size - kept:] + torch.arange(blocks)[:, None] * size
    return torch.sort(kept_idx.reshape(-1)).values


def global_ratios(trace: Trace, scores: dict[str, torch.Tensor], ratio: float,
                  max_layer_ratio: float = ShrinkOptions.max_layer_ratio) -> dict[str, float]:
    """Per-group ratios that remove ``floor(ratio·N)`` of all N units, ranked across groups.

    Scores are made comparable by dividing each group's scores by their mean (a layer's typical unit
    scores 1). No group loses more than ``floor(max_layer_ratio·n)`` units, and each keeps at least one.
    """
    caps = {g.name: min(g.units - 1, math.floor(max_layer_ratio * g.units + 1e-9)) for g in trace.groups}
    entries = []
    for g in trace.groups:
        s = scores[g.name].double()
        norm = s / s.mean() if s.mean() > 0 else s
        entries += [(v, g.name) for v in norm.tolist()]
    entries.sort(key=lambda e: e[0])
    target = math.floor(ratio * sum(g.units for g in trace.groups) + 1e-9)
    removed = {g.name: 0 for g in trace.groups}
    total = 0
    for _, name in entries:
        if total >= target:
            break
        if removed[name] < caps[name]:
            removed[name] += 1
            total += 1
    return {g.name: removed[g.name] / g.units for g in trace.groups}


def complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    return torch.nonzero(mask).reshape(-1)


def mean_delta(c: Consumer, module: nn.Module, removed: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """What the removed units contributed to the consumer's output, with each unit held at its mean."""
    return c.op.mean_delta(getattr(module, c.weight).data, input_columns(c, removed), means[removed])


def bias_attr(module: nn.Module, c: Consumer) -> str | None:
    """The consumer's bias, also one an earlier compensation gave it."""
    if c.bias is not None:
        return c.bias
    return "bias" if layers.kind_of(module).adds_bias and module.bias is not None else None


def can_add_bias(module: nn.Module, c: Consumer) -> bool:
    """Whether the consumer's own call would use a new ``bias`` (the torch layers and their subclasses) and the
    consumer may be given one."""
    return c.new_bias and bias_attr(module, c) is None and layers.kind_of(module).adds_bias


def takes_means(module: nn.Module, c: Consumer, modules: dict) -> bool:
    """Whether mean compensation can hold what removed units added to the consumer's outputs: in its bias, one it
    may be given, or the running mean of a BatchNorm right after it."""
    norm = modules.get(c.norm_after) if c.norm_after else None
    return bias_attr(module, c) is not None or can_add_bias(module, c) or \
        (norm is not None and getattr(norm, "running_mean", None) is not None)


def _add_to_bias(modules: dict, c: Consumer, delta: torch.Tensor) -> None:
    module = modules[c.name]
    attr = bias_attr(module, c)
    if attr is not None:
        old = getattr(module, attr)  # a new tensor, never written in place: the cut may share it (layers.clone)
        new = (old.detach().to(delta.dtype) + delta.to(old.device)).to(old.dtype)
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
                else new)
        return
    norm = modules.get(c.norm_after) if c.norm_after else None
    if norm is not None and norm.running_mean is not None:
        norm.running_mean = norm.running_mean - delta.to(norm.running_mean.dtype)  # BN((y'+δ) − μ) = BN(y' − (μ−δ))
    elif can_add_bias(module, c):
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)


class Plan:
    """What to drop, as ``(layer, tensor, dimension) → indices``, collected over all groups before anything is
    sliced."""

    def __init__(self):
        self.drops: dict[tuple[str, str, int], set[int]] = {}
        self.consumers: dict[str, Consumer] = {}
        self.producers: dict[str, tuple[str, int]] = {}  # layer → (weight, output dim)

    def add(self, name: str, attr: str | None, dim: int, idx: torch.Tensor) -> None:
        if attr is not None:
            self.drops.setdefault((name, attr, dim), set()).update(idx.tolist())

    def kept_outputs(self, name: str, module: nn.Module) -> torch.Tensor | None:
        """The original indices of a consumer's outputs that remain (None when it loses none)."""
        if name not in self.producers:
            return None
        attr, dim = self.producers[name]
        drop = self.drops.get((name, attr, dim))
        if not drop:
            return None
        n = getattr(module, attr).shape[dim] + len(drop)
        return _keep(n, drop)


def plan_cut(trace: Trace, keep: dict[str, torch.Tensor]) -> Plan:
    plan = Plan()
    for g in trace.groups:
        removed = complement(keep[g.name], g.units)
        if not len(removed):
            continue
        for p in g.producers:
            plan.add(p.name, p.weight, p.dim, p.rows(removed))
            plan.add(p.name, p.bias, 0, p.rows(removed))
            plan.producers[p.name] = (p.weight, p.dim)
        for m in g.members:
            for attr, dim in m.tensors:
                plan.add(m.name, attr, dim, m.offset + removed)
        for c in g.consumers:
            plan.add(c.name, c.weight, c.dim, input_columns(c, removed))
            plan.consumers.setdefault(c.name, c)
    return plan


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def apply(model: nn.Module, plan: Plan) -> None:
    """Slice every planned tensor, then let each touched layer (and the containers recording its width) sync."""
    modules = dict(model.named_modules())
    before = layers.widths(model)
    changed: dict[str, dict[int, int]] = {}
    for (name, attr, dim), drop in plan.drops.items():
        if not drop:  # nothing removed: the tensor stays the one it was (a clone with share=True copies nothing)
            continue
        module = modules[name]
        n = getattr(module, attr).shape[dim]
        layers.slice_tensor(module, attr, dim, _keep(n, drop))
        changed.setdefault(name, {})[n] = n - len(drop)
    layers.resync(model, changed, before)


def cut(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], compensate: str = "mean",
        means: Means | None = None, samples=None, bars: Bars = QUIET, stats=None, settings=None) -> nn.Module:
    """Remove the units not in ``keep`` from ``model`` in place, compensating as asked; returns ``model``.

    ``lstsq`` refits every consumer against the dense outputs in ``stats`` (from
    :func:`prunetool.calibrate.statistics` with targets, measured here on ``model`` before the cut when not
    given): stage by stage when the model's forward replays call by call, else consumer by consumer on the
    streaming pass (also when a consumer's rows are not the samples', as in a seq-first layout: every row of it
    is then fitted, batch by batch as the statistics saw them). A consumer without targets (a conv3d) gets mean
    compensation, with a warning.
    """
    if compensate not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {compensate!r}")
    settings = settings or Settings()
    modules = dict(model.named_modules())
    plan = plan_cut(trace, keep)
    if compensate == "lstsq" and plan.consumers:
        samples = as_samples(samples)
        if stats is None:
            cutting = [g for g in trace.groups if len(keep[g.name]) < g.units]
            stats = statistics(model, trace, samples, settings, bars, targets=True, groups=cutting)
        if not stats.with_targets:
            raise ValueError("these statistics hold no refit targets; measure them with targets=True")
        used = sorted(stats.released & set(plan.consumers))
        if used:
            raise ValueError(f"the targets of {', '.join(used)} in these statistics were used up by an earlier refit; "
                             "measure them again (prunetool.calibrate.statistics) for this cut")
        unfit = sorted(name for name in plan.consumers if name not in stats.targets)
        if unfit:
            warnings.warn(f"the least-squares refit has no rows for {', '.join(unfit)} (a conv3d, or a call whose rows "
                          "are the samples' in some batches only); they get mean compensation")
        means = stats.means
    for g in trace.groups:
        removed = complement(keep[g.name], g.units)
        if not len(removed):
            continue
        for c in g.consumers:
            if compensate == "mean" or (compensate == "lstsq" and c.name not in stats.targets):
                _add_to_bias(modules, c, mean_delta(c, modules[c.name], removed, mean_of(means, g, c)))
    apply(model, plan)
    if compensate == "lstsq" and plan.consumers:
        fitted = {name: c for name, c in plan.consumers.items() if name in stats.targets}
        whole = sorted(name for name in fitted if name in stats.whole)
        if not whole and refit_stagewise(model, plan, fitted, stats, samples, settings, bars):
            stats.paths["refit"] = "stage by stage"
        else:
            why = f"every row of {', '.join(whole)}" if whole else "the model's forward does not replay call by call"
            stats.paths["refit"] = f"consumer by consumer ({why})"
            refit_streaming(model, trace, plan, fitted, stats, samples, settings, bars)
    return model


def mask_hooks(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], means: Means,
               groups: list[Group] | None = None):
    """A context in which a dense model behaves like the cut one: removed units read as their means."""
    values = {}
    groups = [g for g in (groups if groups is not None else trace.groups) if g.name in means]
    for g in groups:
        removed = complement(keep[g.name], g.units)
        for c in g.consumers:
            if len(removed):
                values[(g.name, c.name, c.offset)] = (removed, mean_of(means, g, c)[removed])
    return consumer_hooks(model, readers(trace, groups), lambda a, read: replace_units(a, read, values))


def sequential_means(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], samples,
                     bars: Bars = QUIET, settings=None) -> Means:
    """Unit means measured behind earlier cuts, for mean compensation.

    Cutting layer ℓ shifts what layer ℓ+1 produces, so the dense means no longer describe the units that replace
    layer ℓ+1's removed ones. Stage by stage (the calibration engine), each consumer's means are measured with
    everything before it already cut (removed units read as their means), in one pass; a model whose forward
    does not replay is measured group by group, each behind the groups before it (one pass per group).
    """
    settings = settings or Settings()
    samples = as_samples(samples)
    means = means_stagewise(model, trace, keep, samples, settings, bars)
    if means is not None:
        return means
    warnings.warn("the model's forward does not replay call by call: mean compensation measures group by group")
    means = {}
    for i, g in enumerate(bars.track(trace.groups, "unit means behind earlier cuts")):
        with mask_hooks(model, trace, keep, means, trace.groups[:i]):
            means.update(unit_means(model, trace, samples, groups=[g], settings=settings))
    return means


# --- least squares ----------------------------------------------------------------------------------------

class Fit:
    """The normal equations of one consumer's refit, accumulated batch by batch (float32 per batch, summed in
    float64), and the ridge solve that writes the new weights."""

    def __init__(self, module: nn.Module, c: Consumer, kept_outputs: torch.Tensor | None):
        self.module, self.c, self.kept = module, c, kept_outputs
        self.weight = getattr(module, c.weight)
        self.w2d = c.op.as_matrix(self.weight.data)
        self.fit_bias = bias_attr(module, c) is not None or can_add_bias(module, c)
        self.bias_only = self.w2d.shape[1] + 1 > MAX_FIT_INPUTS
        self.xtx = self.xtz = None

    def add(self, design: torch.Tensor, z: torch.Tensor) -> None:
        if self.kept is not None:
            z = z[:, self.kept.to(z.device)]
        design, z = design.float(), z.float()
        if self.bias_only:  # accumulate E[z − W·x] only
            r = (z - design @ self.w2d.to(design.device).float().T).double()
            self.xtx = (0 if self.xtx is None else self.xtx) + len(r)
            self.xtz = (0 if self.xtz is None else self.xtz) + r.sum(0).cpu()
            return
        self._add_products(design, lambda i, j: z[i:j], len(design))

    def add_chunks(self, design: torch.Tensor, targets, step: int) -> None:
        """:meth:`add` of ``design`` against ``targets(i, j)`` (the targets of rows i:j, computed when asked),
        ``step`` rows at a time: XᵀX once, Xᵀz summed over the chunks where they are computed and copied once (a
        head's targets over a large vocabulary are never whole, and its d' × vocabulary product is moved once)."""
        if self.bias_only or self.kept is not None:
            for i in range(0, len(design), step):
                self.add(design[i:i + step], targets(i, i + step))
            return
        self._add_products(design.float(), lambda i, j: targets(i, j).float(), step)

    def _add_products(self, design: torch.Tensor, targets, step: int) -> None:
        """XᵀX and Xᵀz of float32 ``design`` rows (a column of ones appended when the bias is fitted) against
        ``targets(i, j)``, ``step`` rows at a time, summed in float64 into the equations."""
        if self.fit_bias:
            design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype, device=design.device)], 1)
        # Power-of-two scales keep float32 products finite when activations are huge (random weights in deep
        # nets reach 1e14: squared and summed, that overflows float32); they are exact, so results do not change.
        a = _pow2_scale(design)
        xtz = None
        for i in range(0, max(len(design), 1), max(step, 1)):  # once at least: no rows still sets up the equations
            z = targets(i, i + step)
            b = _pow2_scale(z)
            part = ((design[i:i + step] / a).T @ (z / b)).double() * (a * b)
            xtz = part if xtz is None else xtz + part
        xtx = ((design / a).T @ (design / a)).double().cpu() * (a * a)
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xtz = xtz.cpu() if self.xtz is None else self.xtz + xtz.cpu()

    def add_call(self, call, ids: torch.Tensor, stats, targets) -> None:
        """One batch of the consumer's call on the cut model (samples ``ids``): its design rows at the sampled
        positions against the dense targets of the same samples and positions (``targets``:
        :meth:`prunetool.calibrate.Statistics.targets_of`)."""
        rows, index, per = targets
        x = self.c.op.per_sample(call.input, len(ids), self.c.name in stats.flattened)
        if x is None:
            raise RuntimeError(f"{self.c.name}: a batch of the cut model whose rows are not the samples'")
        picks = stats.positions.pick(self.c.name, call.positions(self.weight, x), ids)
        design = call.rows(self.weight, x, picks)
        sel = (torch.tensor([index[int(j)] for j in ids])[:, None] * per + torch.arange(per)).reshape(-1)
        self.add(design, rows[sel.to(rows.device)].to(design.device))

    def add_rows(self, call, z: torch.Tensor) -> None:
        """Every row of one batch of the consumer's call on the cut model, in the call's own order, against the
        dense targets of the same batch (``z``: :meth:`prunetool.ops.Op.targets` of its output), in chunks."""
        x = call.input
        per = call.rows(self.weight, x[:1]).shape[0]  # rows per entry of the leading dimension
        step = max(1, ROWS_PER_CHUNK // max(per * self.w2d.shape[1], 1))
        for start in range(0, len(x), step):
            design = call.rows(self.weight, x[start:start + step])
            self.add(design, z[start * per:start * per + len(design)].to(design.device))

    def solve(self, ridge: float = RIDGE) -> None:
        module, c, weight = self.module, self.c, self.weight
        if self.xtx is None:
            return
        xtx, xtz = reduce_sum(self.xtx), reduce_sum(self.xtz)
        if self.bias_only:
            if self.fit_bias:
                _set_bias(module, c, (xtz / xtx).to(weight.dtype).to(weight.device))
            return
        d = self.w2d.shape[1]
        gram = xtx[:d, :d].diagonal()
        # The ridge pulls towards the layer's weights as they are (the kept ones), so that directions the samples
        # do not determine (fewer rows than inputs) keep them rather than going to zero; it is never below the
        # float32 noise of XᵀX (eps · trace), which would otherwise make a rank-deficient system indefinite.
        lam = max(ridge * float(gram.mean()), FLOAT32_NOISE * float(gram.sum()), 1e-12)
        reg = torch.zeros_like(xtx)
        reg.diagonal()[:d] = lam
        prior = torch.zeros_like(xtz)
        prior[:d] = lam * self.w2d.double().cpu().T
        try:
            sol = torch.linalg.solve(xtx + reg, xtz + prior)
        except RuntimeError:
            sol = torch.linalg.lstsq(xtx + reg, xtz + prior).solution
        new = c.op.from_matrix(sol[:d].T.to(weight.dtype), weight).to(weight.device)
        setattr(module, c.weight, nn.Parameter(new.contiguous(), requires_grad=weight.requires_grad))
        if self.fit_bias:
            _set_bias(module, c, sol[d].to(weight.dtype).to(weight.device))


def _pow2_scale(t: torch.Tensor) -> float:
    """1, or a power of two near max |t| when t is large enough for its float32 products to overflow."""
    top = float(t.abs().max()) if t.numel() else 0.0
    return 1.0 if not top < float("inf") or top < 2.0 ** 40 else 2.0 ** math.floor(math.log2(top))


def _recorded(model: nn.Module, samples: Samples, settings):
    """The model's forward recorded on a few calibration samples (None when it does not replay), and those
    samples on the device in the model's dtype."""
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    example = batch_to(samples.take(3)[0], settings.device, dtype)
    return Program.record(model, example), example


def refit_stagewise(model: nn.Module, plan: Plan, consumers: dict[str, Consumer], stats, samples: Samples, settings,
                    bars: Bars = QUIET) -> bool:
    """Refit ``consumers`` stage by stage (:mod:`prunetool.replay`) against the dense targets in ``stats``; False
    when the cut model's forward does not replay call by call (nothing is changed then)."""
    if not consumers:
        return True
    program, example = _recorded(model, samples, settings)
    if program is None:
        return False
    wanted = {}
    for c in consumers.values():
        wanted[(c.name, c.weight)] = c
        wanted[(c.name, "")] = c  # an atomic layer's call is the module's
    bounds, fitted = boundaries_for(program, wanted)
    if {c.name for lst in fitted.values() for _, c in lst} != set(consumers):
        return False
    modules = dict(model.named_modules())
    calls_left = Counter(c.name for lst in fitted.values() for _, c in lst)

    def on_boundary(b, frontier):
        for i, c in fitted.get(b, []):
            fit = Fit(modules[c.name], c, plan.kept_outputs(c.name, modules[c.name]))
            targets = stats.targets_of(c.name)
            for call, ids in frontier.call_inputs(i, model):
                fit.add_call(call, ids, stats, targets)
            fit.solve()
            calls_left[c.name] -= 1
            if not calls_left[c.name]:  # its targets' memory goes to the stages still to come
                stats.release(c.name)

    # batches sized by the cut's own activations (the dense trace's, larger, give batches of 2 where 3 fit: slower)
    replay(program, model, samples.shard(), batch_size_for(model, example, settings), bounds, on_boundary, settings,
           bars, label="least-squares refit, stage by stage")
    return True


def means_stagewise(model: nn.Module, trace: Trace, keep: dict[str, torch.Tensor], samples: Samples, settings,
                    bars: Bars = QUIET) -> Means | None:
    """Mean compensation's means, stage by stage over the dense model with removed units read as their means
    from each consumer on; None when the model's forward does not replay."""
    pairs: dict[str, list] = {}
    for g in trace.groups:
        if len(complement(keep[g.name], g.units)):
            for c in g.consumers:
                pairs.setdefault(c.name, []).append((g, c))
    if not pairs:
        return {}
    program, example = _recorded(model, samples, settings)
    if program is None:
        return None
    wanted = {}
    for name, read in pairs.items():
        wanted[(name, read[0][1].weight)] = name
        wanted[(name, "")] = name
    bounds, fitted = boundaries_for(program, wanted)
    if {name for lst in fitted.values() for _, name in lst} != set(pairs):
        return None
    means: Means = {}
    transforms: dict[int, object] = {}

    def on_boundary(b, frontier):
        for i, name in fitted.get(b, []):
            read = pairs[name]
            sums = Sums()
            for call, _ in frontier.call_inputs(i, model):
                for g, c in read:
                    sums.add((g.name, c.name, c.offset), unit_view(call.input, g, c).double())
            for g_name, per in sums.means().items():
                means.setdefault(g_name, {}).update(per)
            values = {(g.name, c.name, c.offset): (complement(keep[g.name], g.units),
                                                   mean_of(means, g, c)[complement(keep[g.name], g.units)])
                      for g, c in read}
            transforms[i] = _replacing_input(program, i, read, values)

    replay(program, model, samples.shard(), batch_size(trace, settings), bounds, on_boundary, settings,
           bars, transforms, label="unit means behind earlier cuts, stage by stage")
    return means


def _replacing_input(program: Program, i: int, read, values):
    """A transform of step ``i``'s arguments that reads the removed units of its input as their means."""
    node = program.steps[i].node
    op = layers.op_of(node.op) if node.kind == "module" else ops.of_call(node.name.lstrip("_"))

    def transform(args, kwargs):
        return op.with_input(args, kwargs, replace_units(op.input_of(args, kwargs), read, values))
    return transform


def batch_size_for(model: nn.Module, example, settings) -> int:
    """Samples per batch of a stage-by-stage pass: the budget over what one sample's forward touches."""
    return batch_size(trace_model(model, batch_slice(example, 0, 2)), settings)


def refit_streaming(model: nn.Module, trace: Trace, plan: Plan, consumers: dict[str, Consumer], stats,
                    samples: Samples, settings, bars: Bars = QUIET) -> None:
    """Refit ``consumers`` in forward order against the dense targets in ``stats``, each on a streaming pass of the
    cut model stopped at its call (for a forward that does not replay call by call; same rows as stage by stage)."""
    modules = dict(model.named_modules())
    shard = samples.shard()
    # every row of a consumer was kept batch by batch: the same batches again (the statistics pass's size)
    size = next((stats.whole[n] for n in consumers if n in stats.whole), None) or batch_size(trace, settings)
    dtype = model_dtype(model)
    for name in bars.track(sorted(consumers, key=lambda n: trace.order.get(n, 0)),
                           "least-squares refit, consumer by consumer"):
        c = consumers[name]
        fit = Fit(modules[name], c, plan.kept_outputs(name, modules[name]))
        # the call's op, stride, padding, ...: from the first batch that runs it (an expert runs on its tokens only)
        geometry = first_call(model, name, (batch_to(xb, settings.device, dtype) for xb, _, _ in shard.batches(size)),
                              c.weight)
        if geometry is None:
            continue  # no calibration sample reaches it: nothing to fit, its kept weights stay
        current = {}
        if name in stats.whole:
            chunks = iter(list(stats.targets[name]))

            def seen(x, fit=fit, geometry=geometry, chunks=chunks):
                fit.add_rows(Call(geometry.op, x.detach(), geometry.args), stats.store.get(next(chunks)))
                raise Stop  # nothing after the consumer's call is needed
        else:
            targets = stats.targets_of(name)

            def seen(x, fit=fit, targets=targets, geometry=geometry):
                fit.add_call(Call(geometry.op, x.detach(), geometry.args), current["ids"], stats, targets)
                raise Stop
        with torch.no_grad(), calls.hooks(model, on_input={name: seen}, weights={name: c.weight}):
            for xb, _, ids in shard.batches(size):
                current["ids"] = ids
                try:
                    forward(model, batch_to(xb, settings.device, dtype))
                except Stop:
                    pass
        fit.solve()
        stats.release(name)  # its targets' memory goes to the consumers still to come


def _set_bias(module: nn.Module, c: Consumer, b: torch.Tensor) -> None:
    attr = bias_attr(module, c)
    if attr is None:
        module.bias = nn.Parameter(b.contiguous(), requires_grad=module.weight.requires_grad)
    else:
        setattr(module, attr, nn.Parameter(b.contiguous(), requires_grad=getattr(module, attr).requires_grad))


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights a mask drops (iterative magnitude pruning)."""
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.mul_(masks[name].to(module.weight.dtype))
