"""The calibration engine: every statistic prunetool gathers from calibration data, in as few passes over it as
the arithmetic allows, within a memory budget, on the chosen device.

Streaming passes (batches of samples through the whole model; any model):

- :func:`statistics`: one forward pass gives the mean of every unit as each consumer reads it (what mean
  compensation folds into a bias and MRS replaces a unit by) and every consumer's dense output at sampled
  positions (the targets of the least-squares refit);
- :func:`covariances`: one forward pass gives ``XᵀX`` of the inputs of chosen layers (data-aware lowrank);
- MRS itself (:mod:`prunetool.score`) is one forward and backward pass on top of those means.

Stage by stage (:mod:`prunetool.replay`): the model's forward is replayed call by call over all calibration
batches one stage at a time; the refit and the means behind earlier cuts run there.

Precision and sampling: ``XᵀX`` and ``XᵀZ`` are accumulated in float32 per batch (divided first by an exact
power of two when activations pass 2⁴⁰, whose squares would overflow) and summed in float64; the solve is in
float64. A least-squares fit needs rows in proportion to its inputs, not to the pictures' size: a convolution
or a token sequence contributes ``rows × fan-in / samples`` output positions per sample (at least one;
ThiNet-style, the same positions in the dense and the cut model; default ``rows`` chosen by measurement,
docs/BENCHMARKS.md), so the dense targets kept for the refit take ``rows`` floats per weight.

Memory: every tensor a pass keeps goes through one :class:`prunetool.store.Store` under the ``memory`` budget.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import calls, layers, task
from .batch import batch_len, batch_slice, batch_to, call, forward, model_dtype
from .data import Samples
from .distributed import reduce_sum
from .options import DEFAULT_CALIB_MEMORY, DEFAULT_ROWS
from .progress import QUIET, Bars
from .store import Kept, Store, batch_size
from .trace import Group, Trace
from .units import Sums, readers, unit_view

@dataclass
class Settings:
    """``memory``: bytes of cached activations and targets kept on the device (batches are sized to it too);
    ``rows``: least-squares rows per input of a layer, drawn as output positions per sample."""

    memory: int = DEFAULT_CALIB_MEMORY
    rows: int = DEFAULT_ROWS
    device: str = "cpu"
    seed: int = 0
    output_key: str | None = None  # which entry of a structured output holds the logits (prunetool.task.logits)
    store: "Store | None" = field(default=None, repr=False, compare=False)

    def cache(self) -> "Store":
        """The one store every pass of a run keeps tensors in (one budget for targets and stage activations)."""
        if self.store is None:
            self.store = Store(self)
        return self.store


# --- sampled positions ---------------------------------------------------------------------------------

class Positions:
    """For each consumer, the output positions a sample contributes (drawn with replacement): as many as give
    ``rows`` least-squares rows per input of the layer over all samples, at least one. Which ones is a function of
    the layer's name, the sample's id and the seed alone: every pass, whatever its batches, and every process
    under torchrun meet the same positions (dense targets and cut inputs line up)."""

    def __init__(self, rows: int, samples: int, seed: int = 0):
        self.rows, self.samples, self.seed = rows, max(1, samples), seed
        self.counts: dict[str, int] = {}

    def count(self, key: str, fan_in: int) -> int:
        if key not in self.counts:
            self.counts[key] = max(1, math.ceil(self.rows * fan_in / self.samples))
        return self.counts[key]

    def pick(self, key: str, n_positions: int, ids: torch.Tensor, fan_in: int | None = None) -> torch.Tensor:
        count = self.counts[key] if fan_in is None else self.count(key, fan_in)
        if n_positions <= count:
            return torch.arange(n_positions).expand(len(ids), -1)
        salt = zlib.crc32(key.encode()) ^ self.seed
        j = torch.arange(count, dtype=torch.long)
        x = (ids.long()[:, None] * 2654435761 + j * 40503 + salt) % 2 ** 31
        for _ in range(3):  # a few rounds of a linear congruential generator mix id, position and salt
            x = (x * 1103515245 + 12345) % 2 ** 31
        return (x % n_positions).sort(1).values


# --- streaming passes ----------------------------------------------------------------------------------

@dataclass
class Statistics:
    """What one forward pass over the calibration samples gives: unit means per (group, consumer), and each
    consumer's dense outputs at sampled positions with the sample ids they belong to."""

    means: dict[str, dict[str, torch.Tensor]]
    targets: dict[str, list[Kept]] = field(default_factory=dict)  # consumer → kept chunks
    target_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: Positions | None = None
    store: Store | None = None
    paths: dict[str, str] = field(default_factory=dict)  # what ran how: "refit" → "stage by stage", ...
    flattened: set[str] = field(default_factory=set)  # consumers whose calls read the batch's tokens as rows
    whole: dict[str, int] = field(default_factory=dict)  # consumers with every row kept, per batch of this size
    with_targets: bool = False
    released: set[str] = field(default_factory=set)  # consumers whose targets a refit has used up

    def release(self, name: str | None = None) -> None:
        """Give the targets' memory back to the budget (one consumer's, or all)."""
        for key in [name] if name is not None else list(self.targets):
            for k in self.targets.pop(key, []):
                self.store.release(k)
            self.released.add(key)

    def targets_of(self, name: str) -> tuple[torch.Tensor, dict[int, int], int]:
        """A consumer's dense targets (rows of every sample, in gathering order), each sample id's row number,
        and the rows per sample."""
        rows = torch.cat([self.store.get(k) for k in self.targets[name]])
        ids = self.target_ids[name]
        return rows, {int(i): r for r, i in enumerate(ids)}, len(rows) // max(1, len(ids))


