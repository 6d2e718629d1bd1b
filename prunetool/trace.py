"""Trace stage: which units exist, who consumes them, and which channels are coupled.

The model is traced from one real forward pass: module hooks record every leaf-module call and a
``TorchFunctionMode`` records every tensor op between them (functional code, ``x.view(n, -1)``,
in-place activations, residual adds, ``torch.cat``). Each recorded tensor carries its *channel
structure*: which dimension holds the channels and which unit space each channel range belongs to.

- A producer (Linear, Conv2d) opens a new unit space for its outputs.
- Ops that act on each channel separately pass the structure through (activations, pooling, dropout,
  BatchNorm and depthwise convs, whose per-channel parameters are sliced with the units).
- An element-wise op between two tensors (a residual add, a squeeze-excitation product) couples their
  spaces: channel i of one is channel i of the other, so they are removed together (union-find).
- ``cat`` along channels lays spaces side by side; a consumer then reads each at an offset.
- A flatten of a conv output into a Linear gives each unit ``H·W`` input features.
- Anything else (LayerNorm, a reshape that splits channels, attention, an unknown layer, the model's
  outputs) protects the spaces it touches, with the reason recorded. Protected units are never cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UsageError

UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                 nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Upsample)
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
UNARY_MODULE_NAMES = {"StochasticDepth"}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
UNARY_FUNCS = {"relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
               "hardsigmoid", "hardtanh", "mish", "softplus", "dropout", "alpha_dropout", "contiguous", "clone",
               "float", "to", "type_as", "detach", "abs", "neg", "exp", "sqrt", "clamp", "clamp_min", "clamp_max",
               "stochastic_depth"}
SPATIAL_FUNCS = {"max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                 "adaptive_max_pool2d_with_indices", "dropout2d", "feature_dropout", "interpolate", "upsample"}
BINARY_FUNCS = {"add", "sub", "mul", "div", "rsub", "true_divide", "maximum", "minimum", "__add__", "__radd__",
                "__mul__", "__rmul__", "__sub__", "__rsub__", "__truediv__", "__iadd__", "__imul__", "where"}
RESHAPE_FUNCS = {"flatten", "view", "reshape"}
PERMUTE_FUNCS = {"permute", "transpose", "swapaxes", "movedim"}
REDUCE_FUNCS = {"mean", "sum", "amax", "amin"}
ATOMIC = (nn.MultiheadAttention,)


@dataclass
class Producer:
    name: str
    module: nn.Module


@dataclass
class Consumer:
    """A layer that reads a group's units: input channels ``offset … offset+units`` (× ``spatial`` features)."""

    name: str
    module: nn.Module
    offset: int = 0
    spatial: int = 1
    norm_after: str | None = None  # BatchNorm right after it, which can absorb a constant when it has no bias


@dataclass
class Member:
    """A per-channel parameter cut with the units: a BatchNorm, a depthwise conv, or a parameter tensor."""

    name: str
    module: nn.Module
    offset: int = 0
    param: str | None = None  # for a bare parameter (e.g. a layer scale): its attribute name
    dim: int = 0  # the parameter's channel dimension


@dataclass
class Group:
    """Units removed together: the outputs of coupled producers, with their members and consumers."""

    name: str
    producers: list[Producer]
    units: int
    members: list[Member] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    blocks: int = 1  # a grouped-conv producer: remove the same count from each of these contiguous blocks


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
    order: dict[str, int] = field(default_factory=dict)  # layer name → position of its first call
    heads: list[str] = field(default_factory=list)  # producers whose units are the model's outputs

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


# --- recording ------------------------------------------------------------------------------------

