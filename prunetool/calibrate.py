"""The calibration engine: every statistic prunetool gathers from calibration data, in as few passes over it as
the arithmetic allows, within a memory budget, on the chosen device.

Streaming passes (batches of samples through the whole model; any model):

- :func:`statistics`: one forward pass gives the mean of every unit as each consumer reads it (what mean
  compensation folds into a bias and MRS replaces a unit by) and every consumer's dense output at sampled
  positions (the targets of the least-squares refit);
- :func:`covariances`: one forward pass gives ``XᵀX`` of the inputs of chosen layers (data-aware lowrank);
- MRS itself (:mod:`prunetool.score`) is one forward and backward pass on top of those means.

Stage by stage (:class:`Program`): the model's forward is recorded as a list of calls (one recording at two
batch sizes, so that sizes computed from the batch become symbolic) and replayed over all calibration batches
one *stage* at a time. A stage ends where a consumer must be refitted; the activations that cross the boundary
are cached, everything else is freed as soon as its last reader has run. Each consumer is refitted as soon as
its inputs are final, consumers whose inputs do not depend on each other's refit are fitted at the same
boundary, and nothing before a stage is ever recomputed: a refit costs one forward pass of the cut model. The
same loop measures the means of mean compensation behind every earlier cut. A model whose forward cannot be
replayed (data-dependent control flow, a batch size baked into a cached tensor) is refused by
:meth:`Program.record`, and the callers fall back to rerunning the model up to each consumer (prunetool 0.1's
path, same results, slower).

Precision and sampling: ``XᵀX`` and ``XᵀZ`` are accumulated in float32 per batch (divided first by an exact
power of two when activations pass 2⁴⁰, whose squares would overflow) and summed in float64; the solve is in
float64. A least-squares fit needs rows in proportion to its inputs, not to the pictures' size: a convolution
or a token sequence contributes ``rows × fan-in / samples`` output positions per sample (at least one;
ThiNet-style, the same positions in the dense and the cut model; default ``rows`` chosen by measurement,
docs/BENCHMARKS.md), so the dense targets kept for the refit take ``rows`` floats per weight.

Memory: cached tensors (targets and stage activations together) stay on the device while they fit in three
quarters of ``memory`` bytes, and batches are sized to what is left. Beyond it, on a GPU they go to host memory
in float16; on the CPU, where host memory is what the budget bounds, they go unchanged to a temporary file (so
the budget changes where they live, never the result). Targets are read once, late, and leave first; a stage's
activations are given back as its last reader goes through them.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from . import calls, task
from .batch import Batch, batch_len, batch_slice, batch_to, call, model_dtype
from .data import Samples
from .distributed import reduce_sum
from .errors import UsageError
from .options import DEFAULT_CALIB_MEMORY, DEFAULT_ROWS
from .progress import QUIET, Bars
from .trace import Consumer, Group, Tok, Trace, fused_attention, record


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


# --- memory -----------------------------------------------------------------------------------------

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _MALLOC_TRIM, _MALLOPT = _LIBC.malloc_trim, _LIBC.mallopt
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = _MALLOPT = None
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MAPPED_ALONE = 1 << 20  # bytes from which an allocation is mapped by itself


def trim_heap() -> None:
    """Hand freed heap memory back to the operating system. glibc keeps it otherwise: the many small tensors a
    pass frees leave holes that larger ones cannot reuse, and the process's resident size grows far past what it
    holds (2 GB more on resnet50's refit)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def map_large_alone() -> None:
    """Allocations of ``MAPPED_ALONE`` bytes or more get a mapping of their own, returned to the system when
    freed. glibc otherwise raises that threshold to the largest block freed so far (up to 32 MB), and the float32
    copies a half-precision model's calls make and free (tens of MB each, :mod:`prunetool.precision`) stay in the
    heap as holes: 2 GiB of a 1 B Llama's peak. Process-wide; every fresh page then costs a fault, which makes a
    half-precision run slower (docs/BENCHMARKS.md, "Memory"), so only such runs ask for it."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MAPPED_ALONE)


class Kept:
    """One kept tensor: where it lives (``tensor`` on the device, ``tensor`` in float16 on the host, or ``path``
    in the spill directory) and what to give back."""

    __slots__ = ("tensor", "path", "dtype", "shape", "nbytes")

    def __init__(self, tensor: torch.Tensor):
        self.tensor: torch.Tensor | None = tensor
        self.path: str | None = None
        self.dtype, self.shape = tensor.dtype, tensor.shape
        self.nbytes = tensor.numel() * tensor.element_size()  # what it takes of the budget (0 once spilled)


class Store:
    """Tensors kept for later, on the device while three quarters of the budget last (the rest is for the
    batches). Beyond that they go to host memory in float16 when the device is an accelerator; when the device is
    the CPU, whose memory the budget bounds, they go exactly to a temporary file (``TMPDIR``), deleted on release.
    Cold tensors (read once, late: the refit targets) leave the device first, to make room for hot ones (stage
    activations, read twice, at once)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.capacity = settings.memory - settings.memory // 4  # the last quarter is for the batches
        self.used = 0
        self.resident: dict[int, Kept] = {}  # id → cold entries on the device, oldest first
        self.disk = torch.device(settings.device).type == "cpu"  # where tensors past the budget go
        self.spilled = 0  # bytes written to the spill directory so far
        self._dir: str | None = None
        self._count = 0

    def keep(self, t: torch.Tensor, cold: bool = False) -> Kept:
        kept = Kept(t)
        if not t.dtype.is_floating_point:
            self.used += kept.nbytes
            return kept
        if self.used + kept.nbytes > self.capacity and not cold and self.resident:
            for other in list(self.resident.values()):
                if self.used + kept.nbytes <= self.capacity:
                    break
                self._spill(other)
            trim_heap()
        if self.used + kept.nbytes <= self.capacity:
            self.used += kept.nbytes
            if cold:
                self.resident[id(kept)] = kept
        else:
            kept.nbytes = 0  # never counted
            self._spill(kept)
        return kept

    def release(self, kept: Kept) -> None:
        self.resident.pop(id(kept), None)
        if kept.path is not None:
            os.remove(kept.path)
            kept.path = None
        elif kept.nbytes:
            self.used -= kept.nbytes
        kept.tensor, kept.nbytes = None, 0

    def get(self, kept: Kept) -> torch.Tensor:
        if kept.path is not None:
            raw = np.fromfile(kept.path, dtype=np.uint8)
            return torch.from_numpy(raw).view(kept.dtype).reshape(kept.shape).to(self.settings.device)
        return kept.tensor.to(self.settings.device, kept.dtype)  # itself when nothing moves

    def _spill(self, kept: Kept) -> None:
        t = kept.tensor.detach()
        self.used -= kept.nbytes
        self.resident.pop(id(kept), None)
        kept.nbytes = 0
        if not self.disk:
            kept.tensor = t.to("cpu", torch.float16)
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="prunetool-cache-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._count += 1
        path = os.path.join(self._dir, f"{self._count}.bin")
        try:
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)
        except OSError as e:
            raise UsageError(f"the calibration cache cannot write {path} ({e.strerror}); give it more memory "
                             "(--calib-memory) or point TMPDIR at a disk with room") from None
        self.spilled += t.numel() * t.element_size()
        kept.path, kept.tensor = path, None


