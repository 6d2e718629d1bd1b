"""Recording a forward pass: every top-level torch call with the tensors it read and made, as a graph of
:class:`Node` s whose tensor arguments are :class:`Ref` s. Atomic layers (:mod:`prunetool.layers`) are recorded as
one call, their ``forward`` unread; a leaf module that makes no call torch reports is one opaque node. The trace
analyses such a graph; the calibration engine replays it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from . import layers
from .batch import forward
from .errors import UsageError
from .task import OutputError, logits


@dataclass(frozen=True)
class Ref:
    """A recorded tensor in a node's arguments."""

    id: int


@dataclass
class Node:
    kind: str  # "function" or "module" (an atomic layer)
    name: str  # function name, or the module's path
    op: object
    inputs: list[int]
    outputs: list[int]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    where: str = ""  # path of the module whose forward made the call


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _func_name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return name if name.startswith("__") else name.lstrip("_").removesuffix("_")


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: "Graph"):
        super().__init__()
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.graph.depth == 0:
            self.graph.add("function", _func_name(func), func, args, kwargs or {}, out)
        return out


class Graph:
    """Dataflow between recorded calls. Each call's outputs get fresh tokens, so in-place ops
    (``ReLU(inplace=True)`` returns its input object) still form a chain."""

    def __init__(self, names: dict[nn.Module, str], keep_outputs: bool = True):
        self.nodes: list[Node] = []
        self.tokens: dict[int, int] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.tensors: dict[int, torch.Tensor] = {}  # also keeps tensors alive, so their ids are not reused
        self.depth = 0
        self.names = names
        self.stack: list[str] = []
        # keep_outputs=False: what calls produce is not kept (only the inputs, parameters and constants they read):
        # a recording's memory is then a forward's, not every activation at once. A freed output's id leaves
        # ``tokens`` as it dies, before Python can reuse it.
        self.keep_outputs = keep_outputs
        self._watch: dict[int, weakref.ref] = {}

    def _new(self, t: torch.Tensor, keep: bool = True) -> int:
        tok = len(self.shapes)
        self.tokens[id(t)] = tok
        self.shapes[tok] = tuple(t.shape)
        if keep:
            self.tensors[tok] = t
        else:
            key, tokens = id(t), self.tokens
            self._watch[tok] = weakref.ref(t, lambda _, key=key, tok=tok: tokens.pop(key, None)
                                           if tokens.get(key) == tok else None)
        return tok

    def token(self, t: torch.Tensor) -> int:
        return self.tokens[id(t)] if id(t) in self.tokens else self._new(t)

    def add(self, kind, name, op, args, kwargs, outputs) -> None:
        outs = _tensors(outputs)
        if not outs:
            return
        args, kwargs = tree_map(self._mark, (tuple(args), dict(kwargs)))
        ins = [leaf.id for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Ref)]
        out_tokens = [self._new(t, self.keep_outputs) for t in outs]
        where = self.stack[-1] if self.stack else ""
        self.nodes.append(Node(kind, name, op, list(dict.fromkeys(ins)), out_tokens, args, kwargs, where))

    def _mark(self, x):
        return Ref(self.token(x)) if isinstance(x, torch.Tensor) else x

    def value(self, x):
        """A node argument with its tensors filled in."""
        return tree_map(lambda v: self.tensors[v.id] if isinstance(v, Ref) else v, x)


def record(model: nn.Module, example, output_key: str | None = None, grad: bool = True,
           keep_outputs: bool = True) -> tuple[Graph, list[int], list[int], tuple[int, ...]]:
    """Run ``model`` once on ``example``; return the graph, input tokens, output tokens and the logits' shape.
    ``grad=False`` records without autograd (see :func:`prunetool.layers.fused`); ``keep_outputs``: see :class:`Graph`."""
    names = {m: n for n, m in model.named_modules()}
    graph = Graph(names, keep_outputs)
    atomic = {m for m in names if layers.kind_of(m).atomic}
    counts: list[int] = []

    def pre(module, args):
        if module not in names:
            return
        graph.stack.append(names[module])
        counts.append(len(graph.nodes))
        if module in atomic:
            graph.depth += 1

    def post(module, args, out):
        if module not in names:
            return
        graph.stack.pop()
        start = counts.pop()
        if module in atomic:
            graph.depth -= 1
            if graph.depth == 0:
                graph.add("module", names[module], module, args, {}, out)
        elif graph.depth == 0 and len(graph.nodes) == start and not any(True for _ in module.children()):
            # A leaf that made no call trace could see (a custom kernel, say): one opaque node for it.
            ins = {id(t) for t in _tensors(args)}
            if any(id(t) not in ins for t in _tensors(out)):
                graph.add("module", names[module], module, args, {}, out)

    inputs = [graph.token(t) for t in _tensors(example)]
    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]
    try:
        # Grad mode on: without it torch's transformer layers take a fused fast path that hides their calls.
        with (torch.enable_grad() if grad else torch.no_grad()), _Recorder(graph):
            out = forward(model, example)
    except Exception as e:
        shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else \
            ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in example.items())
        raise UsageError(f"inputs of shape {shape} do not fit the model "
                         f"({str(e).splitlines()[0][:160]}); check --data, --input-shape or --tokens") from None
    finally:
        for h in handles:
            h.remove()
    outs = _tensors(out)
    if not outs:
        raise UsageError("the model returns no tensor; prunetool needs a model whose forward returns logits")
    try:
        main = logits(out, output_key)
    except OutputError as e:
        raise UsageError(str(e)) from None
    return graph, inputs, [graph.token(t) for t in outs], tuple(main.shape)