def statistics(model: nn.Module, trace: Trace, samples: Samples, settings: Settings, bars: Bars = QUIET,
               targets: bool = False, groups: list[Group] | None = None) -> Statistics:
    """Unit means (and, with ``targets``, every consumer's dense outputs at sampled positions) in one forward
    pass over ``samples``."""
    model.eval()
    sums = Sums()
    pairs = readers(trace, groups)
    store = settings.cache()
    positions = Positions(settings.rows, len(samples), settings.seed)
    stats = Statistics({}, positions=positions, store=store)
    modules = dict(model.named_modules())
    if targets:
        stats.with_targets = True
        stats.flattened = flattened_calls(model, {n: read[0][1].weight for n, read in pairs.items()}, samples, settings)
    current: dict = {}
    sampled: dict[str, bool] = {}  # consumer → whether its rows are the samples' (decided on the first batch)
    unreadable: set[str] = set()
    on_input, on_output, weights = {}, {}, {}
    for name, read in pairs.items():
        weights[name] = read[0][1].weight

        def seen(a, read=read):
            a = a.detach()
            for g, c in read:
                sums.add((g.name, c.name, c.offset), unit_view(a, g, c).double())
        on_input[name] = seen
        if targets:
            def produced(out, name=name, c=read[0][1]):
                ids, n = current["ids"], current["n"]
                weight = getattr(modules[name], c.weight)
                if name in unreadable or not c.op.has_rows(weight):
                    return
                view = c.op.per_sample(out.detach(), n, name in stats.flattened)
                if sampled.setdefault(name, view is not None) != (view is not None):
                    unreadable.add(name)  # rows that are the samples' in one batch and not in another
                    return
                if view is None:  # rows in the call's own order (a seq-first layout): every row, batch by batch
                    rows = c.op.targets(out.detach())
                    stats.whole[name] = current["size"]
                else:
                    fan_in = weight.movedim(c.dim, 0)[0].numel()
                    rows = c.op.targets(view, positions.pick(name, c.op.out_positions(view), ids, fan_in))
                stats.targets.setdefault(name, []).append(store.keep(rows, cold=True))
                stats.target_ids[name] = torch.cat([stats.target_ids.get(name, torch.empty(0, dtype=torch.long)),
                                                    ids])
            on_output[name] = produced
    device = settings.device
    fitted = [getattr(modules[name], attr) for name, attr in weights.items()] if targets else []
    reserve = sum(settings.rows * w.numel() * w.element_size() for w in fitted)
    size = batch_size(trace, settings, reserve=reserve)  # the targets take about ``rows`` floats per weight
    shard = samples.shard()
    with torch.no_grad(), calls.hooks(model, on_input, on_output, weights):
        for xb, _, ids in bars.track(shard.batches(size), "unit means" + (" and targets" if targets else ""),
                                     total=math.ceil(len(shard) / size)):
            current.update(ids=ids, n=batch_len(xb), size=size)
            forward(model, batch_to(xb, device, model_dtype(model)))
    stats.means = sums.means()
    for name in unreadable:
        stats.release(name)
        stats.released.discard(name)
        stats.whole.pop(name, None)
    return stats