def batch_size(trace: Trace, settings: Settings, backward: bool = False, reserve: int = 0) -> int:
    """Samples per batch so that a pass's activations fit in what the memory budget has left after the tensors
    already kept and ``reserve`` bytes the pass will keep (at least its last quarter; a forward keeps far fewer of
    its activations alive than a forward and backward)."""
    per_sample = max(1, trace.activation_bytes)
    kept = min(settings.cache().used + reserve, settings.cache().capacity)
    left = settings.memory - kept
    share = left / (per_sample if backward else per_sample / 2)
    return int(max(1, min(256 if backward else 64, share)))


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


def rows_at(call: calls.Call, weight: torch.Tensor, x: torch.Tensor, picks: torch.Tensor | None) -> torch.Tensor:
    """The design rows a layer's weight multiplies, at the sampled output positions ``picks`` (n × P; None: all
    rows), as (n·P) × fan-in."""
    if call.name.startswith("conv"):
        stride, padding, dilation = calls.conv_geometry(call, weight)
        if weight.dim() == 3:
            x = x.unsqueeze(2)
            kernel, stride, padding, dilation = (1, weight.shape[2]), (1, *stride), (0, *padding), (1, *dilation)
        else:
            kernel = tuple(weight.shape[2:])
        if picks is None:
            return calls.design_matrix(call, weight, x if weight.dim() == 4 else x.squeeze(2))
        n, c, h, w = x.shape
        xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        w_out = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        i, j = picks // w_out, picks % w_out
        rows = (i * stride[0])[..., None] + torch.arange(kernel[0], device=x.device) * dilation[0]
        cols = (j * stride[1])[..., None] + torch.arange(kernel[1], device=x.device) * dilation[1]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        patches = xp.permute(0, 2, 3, 1)[batch, rows[:, :, :, None], cols[:, :, None, :]]  # n, P, kh, kw, c
        return patches.permute(0, 1, 4, 2, 3).reshape(n * picks.shape[1], c * kernel[0] * kernel[1])
    flat = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x[:, None, :]
    if picks is None:
        return flat.reshape(-1, flat.shape[-1])
    return flat.gather(1, picks[..., None].expand(-1, -1, flat.shape[-1]).to(x.device)).reshape(-1, flat.shape[-1])


