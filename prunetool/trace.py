"""Trace stage: which units exist, who consumes them, and what must stay untouched.

The model is traced from a real forward pass: module hooks record every leaf module call and a
``TorchFunctionMode`` records every tensor operation between them, so functional code (``F.relu``,
``x.view(n, -1)``) is seen as well as ``nn.Sequential`` layers. A producer (Linear, Conv2d) becomes a
prunable group only when its output reaches exactly one consumer (Linear, Conv2d) through ops that act
on each unit separately (BatchNorm, activations, pooling, dropout, one flatten). Anything else protects
the producer, with the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UsageError

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d,
               nn.Dropout2d, nn.AlphaDropout, nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ELEMENTWISE_FUNCS = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu",
                     "silu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid", "hardtanh",
                     "hardtanh_", "mish", "softplus", "dropout", "contiguous", "clone", "alpha_dropout"}
POOL_FUNCS = {"max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
              "adaptive_max_pool2d_with_indices", "dropout2d", "feature_dropout"}
FLATTEN_FUNCS = {"flatten", "view", "reshape"}
ATOMIC = (nn.MultiheadAttention,)


@dataclass
class Consumer:
    """A layer that reads a group's units as input features or channels."""

    name: str
    module: nn.Module
    spatial: int = 1  # input features per unit: >1 when a conv output is flattened into a Linear
    norm_after: str | None = None  # BatchNorm right after it, which can absorb a constant when it has no bias


@dataclass
class Group:
    """The units of one producer, removed together with their BatchNorm entries and consumer inputs."""

    name: str
    producer: nn.Module
    units: int
    norms: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)


@dataclass
class Protected:
    name: str
    reason: str


@dataclass
class Trace:
    groups: list[Group]
    protected: list[Protected]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


@dataclass
class _Node:
    kind: str  # "module" or "function"
    name: str
    op: object
    inputs: list[int]
    outputs: list[int]


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _func_name(func) -> str:
    return getattr(func, "__name__", str(func)).lstrip("_")


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: "_Graph"):
        super().__init__()
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.graph.depth == 0:
            self.graph.add("function", _func_name(func), func, (args, kwargs), out)
        return out


class _Graph:
    """Dataflow between recorded calls. Each call's outputs get fresh tokens, so in-place ops
    (``ReLU(inplace=True)`` returns its input object) still form a chain."""

    def __init__(self):
        self.nodes: list[_Node] = []
        self.alive: list[torch.Tensor] = []  # keeps tensors alive so their ids are not reused
        self.tokens: dict[int, int] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.depth = 0

    def token(self, t: torch.Tensor) -> int:
        if id(t) not in self.tokens:
            self.alive.append(t)
            self.tokens[id(t)] = len(self.shapes)
            self.shapes[len(self.shapes)] = tuple(t.shape)
        return self.tokens[id(t)]

    def add(self, kind, name, op, inputs, outputs):
        ins, outs = _tensors(inputs), _tensors(outputs)
        if not outs:
            return
        in_tokens = [self.token(t) for t in ins]
        out_tokens = []
        for t in outs:
            self.alive.append(t)
            self.tokens[id(t)] = len(self.shapes)
            self.shapes[len(self.shapes)] = tuple(t.shape)
            out_tokens.append(self.tokens[id(t)])
        self.nodes.append(_Node(kind, name, op, in_tokens, out_tokens))

    def shape(self, tid: int) -> tuple[int, ...]:
        return self.shapes[tid]


def _leaves(model: nn.Module) -> dict[nn.Module, str]:
    found, skip = {}, set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, ATOMIC):
            skip.add(name)
            found[module] = name
        elif not any(True for _ in module.children()):
            found[module] = name
    return found


def record(model: nn.Module, example: torch.Tensor) -> tuple[_Graph, list[int], tuple[int, ...]]:
    """Run ``model`` once on ``example`` and record the dataflow between leaf modules and tensor ops."""
    graph = _Graph()
    leaves = _leaves(model)
    handles = []

    def pre(module, args):
        graph.depth += 1

    def post(module, args, out):
        graph.depth -= 1
        if graph.depth == 0:
            graph.add("module", leaves[module], module, args, out)

    for module in leaves:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), _Recorder(graph):
            out = model(example)
    except Exception as e:
        raise UsageError(f"inputs of shape {tuple(example.shape[1:])} do not fit the model "
                         f"({str(e).splitlines()[0][:160]}); check --data or --input-shape") from None
    finally:
        for h in handles:
            h.remove()
    outs = _tensors(out)
    return graph, [graph.token(t) for t in outs], tuple(outs[0].shape)