@dataclass
class _Node:
    kind: str  # "module" or "function"
    name: str
    op: object
    inputs: list[int]
    outputs: list[int]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _func_name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return name if name.startswith("__") else name.lstrip("_").removesuffix("_")


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
        self.tokens: dict[int, int] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.params: dict[int, int] = {}  # token → id of the nn.Parameter it is
        self.tensors: dict[int, torch.Tensor] = {}  # also keeps tensors alive, so their ids are not reused
        self.depth = 0

    def _new(self, t: torch.Tensor) -> int:
        tok = len(self.shapes)
        self.tokens[id(t)] = tok
        self.shapes[tok] = tuple(t.shape)
        self.tensors[tok] = t
        if isinstance(t, nn.Parameter):
            self.params[tok] = id(t)
        return tok

    def tensor(self, tok: int) -> torch.Tensor:
        return self.tensors[tok]

    def token(self, t: torch.Tensor) -> int:
        return self.tokens[id(t)] if id(t) in self.tokens else self._new(t)

    def add(self, kind, name, op, inputs, outputs):
        ins, outs = _tensors(inputs), _tensors(outputs)
        if not outs:
            return
        in_tokens = [self.token(t) for t in ins]
        out_tokens = [self._new(t) for t in outs]
        args, kwargs = inputs if kind == "function" else (inputs, {})
        self.nodes.append(_Node(kind, name, op, in_tokens, out_tokens, tuple(args or ()), dict(kwargs or {})))


def _leaves(model: nn.Module) -> dict[nn.Module, str]:
    found, skip = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, ATOMIC):
            skip.append(name)
            found[module] = name
        elif not any(True for _ in module.children()):
            found[module] = name
    return found


def record(model: nn.Module, example: torch.Tensor) -> tuple[_Graph, int, list[int], tuple[int, ...]]:
    """Run ``model`` once on ``example``; return the graph, the input token, output tokens and output shape."""
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
    input_token = graph.token(example)
    try:
        # Grad mode on: without it nn.TransformerEncoderLayer takes a fused fast path that hides its layers.
        with torch.enable_grad(), _Recorder(graph):
            out = model(example)
    except Exception as e:
        raise UsageError(f"inputs of shape {tuple(example.shape[1:])} do not fit the model "
                         f"({str(e).splitlines()[0][:160]}); check --data or --input-shape") from None
    finally:
        for h in handles:
            h.remove()
    outs = _tensors(out)
    if not outs:
        raise UsageError("the model returns no tensor; prunetool needs a model whose forward returns logits")
    return graph, input_token, [graph.token(t) for t in outs], tuple(outs[0].shape)


# --- channel analysis -------------------------------------------------------------------------------

@dataclass
class _Ann:
    """Channel structure of a tensor: unit spaces side by side along ``cdim``, each unit ``spatial`` wide."""

    segs: tuple[tuple[int, int], ...]  # (space id, units)
    cdim: int
    spatial: int = 1

    @property
    def units(self) -> int:
        return sum(n for _, n in self.segs)

    def offsets(self):
        offset = 0
        for space, n in self.segs:
            yield space, offset
            offset += n


@dataclass
class _Space:
    size: int
    parent: int
    reason: str | None = None
    producers: list = field(default_factory=list)
    members: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    blocks: int = 1


class _Spaces:
    """Union-find over unit spaces."""

    def __init__(self):
        self.spaces: list[_Space] = []

    def new(self, size: int, reason: str | None = None) -> int:
        self.spaces.append(_Space(size, len(self.spaces), reason))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def get(self, i: int) -> _Space:
        return self.spaces[self.find(i)]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        sb.parent = ra
        for attr in ("producers", "members", "consumers"):
            getattr(sa, attr).extend(getattr(sb, attr))
        sa.reason = sa.reason or sb.reason
        sa.blocks = max(sa.blocks, sb.blocks)

    def protect(self, ann: _Ann | None, reason: str) -> None:
        if ann is None:
            return
        for space, _ in ann.segs:
            s = self.get(space)
            s.reason = s.reason or reason