def out_positions(call: calls.Call, out: torch.Tensor) -> int:
    """Output positions per sample of a call (spatial positions of a conv, tokens of a sequence)."""
    if call.name.startswith("conv"):
        return math.prod(out.shape[2:])
    return math.prod(out.shape[1:-1]) if out.dim() > 2 else 1


def targets_at(call: calls.Call, out: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """A call's outputs at the sampled positions, (n·P) × outputs."""
    if call.name.startswith("conv"):
        flat = out.flatten(2)  # n, C, positions
        return flat.gather(2, picks[:, None, :].expand(-1, flat.shape[1], -1).to(out.device)).transpose(1, 2) \
            .reshape(-1, flat.shape[1])
    flat = out.reshape(out.shape[0], -1, out.shape[-1]) if out.dim() > 2 else out[:, None, :]
    return flat.gather(1, picks[..., None].expand(-1, -1, flat.shape[-1]).to(out.device)).reshape(-1, flat.shape[-1])


def _per_sample(call: calls.Call, x: torch.Tensor, n: int) -> bool:
    """Whether a call's leading dimension is the batch of samples (not the tokens of a flattened batch)."""
    return x.shape[0] == n


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

    def release(self, name: str | None = None) -> None:
        """Give the targets' memory back to the budget (one consumer's, or all)."""
        for key in [name] if name is not None else list(self.targets):
            for k in self.targets.pop(key, []):
                self.store.release(k)

    def targets_of(self, name: str) -> tuple[torch.Tensor, dict[int, int], int]:
        """A consumer's dense targets (rows of every sample, in gathering order), each sample id's row number,
        and the rows per sample."""
        rows = torch.cat([self.store.get(k) for k in self.targets[name]])
        ids = self.target_ids[name]
        return rows, {int(i): r for r, i in enumerate(ids)}, len(rows) // max(1, len(ids))


def consumers_of(trace: Trace) -> dict[str, Consumer]:
    """Every consumer layer, once (a layer reading several groups appears once)."""
    out = {}
    for g in trace.groups:
        for c in g.consumers:
            out.setdefault(c.name, c)
    return out


def statistics(model: nn.Module, trace: Trace, samples: Samples, settings: Settings, bars: Bars = QUIET,
               targets: bool = False, groups: list[Group] | None = None) -> Statistics:
    """Unit means (and, with ``targets``, every consumer's dense outputs at sampled positions) in one forward
    pass over ``samples``."""
    from .score import Sums, readers, unit_view

    model.eval()
    sums = Sums()
    pairs = readers(trace, groups)
    store = settings.cache()
    positions = Positions(settings.rows, len(samples), settings.seed)
    stats = Statistics({}, positions=positions, store=store)
    modules = dict(model.named_modules())
    current: dict = {}
    on_input, on_output, weights = {}, {}, {}
    for name, read in pairs.items():
        weights[name] = read[0][1].weight

        def seen(a, read=read):
            a = a.detach()
            for g, c in read:
                sums.add((g.name, c.name, c.offset), unit_view(a, g, c).double(), c)
        on_input[name] = seen
        if targets:
            def produced(out, name=name, c=read[0][1]):
                ids, n = current["ids"], current["n"]
                call = calls.Call(_call_name(c), out, {})
                if out.shape[0] != n:
                    return
                fan_in = getattr(modules[name], c.weight).movedim(c.dim, 0)[0].numel()
                picks = positions.pick(name, out_positions(call, out), ids, fan_in)
                rows = targets_at(call, out.detach(), picks)
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
            current.update(ids=ids, n=batch_len(xb))
            model(**batch_to(xb, device, model_dtype(model))) if isinstance(xb, dict) else \
                model(batch_to(xb, device, model_dtype(model)))
    stats.means = sums.means()
    return stats


def _call_name(c: Consumer) -> str:
    return "conv2d" if c.layout == "conv" else "linear"


def covariances(model: nn.Module, names: list[str], samples: Samples, settings: Settings, trace: Trace,
                bars: Bars = QUIET) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` of the inputs each named layer's weight multiplies (conv: patches at sampled positions), from
    one forward pass."""
    positions = Positions(settings.rows, len(samples), settings.seed)
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
            if call is not None and _per_sample(call, x, len(ids)):
                probe = calls.Call(call.name, x, call.args)
                n_pos = positions_of(probe, weight, x)
                picks = positions.pick(name, n_pos, ids, weight[0].numel())
            design = rows_at(captured.get(name) or calls.Call("linear", x, {}), weight, x, picks)
            block = (design.T.float() @ design.float()).double()
            sums[name] = sums.get(name, 0) + block.cpu()
            counts[name] = counts.get(name, 0) + len(design)
        return seen

    shard = samples.shard()
    example = shard.take(2)[0]
    for name in names:  # the geometry of each layer's own call (stride, padding, dilation)
        captured[name] = calls.capture(model, name, batch_to(example, settings.device, model_dtype(model)))
    size = batch_size(trace, settings)
    with torch.no_grad(), calls.hooks(model, {n: make(n) for n in names}):
        for xb, _, ids in bars.track(shard.batches(size), "input covariances", total=math.ceil(len(shard) / size)):
            current["ids"] = ids
            model(**batch_to(xb, settings.device, model_dtype(model))) if isinstance(xb, dict) else \
                model(batch_to(xb, settings.device, model_dtype(model)))
    return {n: reduce_sum(sums[n]) / reduce_sum(counts[n]) for n in names}


def positions_of(call: calls.Call, weight: torch.Tensor, x: torch.Tensor) -> int:
    if call.name.startswith("conv"):
        stride, padding, dilation = calls.conv_geometry(call, weight)
        size = 1
        for d, (s, p, dl, k) in enumerate(zip(stride, padding, dilation, weight.shape[2:])):
            size *= (x.shape[2 + d] + 2 * p - dl * (k - 1) - 1) // s + 1
        return size
    return math.prod(x.shape[1:-1]) if x.dim() > 2 else 1


# --- programs ------------------------------------------------------------------------------------------

@dataclass
class _Step:
    node: object
    symbolic: dict[int, tuple[int, int]]  # leaf index → (a, c): the value is a·batch + c


class Program:
    """A model's forward as recorded calls, replayable on any batch size (see the module docstring)."""

    def __init__(self, steps, inputs, outputs, owners, constants, keys):
        self.steps: list[_Step] = steps
        self.inputs: list[int] = inputs  # tokens of the model inputs (for dict inputs, in ``keys`` order)
        self.outputs: list[int] = outputs
        self.owners: dict[int, tuple[str, str]] = owners  # token → (module path, attribute) of a parameter/buffer
        self.constants: dict[int, torch.Tensor] = constants
        self.keys = keys
        self.last_use: dict[int, int] = {}
        for i, step in enumerate(steps):
            for t in step.node.inputs:
                self.last_use[t] = i

    @classmethod
    def record(cls, model: nn.Module, example: Batch) -> "Program | None":
        """Record ``model`` on ``example`` (at least 3 samples); None when its forward cannot be replayed."""
        if batch_len(example) < 3:
            return None
        try:
            with torch.no_grad():
                model(**batch_slice(example, 0, 1)) if isinstance(example, dict) else model(example[:1])  # warm caches
            grad = fused_attention(model)  # else without autograd, keeping no activation: a forward's memory
            g2, in2, out2, _ = record(model, batch_slice(example, 0, 2), grad=grad, keep_outputs=False)
            g3, _, _, _ = record(model, batch_slice(example, 0, 3), grad=grad, keep_outputs=False)
        except Exception:
            return None
        if len(g2.nodes) != len(g3.nodes):
            return None
        owner = {}
        for mname, module in model.named_modules():
            for attr, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is not None:
                    owner.setdefault(id(t), (mname, attr))
        produced = {t for n in g2.nodes for t in n.outputs}
        steps, owners, constants = [], {}, {}
        for a, b in zip(g2.nodes, g3.nodes):
            if a.name != b.name or a.kind != b.kind or len(a.outputs) != len(b.outputs):
                return None
            la, lb = tree_leaves((a.args, a.kwargs)), tree_leaves((b.args, b.kwargs))
            if len(la) != len(lb):
                return None
            symbolic = {}
            for i, (u, v) in enumerate(zip(la, lb)):
                if isinstance(u, Tok):
                    if not isinstance(v, Tok):
                        return None
                    if u.id in produced or u.id in in2:
                        continue
                    t2, t3 = g2.tensors[u.id], g3.tensors[v.id]
                    if id(t2) in owner:
                        owners[u.id] = owner[id(t2)]
                    elif t2.shape == t3.shape and torch.equal(t2, t3):
                        constants[u.id] = t2
                    else:
                        return None  # a cached tensor that depends on the batch
                elif isinstance(u, int) and not isinstance(u, bool) and isinstance(v, int) and u != v:
                    symbolic[i] = (v - u, u - 2 * (v - u))
                elif type(u) is not type(v) or (not isinstance(u, torch.Tensor) and u != v):
                    return None
            steps.append(_Step(a, symbolic))
        keys = list(example) if isinstance(example, dict) else None
        program = cls(steps, in2, out2, owners, constants, keys)
        if not program.replays(model, example):
            return None
        return program

    def replays(self, model: nn.Module, example: Batch) -> bool:
        """Whether the program computes what the model does on ``example`` (3 samples, unseen sizes included)."""
        try:
            with torch.no_grad():
                want = model(**example) if isinstance(example, dict) else model(example)
                env = self.start(model, example)
                for i in range(len(self.steps)):
                    self.execute(i, model, env, batch_len(example))
        except Exception:
            return False
        want_t = [t for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
        got = [env.get(t) for t in self.outputs]
        return len(got) == len(want_t) and all(
            g is not None and g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5)
            for g, w in zip(got, want_t))

    def start(self, model: nn.Module, batch: Batch) -> dict:
        values = [batch[k] for k in self.keys] if self.keys else [batch]
        return dict(zip(self.inputs, values))

    def execute(self, i: int, model: nn.Module, env: dict, n: int, keep_all: bool = False,
                transform: Callable | None = None) -> None:
        """Run step ``i`` on the values in ``env`` (a batch of ``n`` samples); free what no later step reads."""
        step = self.steps[i]
        node = step.node
        leaves, spec = tree_flatten((node.args, node.kwargs))
        values = []
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, Tok):
                if leaf.id in env:
                    values.append(env[leaf.id])
                elif leaf.id in self.owners:
                    path, attr = self.owners[leaf.id]
                    values.append(getattr(model.get_submodule(path), attr))
                else:
                    values.append(self.constants[leaf.id])
            elif j in step.symbolic:
                a, c = step.symbolic[j]
                values.append(a * n + c)
            else:
                values.append(leaf)
        args, kwargs = tree_unflatten(values, spec)
        if transform is not None:
            args, kwargs = transform(args, kwargs)
        if node.kind == "module":
            out = model.get_submodule(node.name)(*args, **kwargs)
        else:
            out = node.op(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for tok, t in zip(node.outputs, outs):
            env[tok] = t
        if not keep_all:
            for tok in node.inputs:
                if self.last_use.get(tok, -1) <= i and tok not in self.outputs:
                    env.pop(tok, None)

    def call_of(self, i: int) -> tuple[str, str] | None:
        """(layer, weight attribute) of a step that is a layer's own weighted call (or an atomic layer)."""
        node = self.steps[i].node
        if node.kind == "module":
            return node.name, ""
        where = calls.WEIGHT_ARG.get(node.name.lstrip("_"))
        if where is None:
            return None
        w = node.args[where[0]] if len(node.args) > where[0] else node.kwargs.get(where[1])
        return self.owners.get(w.id) if isinstance(w, Tok) else None


def replay(program: Program, model: nn.Module, samples: Samples, size: int, boundaries: list[int],
           on_boundary: Callable[[int, "Frontier"], None], settings: Settings, bars: Bars = QUIET,
           transforms: dict[int, Callable] | None = None, label: str = "stage by stage") -> None:
    """Replay ``program`` over ``samples`` stage by stage: before step ``b`` of each boundary, ``on_boundary(b,
    frontier)`` sees the values crossing it for every batch (and may change the model)."""
    transforms = transforms if transforms is not None else {}
    store = settings.cache()
    frontier: Frontier | None = None
    end = len(program.steps)
    stops = sorted(set(b for b in boundaries if 0 < b < end)) + [end]
    start = 0
    device, dtype = settings.device, model_dtype(model)
    with torch.no_grad():
        for stop in bars.track(stops, label):
            new = Frontier(store, program, stop)
            if frontier is None:  # the first stage reads the samples themselves
                envs = ((program.start(model, batch_to(xb, device, dtype)), ids) for xb, _, ids in samples.batches(size))
            else:
                envs = frontier.batches(release=True)  # this stage is the frontier's last reader
            for env, ids in envs:
                for i in range(start, stop):
                    program.execute(i, model, env, len(ids), transform=transforms.get(i))
                if stop < end:
                    new.add({t: v for t, v in env.items() if program.last_use.get(t, -1) >= stop}, ids)
            frontier = new
            trim_heap()
            if stop < end:
                on_boundary(stop, frontier)
            start = stop


class Frontier:
    """The values crossing a stage boundary, batch by batch."""

    def __init__(self, store: Store, program: Program, step: int):
        self.store, self.program, self.step = store, program, step
        self.chunks: list[tuple[dict, torch.Tensor]] = []

    def add(self, env: dict, ids: torch.Tensor) -> None:
        self.chunks.append(({t: self.store.keep(v) for t, v in env.items()}, ids))

    def batches(self, release: bool = False):
        """Each batch's values; with ``release``, each chunk is given back as soon as it has been read."""
        if not release:
            for kept, ids in self.chunks:
                yield {t: self.store.get(v) for t, v in kept.items()}, ids
            return
        while self.chunks:
            kept, ids = self.chunks.pop(0)
            values = {t: self.store.get(v) for t, v in kept.items()}
            for v in kept.values():
                self.store.release(v)
            yield values, ids

    def call_inputs(self, i: int, model: nn.Module):
        """For each batch: step ``i``'s call (its input resolved) and the batch's sample ids."""
        node = self.program.steps[i].node
        for env, ids in self.batches():
            if node.kind == "module":
                x = env[node.inputs[0]]
                yield calls.Call("atomic", x, {}), ids
                continue
            name = node.name.lstrip("_")
            pos, key = calls.INPUT_ARG[name]
            arg = node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
            x = env[arg.id]
            bound = {}
            if name.startswith("conv"):
                bound = dict(zip(calls.CONV_ARGS, node.args))
                bound.update(node.kwargs)
                bound = {k: v for k, v in bound.items() if not isinstance(v, Tok)}
            yield calls.Call(name, x, bound), ids


def boundaries_for(program: Program, wanted: dict[tuple[str, str], object]) -> tuple[list[int], dict[int, list]]:
    """The steps where stages must end so that each wanted call (layer, weight) is fitted as soon as its inputs
    are final, and which calls are fitted at each boundary (those whose inputs were all computed before an
    earlier boundary join it)."""
    made_at: dict[int, int] = {}
    for i, step in enumerate(program.steps):
        for t in step.node.outputs:
            made_at[t] = i
    bounds: list[int] = []
    fitted: dict[int, list] = {}
    for i in range(len(program.steps)):
        key = program.call_of(i)
        if key is None:
            continue
        match = wanted.get(key) or wanted.get((key[0], ""))
        if match is None:
            continue
        ready = max((made_at.get(t, -1) for t in program.steps[i].node.inputs if t not in program.owners
                     and t not in program.constants), default=-1)
        if bounds and ready < bounds[-1]:
            fitted[bounds[-1]].append((i, match))
        else:
            bounds.append(i)
            fitted[i] = [(i, match)]
    return bounds, fitted


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
            channel = 1 if out.dim() > 2 and not isinstance(modules[name], nn.Linear) else out.dim() - 1

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