def _is_producer(module) -> bool:
    return isinstance(module, nn.Linear) or (type(module) is nn.Conv2d or isinstance(module, nn.Conv2d))


def _producer_problem(module) -> str | None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported yet"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported"
    return None


def trace(model: nn.Module, example: torch.Tensor) -> Trace:
    """Find the prunable groups of ``model`` from one forward pass on ``example``."""
    was_training = model.training
    model.eval()
    graph, output_ids, output_shape = record(model, example)
    model.train(was_training)
    users: dict[int, list[_Node]] = {}
    for node in graph.nodes:
        for tid in dict.fromkeys(node.inputs):
            users.setdefault(tid, []).append(node)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.kind == "module":
            calls[node.name] = calls.get(node.name, 0) + 1

    groups, protected = [], []
    seen = set()
    for node in graph.nodes:
        if node.kind != "module" or not _is_producer(node.op) or node.name in seen:
            continue
        seen.add(node.name)
        problem = _producer_problem(node.op)
        if problem is None and calls[node.name] > 1:
            problem = f"called {calls[node.name]} times in one forward pass"
        result = problem or _follow(graph, users, set(output_ids), node, calls)
        if isinstance(result, str):
            protected.append(Protected(node.name, result))
        else:
            groups.append(result)
    return Trace(groups, protected, tuple(example.shape[1:]), output_shape[1:])


def _follow(graph: _Graph, users, outputs: set[int], node: _Node, calls) -> Group | str:
    """Walk from a producer's output to its consumer; a string return is the reason it is protected."""
    module = node.op
    units = module.weight.shape[0]
    tid = node.outputs[0]
    unit_dim_first = isinstance(module, nn.Conv2d)  # conv units are dim 1; Linear units the last dim
    norms, spatial, flattened = [], 1, False
    while True:
        if tid in outputs:
            return "its units are model outputs"
        nexts = users.get(tid, [])
        if len(nexts) != 1:
            if not nexts:
                return "its output is not used by a layer prunetool can see"
            names = ", ".join(sorted({n.name for n in nexts}))
            return f"its output feeds {len(nexts)} ops ({names}); branches are not supported yet"
        user = nexts[0]
        op = user.op
        if user.kind == "module" and _is_producer(op):
            if calls[user.name] > 1:
                return f"its consumer {user.name} is called {calls[user.name]} times"
            if isinstance(op, nn.Conv2d):
                if flattened or op.in_channels != units or op.groups != 1:
                    return f"consumer {user.name} does not read its channels one-to-one"
            elif op.in_features != units * spatial:
                return f"consumer {user.name} reads {op.in_features} features, not {units}×{spatial}"
            after = users.get(user.outputs[0], [])
            norm_after = after[0].name if len(after) == 1 and isinstance(after[0].op, NORMS) else None
            return Group(node.name, module, units, norms, [Consumer(user.name, op, spatial, norm_after)])
        if len(set(user.inputs)) != 1 and not (user.kind == "module" and isinstance(op, NORMS)):
            return f"{user.name} combines its output with other tensors"
        shape = graph.shape(tid)
        if user.kind == "module" and isinstance(op, NORMS):
            if flattened or not unit_dim_first or op.num_features != units:
                return f"normalisation {user.name} does not act on its units one by one"
            norms.append(user.name)
        elif user.kind == "module" and isinstance(op, ACTIVATIONS) and not isinstance(op, nn.Dropout2d):
            pass
        elif user.kind == "module" and isinstance(op, POOLS) or (user.kind == "function" and user.name in POOL_FUNCS):
            if not unit_dim_first or flattened:
                return f"pooling {user.name} mixes its units"
        elif user.kind == "function" and user.name in ELEMENTWISE_FUNCS:
            pass
        elif _is_flatten(user, graph, tid):
            out_shape = graph.shape(user.outputs[0])
            if out_shape == shape:
                pass
            elif flattened or not unit_dim_first or len(shape) != 4:
                return f"reshape {user.name} of its output is not a plain flatten"
            else:
                spatial, flattened = shape[2] * shape[3], True
        else:
            return f"followed by {user.name}, an op prunetool cannot cut through"
        tid = user.outputs[0]


def _is_flatten(node: _Node, graph: _Graph, tid: int) -> bool:
    if node.kind == "module":
        return isinstance(node.op, nn.Flatten) and node.op.start_dim == 1 and node.op.end_dim == -1
    if node.name not in FLATTEN_FUNCS:
        return False
    src, out = graph.shape(tid), graph.shape(node.outputs[0])
    return len(out) == 2 and out[0] == src[0]