class _Analysis:
    def __init__(self, graph: _Graph, model: nn.Module):
        self.graph = graph
        self.spaces = _Spaces()
        self.ann: dict[int, _Ann] = {}
        self.param_owner = {id(p): (name.rpartition(".")[0], name.rpartition(".")[2], m)
                            for name, p in model.named_parameters()
                            for m in [model.get_submodule(name.rpartition(".")[0])]}
        self.calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.kind == "module":
                self.calls[node.name] = self.calls.get(node.name, 0) + 1
        self.users: dict[int, list[_Node]] = {}
        for node in graph.nodes:
            for tok in dict.fromkeys(node.inputs):
                self.users.setdefault(tok, []).append(node)

    # helpers
    def fresh(self, tok: int, reason: str) -> None:
        shape = self.graph.shapes[tok]
        if len(shape) >= 2:
            cdim = 1 if len(shape) == 4 else len(shape) - 1
            self.ann[tok] = _Ann(((self.spaces.new(shape[cdim], reason), shape[cdim]),), cdim)

    def opaque(self, node: _Node, reason: str) -> None:
        for tok in node.inputs:
            self.spaces.protect(self.ann.get(tok), reason)
        for tok in node.outputs:
            self.fresh(tok, reason)

    def annotated(self, node: _Node) -> list[tuple[int, _Ann]]:
        return [(t, self.ann[t]) for t in dict.fromkeys(node.inputs) if t in self.ann]

    # modules
    def module(self, node: _Node) -> None:
        op, name = node.op, node.name
        ins = self.annotated(node)
        a = ins[0][1] if ins else None
        out = node.outputs[0]
        ndim_in = len(self.graph.shapes[node.inputs[0]]) if node.inputs else 0
        many = self.calls[name] > 1
        if isinstance(op, nn.Conv2d) and op.groups == op.in_channels == op.out_channels and op.groups > 1:
            if a is None or a.cdim != 1 or a.spatial != 1 or many:
                return self.opaque(node, f"depthwise conv {name} cannot be cut here")
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(name, op, offset))
            self.ann[out] = a
        elif isinstance(op, (nn.Linear, nn.Conv2d)):
            if a is not None:
                if op.__class__ is not nn.Linear and isinstance(op, nn.Conv2d) and op.groups > 1:
                    self.spaces.protect(a, f"read by grouped conv {name}")
                elif isinstance(op, nn.Conv2d) and (a.cdim != 1 or a.spatial != 1 or ndim_in != 4):
                    self.spaces.protect(a, f"conv {name} does not read them as channels")
                elif isinstance(op, nn.Linear) and a.cdim != ndim_in - 1:
                    self.spaces.protect(a, f"Linear {name} reads another dimension")
                elif many:
                    self.spaces.protect(a, f"{name} is called {self.calls[name]} times")
                else:
                    for space, offset in a.offsets():
                        self.spaces.get(space).consumers.append(
                            Consumer(name, op, offset, a.spatial, self._norm_after(out)))
            units = op.weight.shape[0]
            space = self.spaces.new(units, f"{name} is called {self.calls[name]} times" if many else None)
            self.spaces.spaces[space].producers.append(Producer(name, op))
            if isinstance(op, nn.Conv2d):
                self.spaces.spaces[space].blocks = op.groups
                if op.padding_mode != "zeros":
                    self.spaces.spaces[space].reason = f"padding_mode={op.padding_mode!r} of {name}"
            shape = self.graph.shapes[out]
            self.ann[out] = _Ann(((space, units),), 1 if isinstance(op, nn.Conv2d) else len(shape) - 1)
        elif isinstance(op, NORMS):
            if a is None or a.cdim != 1 or a.spatial != 1 or many:
                return self.opaque(node, f"normalisation {name} cannot be cut here")
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(name, op, offset))
            self.ann[out] = a
        elif isinstance(op, nn.PReLU) and op.num_parameters > 1:
            if a is None or a.cdim != 1 or a.spatial != 1:
                return self.opaque(node, f"PReLU {name} cannot be cut here")
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(name, op, offset, "weight", 0))
            self.ann[out] = a
        elif isinstance(op, UNARY_MODULES) or type(op).__name__ in UNARY_MODULE_NAMES:
            if a is not None:
                self.ann[out] = a
        elif isinstance(op, SPATIAL_MODULES):
            if a is not None and a.cdim == 1 and a.spatial == 1 and ndim_in == 4:
                self.ann[out] = a
            else:
                self.opaque(node, f"pooling {name} mixes units")
        elif isinstance(op, nn.Flatten):
            self.reshape(node)
        elif a is not None and len(ins) == 1 and not any(True for _ in op.parameters()) \
                and not any(True for _ in op.buffers()):
            self.structural(node, ins[0])  # a parameter-free layer such as torchvision's Permute
        else:
            self.opaque(node, f"{name} ({type(op).__name__}) is a layer prunetool cannot cut through")

    def _norm_after(self, tok: int) -> str | None:
        users = self.users.get(tok, [])
        return users[0].name if len(users) == 1 and isinstance(users[0].op, NORMS) else None

    # functions
    def function(self, node: _Node) -> None:
        ins = self.annotated(node)
        if not ins:
            return
        name = node.name
        if name in BINARY_FUNCS:
            return self.binary(node, ins)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node, ins)
        if len(ins) != 1:
            return self.opaque(node, f"{name} combines them with other tensors")
        a = ins[0][1]
        if name in UNARY_FUNCS and all(self._scalar(t) for t in node.inputs if t not in self.ann):
            for out in node.outputs:
                self.ann[out] = a
        elif name in SPATIAL_FUNCS:
            if a.cdim == 1 and a.spatial == 1 and len(self.graph.shapes[ins[0][0]]) == 4:
                self.ann[node.outputs[0]] = a
            else:
                self.opaque(node, f"{name} mixes units")
        elif name in RESHAPE_FUNCS:
            self.reshape(node)
        else:
            self.structural(node, ins[0])

    def _scalar(self, tok: int) -> bool:
        return math.prod(self.graph.shapes[tok]) == 1

    def binary(self, node: _Node, ins) -> None:
        out = node.outputs[0]
        out_shape = self.graph.shapes[out]
        nd = len(out_shape)
        ref_tok, ref = ins[0]
        cdim = ref.cdim + nd - len(self.graph.shapes[ref_tok])
        for tok, a in ins[1:]:
            same = a.cdim + nd - len(self.graph.shapes[tok]) == cdim and a.spatial == ref.spatial
            if same and [n for _, n in a.segs] == [n for _, n in ref.segs]:
                for (s1, _), (s2, _) in zip(ref.segs, a.segs):
                    self.spaces.union(s1, s2)
            elif same and a.units == 1:
                continue
            else:
                return self.opaque(node, f"{node.name} combines tensors with different channel layouts")
        for tok in node.inputs:
            if tok in self.ann:
                continue
            shape = (1,) * (nd - len(self.graph.shapes[tok])) + self.graph.shapes[tok]
            if shape[cdim] == 1:
                continue
            owner = self.param_owner.get(self.graph.params.get(tok))
            if owner is not None and not ref.spatial > 1:
                module_name, attr, module = owner
                pdim = cdim - (nd - len(self.graph.shapes[tok]))
                for space, offset in ref.offsets():
                    self.spaces.get(space).members.append(Member(module_name, module, offset, attr, pdim))
            else:
                return self.opaque(node, f"{node.name} mixes them with a per-channel constant")
        self.ann[out] = _Ann(ref.segs, cdim, ref.spatial)

    def cat(self, node: _Node, ins) -> None:
        out = node.outputs[0]
        nd = len(self.graph.shapes[out])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % nd
        if len(ins) != len(node.inputs):
            return self.opaque(node, f"{node.name} joins them with tensors prunetool cannot slice")
        cdims = {a.cdim for _, a in ins}
        if len(cdims) != 1 or any(a.spatial != 1 for _, a in ins):
            return self.opaque(node, f"{node.name} joins tensors with different channel layouts")
        cdim = cdims.pop()
        if dim == cdim:
            self.ann[out] = _Ann(tuple(seg for _, a in ins for seg in a.segs), cdim)
        else:
            self.binary(node, ins)

    def reshape(self, node: _Node) -> None:
        tok = node.inputs[0]
        a = self.ann[tok]
        src, dst = self.graph.shapes[tok], self.graph.shapes[node.outputs[0]]
        c = a.cdim
        lead = math.prod(src[:c])
        prods = [math.prod(dst[:i]) for i in range(len(dst) + 1)]
        where = [i for i in range(len(dst)) if prods[i] == lead]
        for i in where:
            if dst[i] == src[c]:  # same leading block and same channel size: every channel keeps its place
                self.ann[node.outputs[0]] = _Ann(a.segs, i, a.spatial)
                return
            if i == len(dst) - 1 and dst[i] == src[c] * math.prod(src[c + 1:]):
                self.ann[node.outputs[0]] = _Ann(a.segs, i, a.spatial * math.prod(src[c + 1:]))
                return
        self.opaque(node, f"reshape {node.name} {src[1:]}→{dst[1:]} splits or mixes channels")

    def structural(self, node: _Node, ins) -> None:
        """Ops that only move or select along dimensions: find where the channel dim went by replaying the op on
        a tensor holding 1, 2, …, C along the channel dim."""
        tok, a = ins
        shape = self.graph.shapes[tok]
        width = a.units * a.spatial
        original = self.graph.tensor(tok)
        marker = torch.arange(1, width + 1, dtype=torch.float32).view(
            [-1 if i == a.cdim else 1 for i in range(len(shape))]).expand(shape)
        swap = lambda x: marker if x is original else x  # noqa: E731
        try:
            result = node.op(*[swap(x) for x in node.args], **{k: swap(v) for k, v in node.kwargs.items()})
        except Exception:
            return self.opaque(node, f"{node.name} is an op prunetool cannot cut through")
        outs = _tensors(result)
        if len(outs) != len(node.outputs) or not outs:
            return self.opaque(node, f"{node.name} is an op prunetool cannot cut through")
        found = []
        for t in outs:
            dims = [d for d in range(t.dim()) if t.shape[d] == width]
            ok = None
            for d in dims:
                v = t.movedim(d, -1).reshape(-1, width)
                if v.dtype.is_floating_point and torch.allclose(v / v[:, :1], marker.new_tensor(range(1, width + 1))):
                    ok = d
                    break
            found.append(ok)
        if any(d is None for d in found):
            return self.opaque(node, f"{node.name} splits, reduces or reorders channels")
        for out, d in zip(node.outputs, found):
            self.ann[out] = _Ann(a.segs, d, a.spatial)

    def run(self, input_token: int, output_tokens: list[int]) -> None:
        shape = self.graph.shapes[input_token]
        if len(shape) >= 2:
            self.ann[input_token] = _Ann(((self.spaces.new(shape[1], "they are the model inputs"), shape[1]),), 1)
        for node in self.graph.nodes:
            if node.kind == "module":
                self.module(node)
            else:
                self.function(node)
        self.output_roots = set()
        for tok in output_tokens:
            self.spaces.protect(self.ann.get(tok), "its units are model outputs")
            for space, _ in (self.ann[tok].segs if tok in self.ann else ()):
                self.output_roots.add(space)