def flattened_calls(model: nn.Module, weights: dict[str, str], samples: Samples, settings: Settings) -> set[str]:
    """The layers (name → weight attribute) whose own call reads a batch as rows that are each sample's tokens in
    turn (``x.view(-1, C)`` before Hugging Face's ``Conv1D``): their outputs on two samples together are their
    outputs on each alone, one after the other. One forward pass of two samples finds the candidates (calls whose
    rows are not the samples); three more of one or two samples check them."""
    example = samples.take(2)[0]
    if batch_len(example) < 2 or not weights:
        return set()
    dtype = model_dtype(model)
    outs: dict[tuple[str, str], torch.Tensor] = {}
    found: set[str] = set()

    def run(a: int, b: int, hook) -> None:
        with torch.no_grad(), calls.hooks(model, on_output={n: (lambda out, n=n: hook(n, out)) for n in names},
                                          weights={n: weights[n] for n in names}):
            forward(model, batch_to(batch_slice(example, a, b), settings.device, dtype))

    names = list(weights)
    candidates: set[str] = set()
    run(0, 2, lambda n, out: candidates.add(n) if out.shape[0] != 2 else None)
    names = sorted(candidates)
    if not names:
        return found
    run(0, 1, lambda n, out: outs.setdefault(("first", n), out.detach()))
    run(1, 2, lambda n, out: outs.setdefault(("second", n), out.detach()))

    def compare(n, both):
        first, second = outs.pop(("first", n), None), outs.pop(("second", n), None)
        if first is None or second is None or first.shape != second.shape or both.shape[0] != 2 * first.shape[0]:
            return
        alone = torch.cat([first, second])  # sample 0's rows, then sample 1's
        if float((both - alone).abs().max()) <= 1e-4 * float(alone.abs().max()) + 1e-6:
            found.add(n)
    run(0, 2, compare)
    return found


def covariances(model: nn.Module, names: list[str], samples: Samples, settings: Settings, trace: Trace,
                bars: Bars = QUIET, centered: bool = False) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` of the inputs each named layer's weight multiplies (conv: patches at sampled positions), from
    one forward pass; with ``centered``, ``E[(x − E x)(x − E x)ᵀ]`` (what a refit with a bias sees)."""
    positions = Positions(settings.rows, len(samples), settings.seed)
    firsts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict = {}
    modules = dict(model.named_modules())
    captured: dict[str, calls.Call] = {}

    def make(name):
        def seen(x):
            call = captured.get(name)
            weight = modules[name].weight
            ids = current["ids"]
            picks = None
            if x.shape[0] == len(ids):
                picks = positions.pick(name, call.positions(weight, x), ids, weight[0].numel())
            design = call.rows(weight, x, picks)
            block = (design.T.float() @ design.float()).double()
            sums[name] = sums.get(name, 0) + block.cpu()
            firsts[name] = firsts.get(name, 0) + design.double().sum(0).cpu()
            counts[name] = counts.get(name, 0) + len(design)
        return seen

    shard = samples.shard()
    size = batch_size(trace, settings)
    dtype = model_dtype(model)
    for name in names:  # the geometry of each layer's own call (stride, padding, dilation)
        found = calls.first_call(model, name, (batch_to(xb, settings.device, dtype) for xb, _, _ in
                                               shard.batches(size)))
        if found is not None:  # else no sample reaches it (an expert): its factors come from its weights alone
            captured[name] = found
    names = list(captured)
    with torch.no_grad(), calls.hooks(model, {n: make(n) for n in names}):
        for xb, _, ids in bars.track(shard.batches(size), "input covariances", total=math.ceil(len(shard) / size)):
            current["ids"] = ids
            forward(model, batch_to(xb, settings.device, model_dtype(model)))
    out = {}
    for n in names:
        count = reduce_sum(counts[n])
        out[n] = reduce_sum(sums[n]) / count
        if centered:
            mean = reduce_sum(firsts[n]) / count
            out[n] = out[n] - torch.outer(mean, mean)
    return out


def output_sensitivity(model: nn.Module, names: list[str], samples: Samples, settings: Settings, trace: Trace,
                       bars: Bars = QUIET) -> dict[str, torch.Tensor]:
    """For each named layer, the mean over samples of the squared gradient of the loss at each of its outputs
    (summed over positions): the diagonal Fisher weights of :func:`prunetool.factor.predicted_loss`. One forward
    and backward pass."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def make(name):
        def seen(out):
            if not out.requires_grad:
                return
            channel = layers.op_of(modules[name]).channel_dim(out.dim())

            def on_grad(grad):
                g2 = grad.detach().double() ** 2
                per = g2.movedim(channel, -1).reshape(-1, g2.shape[channel]).sum(0)
                sums[name] = sums.get(name, 0) + per.cpu()
            out.register_hook(on_grad)
        return seen

    dtype = model_dtype(model)
    size = batch_size(trace, settings, backward=True)
    shard = samples.shard()
    model.eval()
    with calls.activation_gradients(model), calls.hooks(model, on_output={n: make(n) for n in names}):
        for xb, yb, _ in bars.track(shard.batches(size), "sensitivities (forward+backward)",
                                    total=math.ceil(len(shard) / size)):
            out = call(model, batch_to(xb, settings.device, dtype), settings.output_key)
            task.loss(out, yb.to(settings.device), "sum").backward()
    n = reduce_sum(float(len(shard)))
    return {k: reduce_sum(v) / n for k, v in sums.items()}
