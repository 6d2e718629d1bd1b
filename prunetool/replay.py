"""Stage by stage: a model's forward recorded as a list of calls and replayed over all calibration batches one
*stage* at a time.

The recording is made at two batch sizes, so that sizes computed from the batch become symbolic. A stage ends
where a consumer must be refitted; the activations that cross the boundary are kept (:mod:`prunetool.store`),
everything else is freed as soon as its last reader has run. Each consumer is refitted as soon as its inputs are
final, consumers whose inputs do not depend on each other's refit are fitted at the same boundary, and nothing
before a stage is ever recomputed: a refit costs one forward pass of the cut model. The same loop measures the
means of mean compensation behind every earlier cut. A model whose forward cannot be replayed (data-dependent
control flow, a batch size baked into a cached tensor) is refused by :meth:`Program.record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from . import calls, layers, ops
from .batch import Batch, batch_len, batch_slice, batch_to, forward, model_dtype
from .data import Samples
from .progress import QUIET, Bars
from .record import Ref, record
from .store import Store, trim_heap


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
                forward(model, batch_slice(example, 0, 1))  # warm caches
            grad = layers.fused(model)  # else without autograd, keeping no activation: a forward's memory
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
                if isinstance(u, Ref):
                    if not isinstance(v, Ref):
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
                want = forward(model, example)
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
            if isinstance(leaf, Ref):
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
        op = ops.of_call(node.name.lstrip("_"))
        w = op.weight_of(node.args, node.kwargs) if op is not None else None
        return self.owners.get(w.id) if isinstance(w, Ref) else None


def replay(program: Program, model: nn.Module, samples: Samples, size: int, boundaries: list[int],
           on_boundary: Callable[[int, "Frontier"], None], settings, bars: Bars = QUIET,
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
                envs = ((program.start(model, batch_to(xb, device, dtype)), ids)
                        for xb, _, ids in samples.batches(size))
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
        if node.kind == "module":
            op, arg, bound = layers.op_of(node.op), Ref(node.inputs[0]), {}
        else:
            op = ops.of_call(node.name.lstrip("_"))
            arg = op.input_of(node.args, node.kwargs)
            bound = {k: v for k, v in op.bind(node.args, node.kwargs).items() if not isinstance(v, Ref)}
        for env, ids in self.batches():
            yield calls.Call(op, env[arg.id], bound), ids


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