def trace(model: nn.Module, example: torch.Tensor) -> Trace:
    """Find the prunable groups of ``model`` from one forward pass on ``example``."""
    was_training = model.training
    model.eval()
    try:
        graph, input_token, output_tokens, output_shape = record(model, example)
    finally:
        model.train(was_training)
    analysis = _Analysis(graph, model)
    analysis.run(input_token, output_tokens)
    groups, protected = [], []
    output_roots = {analysis.spaces.find(i) for i in analysis.output_roots}
    heads = [p.name for r in output_roots for p in analysis.spaces.spaces[r].producers]
    roots = dict.fromkeys(analysis.spaces.find(i) for i in range(len(analysis.spaces.spaces)))
    for root in roots:
        space = analysis.spaces.spaces[root]
        if not space.producers:
            continue
        names = ", ".join(dict.fromkeys(p.name for p in space.producers))
        reason = space.reason
        if reason is None and not space.consumers:
            reason = "no layer reads its units"
        if reason is None and space.size % space.blocks:
            reason = f"{space.size} units do not split into {space.blocks} conv groups"
        if reason is not None:
            protected.append(Protected(names, reason))
            continue
        producers = list({p.name: p for p in space.producers}.values())
        groups.append(Group(producers[0].name, producers, space.size, _unique(space.members),
                            _unique(space.consumers), space.blocks))
    order = {}
    for i, node in enumerate(graph.nodes):
        if node.kind == "module":
            order.setdefault(node.name, i)
    groups.sort(key=lambda g: min(order[p.name] for p in g.producers))
    return Trace(groups, protected, tuple(example.shape[1:]), output_shape[1:], order, heads)


def _unique(items: list) -> list:
    seen, out = set(), []
    for item in items:
        key = (item.name, item.offset, getattr(item, "param", None))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
