"""Trace stage: which units exist, who consumes them, and which channels are coupled.

The model is traced from one real forward pass. A ``TorchFunctionMode`` records every top-level torch call
(``linear``, ``conv2d``, ``batch_norm``, ``x.view(n, -1)``, in-place activations, residual adds,
``torch.cat``), and each call that uses a module's own weight is that module's: a layer is recognised by what
it does, whatever its class or children (a ``Conv2d`` subclass that pads in its ``forward``, a norm that also
activates). Each recorded tensor carries its *channel structure*: which dimension holds the channels and which
unit space each channel range belongs to.

- ``linear``/``conv`` with a module's own weight: that module consumes the input's units and its outputs
  open a new unit space (it is a *producer*).
- Ops that act on each channel separately pass the structure through: known element-wise functions, and any
  other op for which perturbing one input channel changes only that channel of the output (probed on the
  traced tensors). BatchNorm, depthwise convs, PReLU and per-channel parameters are *members*: sliced with
  the units.
- An element-wise op between two tensors (a residual add, a squeeze-excitation product) couples their spaces:
  channel i of one is channel i of the other, so they are removed together (union-find).
- ``cat`` along channels lays spaces side by side; a consumer then reads each at an offset.
- A flatten of a conv output into a Linear gives each unit ``H·W`` input features.
- Anything else (LayerNorm, a reshape that splits channels, attention, an op that mixes channels, the model's
  outputs) protects the spaces it touches, with the layer and op named. Protected units are never cut.

Layers registered as atomic in :mod:`prunetool.layers` are recorded as one call, their ``forward`` unread.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from . import layers
from .errors import UsageError
from .task import OutputError, logits


@dataclass
class Producer:
    """A layer whose outputs are the group's units: rows (``dim``) of its ``weight`` and entries of ``bias``.

    Unit u is rows ``offset + u·width … offset + (u+1)·width``: ``width`` > 1 for an attention head (its channels),
    ``offset`` for one part of a fused projection (the keys of a q|k|v layer)."""

    name: str
    module: nn.Module
    weight: str = "weight"
    bias: str | None = "bias"
    dim: int = 0
    offset: int = 0
    width: int = 1

    def rows(self, units: torch.Tensor) -> torch.Tensor:
        return (self.offset + units[:, None] * self.width + torch.arange(self.width)).reshape(-1)


@dataclass
class Consumer:
    """A layer that reads a group's units: input channels ``offset … offset+units`` (× ``spatial`` features).

    ``layout`` is how it reads them: ``"linear"`` (the last dimension of its input, weight columns ``dim``),
    ``"conv"`` (dimension 1 of its input, weight dimension 1).
    """

    name: str
    module: nn.Module
    offset: int = 0
    spatial: int = 1
    norm_after: str | None = None  # BatchNorm right after it, which can absorb a constant when it has no bias
    weight: str = "weight"
    dim: int = 1
    layout: str = "linear"
    padded: bool = False  # its call pads the input (a constant unit is then not constant at the borders)
    bias: str | None = "bias"


@dataclass
class Member:
    """Per-channel tensors cut with the units: a BatchNorm, a depthwise conv, a PReLU, a layer scale."""

    name: str
    module: nn.Module
    offset: int = 0
    tensors: tuple[tuple[str, int], ...] = ()  # (attribute, channel dimension)


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
    activation_bytes: int = 0  # every intermediate tensor of one sample's forward pass (sizes batches)

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


# --- recording ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tok:
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
        ins = [leaf.id for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tok)]
        out_tokens = [self._new(t, self.keep_outputs) for t in outs]
        where = self.stack[-1] if self.stack else ""
        self.nodes.append(Node(kind, name, op, list(dict.fromkeys(ins)), out_tokens, args, kwargs, where))

    def _mark(self, x):
        return Tok(self.token(x)) if isinstance(x, torch.Tensor) else x

    def value(self, x):
        """A node argument with its tensors filled in."""
        return tree_map(lambda v: self.tensors[v.id] if isinstance(v, Tok) else v, x)


def fused_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds a torch layer that takes a fused fast path without autograd (and hides its calls)."""
    return any(isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention))
               for m in model.modules())


def _call(model: nn.Module, example):
    if isinstance(example, dict):
        return model(**example)
    return model(example)


def record(model: nn.Module, example, output_key: str | None = None, grad: bool = True,
           keep_outputs: bool = True) -> tuple[Graph, list[int], list[int], tuple[int, ...]]:
    """Run ``model`` once on ``example``; return the graph, input tokens, output tokens and the logits' shape.
    ``grad=False`` records without autograd (see :func:`fused_attention`); ``keep_outputs``: see :class:`Graph`."""
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
        # Grad mode on: without it nn.TransformerEncoderLayer takes a fused fast path that hides its layers.
        with (torch.enable_grad() if grad else torch.no_grad()), _Recorder(graph):
            out = _call(model, example)
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

    def untouched(self, i: int) -> bool:
        """Whether a space's units are still plain producer outputs (no reader or member yet): only then may they
        be regrouped or partitioned."""
        s = self.get(i)
        return not s.consumers and not s.members and bool(s.producers) and s.blocks == 1

    def regroup(self, i: int, factor: int) -> None:
        """Units become blocks of ``factor`` consecutive units (channels become heads, heads become kv groups)."""
        s = self.get(i)
        s.size //= factor
        for p in s.producers:
            p.width *= factor

    def partition(self, i: int, sizes: list[int]) -> list[int]:
        """Split a space into consecutive parts (the queries, keys and values of one fused projection)."""
        s = self.get(i)
        parts, start = [], 0
        for n in sizes:
            part = self.new(n, s.reason)
            self.spaces[part].producers = [Producer(p.name, p.module, p.weight, p.bias, p.dim,
                                                    p.offset + start * p.width, p.width) for p in s.producers]
            parts.append(part)
            start += n
        s.producers = []
        return parts


# Signatures of the calls the analysis reads by name (torch's own parameter names).
SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv3d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "group_norm": ("input", "num_groups", "weight", "bias"),
    "prelu": ("input", "weight"),
    "embedding": ("input", "weight"),
    "addmm": ("input", "mat1", "mat2"),
    "matmul": ("input", "other"),
    "scaled_dot_product_attention": ("query", "key", "value", "attn_mask"),
}
ELEMENTWISE = {"relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
               "hardsigmoid", "hardtanh", "mish", "softplus", "softsign", "tanhshrink", "logsigmoid", "erf", "dropout",
               "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone", "float", "half", "bfloat16", "double",
               "to", "type", "type_as", "detach", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "reciprocal", "square",
               "sin", "cos", "clamp", "clamp_min", "clamp_max", "clip", "pow", "stochastic_depth", "requires_grad"}
BINARY = {"add", "sub", "mul", "div", "rsub", "true_divide", "maximum", "minimum", "where", "__add__", "__radd__",
          "__iadd__", "__mul__", "__rmul__", "__imul__", "__sub__", "__rsub__", "__isub__", "__truediv__",
          "__rtruediv__", "__itruediv__"}
RESHAPE = {"flatten", "view", "reshape"}
MIXING = {"layer_norm": "normalises across channels", "rms_norm": "normalises across channels",
          "multi_head_attention_forward": "is attention with packed projections prunetool does not cut"}


class _Analysis:
    def __init__(self, graph: Graph, model: nn.Module):
        self.graph = graph
        self.spaces = _Spaces()
        self.ann: dict[int, _Ann] = {}
        self.owner: dict[int, tuple[str, str, nn.Module]] = {}
        self.modules = dict(model.named_modules())
        for mname, module in model.named_modules():
            for attr, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is not None:
                    self.owner.setdefault(id(t), (mname, attr, module))
        self.calls: dict[int, int] = {}  # id of a module → how many calls use its own tensors
        self.users: dict[int, list[Node]] = {}
        for node in graph.nodes:
            for tok in node.inputs:
                self.users.setdefault(tok, []).append(node)
            if node.kind == "module":
                self.calls[id(node.op)] = self.calls.get(id(node.op), 0) + 1
            elif node.name in SIGNATURES:
                owners = {id(o[2]) for k, v in self.bind(node).items() if k != "input" and (o := self.owned(v))}
                for key in owners:
                    self.calls[key] = self.calls.get(key, 0) + 1
        self.order: dict[str, int] = {}
        self.views: dict[int, tuple[str, str, nn.Module]] = {}  # token → the 1-D parameter it is a view of

    # helpers
    def bind(self, node: Node) -> dict:
        names = SIGNATURES.get(node.name, ())
        bound = dict(zip(names, node.args))
        bound.update({k: v for k, v in node.kwargs.items()})
        return bound

    def owned(self, x) -> tuple[str, str, nn.Module] | None:
        return self.owner.get(id(self.graph.tensors[x.id])) if isinstance(x, Tok) else None

    def shape(self, x) -> tuple[int, ...]:
        return self.graph.shapes[x.id] if isinstance(x, Tok) else ()

    def fresh(self, tok: int, reason: str) -> None:
        shape = self.graph.shapes[tok]
        if len(shape) >= 2:
            cdim = 1 if len(shape) == 4 else len(shape) - 1
            self.ann[tok] = _Ann(((self.spaces.new(shape[cdim], reason), shape[cdim]),), cdim)

    def opaque(self, node: Node, reason: str) -> None:
        for tok in node.inputs:
            self.spaces.protect(self.ann.get(tok), reason)
        for tok in node.outputs:
            self.fresh(tok, reason)

    def annotated(self, node: Node) -> list[tuple[int, _Ann]]:
        return [(t, self.ann[t]) for t in node.inputs if t in self.ann]

    def where(self, node: Node) -> str:
        """The module that made the call, with its type: ``blocks.0.norm (LayerNorm)``."""
        if not node.where:
            return "the model's forward"
        return f"{node.where} ({type(self.modules[node.where]).__name__})"

    # producers and consumers
    def weighted(self, node: Node, x, weight, bias, layout: str, out_dim: int, in_dim: int, padded: bool = False):
        """A call that multiplies ``x`` by a module's own ``weight``: consumer of x's units, producer of its
        outputs."""
        own = self.owned(weight)
        if own is None or not isinstance(self.graph.tensors[weight.id], nn.Parameter):
            return self.opaque(node, f"{node.name} in {self.where(node)} uses a weight computed in its forward")
        name, attr, module = own
        self.order.setdefault(name, len(self.order))
        bias_own = self.owned(bias)
        bias_attr = bias_own[1] if bias_own is not None and bias_own[2] is module else None
        uses = self.calls.get(id(module), 1)
        a = self.ann.get(x.id) if isinstance(x, Tok) else None
        ndim_in = len(self.shape(x))
        cdim_read = 1 if layout == "conv" else ndim_in - 1
        out = node.outputs[0]
        if a is not None:
            if uses > 1:
                self.spaces.protect(a, f"{name} is called {uses} times")
            elif a.cdim != cdim_read or (layout == "conv" and a.spatial != 1):
                self.spaces.protect(a, f"{name} ({node.name}) does not read them as its input channels")
            else:
                for space, offset in a.offsets():
                    self.spaces.get(space).consumers.append(Consumer(
                        name, module, offset, a.spatial, self._norm_after(out), attr, in_dim,
                        "conv" if layout == "conv" else "linear", padded, bias_attr))
        units = self.graph.tensors[weight.id].shape[out_dim]
        space = self.spaces.new(units, f"{name} is called {uses} times" if uses > 1 else None)
        self.spaces.spaces[space].producers.append(Producer(name, module, attr, bias_attr, out_dim))
        out_shape = self.graph.shapes[out]
        self.ann[out] = _Ann(((space, units),), 1 if layout == "conv" else len(out_shape) - 1)
        return space

    def f_linear(self, node):
        b = self.bind(node)
        self.weighted(node, b.get("input"), b.get("weight"), b.get("bias"), "linear", 0, 1)

    def f_conv(self, node):
        b = self.bind(node)
        x, weight = b.get("input"), b.get("weight")
        groups = b.get("groups", 1)
        padding = b.get("padding", 0)
        padded = padding == "same" or any(p != 0 for p in (padding if isinstance(padding, (tuple, list))
                                                              else (padding,)) if not isinstance(p, str))
        w = self.graph.tensors[weight.id] if isinstance(weight, Tok) else None
        a = self.ann.get(x.id) if isinstance(x, Tok) else None
        own = self.owned(weight)
        if w is not None and own is not None and groups > 1 and w.shape[0] == groups == self.shape(x)[1]:
            # depthwise: one filter per channel, cut with the units it filters
            name, attr, module = own
            bias_own = self.owned(b.get("bias"))
            if a is None or a.cdim != 1 or a.spatial != 1 or self.calls.get(id(module), 1) > 1:
                return self.opaque(node, f"depthwise conv {name} cannot be cut here")
            tensors = ((attr, 0),) + (((bias_own[1], 0),) if bias_own is not None else ())
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(name, module, offset, tensors))
            self.ann[node.outputs[0]] = a
            return
        if groups > 1 and a is not None:
            self.spaces.protect(a, f"read by grouped conv {own[0] if own else self.where(node)}")
            a = None
            x = None
        space = self.weighted(node, x, weight, b.get("bias"), "conv", 0, 1, padded)
        if space is not None:
            self.spaces.spaces[space].blocks = groups

    def f_addmm(self, node):  # bias + x @ W with W (in × out): Hugging Face's Conv1D
        b = self.bind(node)
        self.weighted(node, b.get("mat1"), b.get("mat2"), b.get("input"), "linear", 1, 0)

    def f_embedding(self, node):
        b = self.bind(node)
        own = self.owned(b.get("weight"))
        if own is None:
            return self.opaque(node, f"embedding in {self.where(node)} uses a weight computed in its forward")
        name, attr, module = own
        w = self.graph.tensors[b["weight"].id]
        uses = self.calls.get(id(module), 1)
        self.order.setdefault(name, len(self.order))
        space = self.spaces.new(w.shape[1], f"{name} is called {uses} times" if uses > 1 else None)
        self.spaces.spaces[space].producers.append(Producer(name, module, attr, None, 1))
        out = node.outputs[0]
        self.ann[out] = _Ann(((space, w.shape[1]),), len(self.graph.shapes[out]) - 1)

    # members
    def f_norm(self, node):
        b = self.bind(node)
        x = b.get("input")
        a = self.ann.get(x.id) if isinstance(x, Tok) else None
        if a is None:
            return
        owned = [(k, self.owned(v)) for k, v in b.items() if k != "input" and self.owned(v) is not None]
        modules = {id(o[2]) for _, o in owned}
        if len(modules) > 1 or a.cdim != 1 or a.spatial != 1 or any(self.calls.get(m, 1) > 1 for m in modules):
            return self.opaque(node, f"{node.name} in {self.where(node)} cannot be cut here")
        if owned:
            module = owned[0][1][2]
            tensors = tuple((o[1], 0) for _, o in owned)
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(owned[0][1][0], module, offset, tensors))
        self.ann[node.outputs[0]] = a

    def f_group_norm(self, node):
        b = self.bind(node)
        x = b.get("input")
        a = self.ann.get(x.id) if isinstance(x, Tok) else None
        if a is not None and b.get("num_groups") == a.units and a.cdim == 1:
            return self.f_norm(node)
        self.opaque(node, f"group_norm in {self.where(node)} normalises across channels")

    def f_prelu(self, node):
        b = self.bind(node)
        own = self.owned(b.get("weight"))
        x = b.get("input")
        a = self.ann.get(x.id) if isinstance(x, Tok) else None
        if a is None:
            return
        if own is None or self.graph.tensors[b["weight"].id].numel() == 1:
            self.ann[node.outputs[0]] = a
            return
        if a.cdim != 1 or a.spatial != 1:
            return self.opaque(node, f"PReLU {own[0]} cannot be cut here")
        for space, offset in a.offsets():
            self.spaces.get(space).members.append(Member(own[0], own[2], offset, ((own[1], 0),)))
        self.ann[node.outputs[0]] = a

    def _norm_after(self, tok: int) -> str | None:
        users = self.users.get(tok, [])
        if len(users) == 1 and users[0].name == "batch_norm":
            own = self.owned(self.bind(users[0]).get("running_mean"))
            return own[0] if own is not None else None
        return None

    # atomic layers
    def module(self, node: Node) -> None:
        kind = layers.kind_of(node.op)
        if not kind.atomic:
            return self.opaque(node, f"{node.name} ({type(node.op).__name__}) is a layer prunetool cannot see into")
        args = [Tok(t) for t in node.inputs]
        weight = getattr(node.op, kind.weight)
        wtok = self.graph.token(weight)
        bias = getattr(node.op, kind.bias) if kind.bias else None
        btok = Tok(self.graph.token(bias)) if isinstance(bias, torch.Tensor) else None
        self.weighted(node, args[0] if args else None, Tok(wtok), btok, "linear", kind.out_dim, 1 - kind.out_dim)

    # functions
    def function(self, node: Node) -> None:
        name = node.name
        handler = HANDLERS.get(name)
        if handler is not None:
            return handler(self, node)
        ins = self.annotated(node)
        if not ins:
            self._follow_parameter(node)
            return
        if name in MIXING:
            return self.opaque(node, f"{name} in {self.where(node)} {MIXING[name]}")
        if name in BINARY:
            return self.binary(node, ins)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node, ins)
        if len(ins) != 1:
            return self.opaque(node, f"{name} in {self.where(node)} combines them with other tensors")
        if name in ELEMENTWISE and all(self._scalar(t) for t in node.inputs if t not in self.ann):
            for out in node.outputs:
                self.ann[out] = ins[0][1]
            return
        if name in RESHAPE:
            return self.reshape(node)
        self.probe(node, ins[0])

    def _follow_parameter(self, node: Node) -> None:
        """A view of a 1-D parameter (``self.gamma.view(1, -1, 1, 1)``) keeps its elements in order: it stands for
        the parameter where it meets the units."""
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return
        tok = node.inputs[0]
        source = self.owner.get(id(self.graph.tensors[tok])) or self.views.get(tok)
        if source is None or self.graph.tensors[tok].dim() != 1 and tok not in self.views:
            return
        n = math.prod(self.graph.shapes[tok])
        out = node.outputs[0]
        if math.prod(self.graph.shapes[out]) == n and sum(d > 1 for d in self.graph.shapes[out]) <= 1:
            self.views[out] = source

    def generic(self, node: Node) -> None:
        ins = self.annotated(node)
        if len(ins) == 1:
            return self.probe(node, ins[0])
        if ins:
            self.opaque(node, f"{node.name} in {self.where(node)} combines them with other tensors")

    def _scalar(self, tok: int) -> bool:
        return math.prod(self.graph.shapes[tok]) == 1

    def binary(self, node: Node, ins) -> None:
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
                return self.opaque(node, f"{node.name} in {self.where(node)} combines tensors with different "
                                         "channel layouts")
        for tok in node.inputs:
            if tok in self.ann:
                continue
            shape = (1,) * (nd - len(self.graph.shapes[tok])) + self.graph.shapes[tok]
            if len(shape) > nd or shape[cdim] == 1:
                continue
            owner = self.owner.get(id(self.graph.tensors[tok])) or self.views.get(tok)
            if owner is not None and not ref.spatial > 1 and math.prod(shape) == shape[cdim]:
                module_name, attr, module = owner
                pdim = 0 if tok in self.views else cdim - (nd - len(self.graph.shapes[tok]))
                for space, offset in ref.offsets():
                    self.spaces.get(space).members.append(Member(module_name, module, offset, ((attr, pdim),)))
            else:
                return self.opaque(node, f"{node.name} in {self.where(node)} mixes them with a per-channel constant")
        self.ann[out] = _Ann(ref.segs, cdim, ref.spatial)

    def cat(self, node: Node, ins) -> None:
        out = node.outputs[0]
        nd = len(self.graph.shapes[out])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % nd
        if len(ins) != len(node.inputs):
            return self.opaque(node, f"{node.name} in {self.where(node)} joins them with tensors prunetool cannot "
                                     "slice")
        cdims = {a.cdim for _, a in ins}
        if len(cdims) != 1 or any(a.spatial != 1 for _, a in ins):
            return self.opaque(node, f"{node.name} in {self.where(node)} joins tensors with different channel "
                                     "layouts")
        cdim = cdims.pop()
        if dim == cdim:
            self.ann[out] = _Ann(tuple(seg for _, a in ins for seg in a.segs), cdim)
        else:
            self.binary(node, ins)

    def reshape(self, node: Node) -> None:
        """A reshape that keeps the channel dimension, merges it with the dimensions after it (a flatten: each unit
        then spans their size), or splits it (into heads: its units become blocks of channels)."""
        tok = node.inputs[0]
        a = self.ann[tok]
        src, dst = self.graph.shapes[tok], self.graph.shapes[node.outputs[0]]
        c, s, out = a.cdim, a.spatial, node.outputs[0]
        lead = math.prod(src[:c])
        prods = [math.prod(dst[:i]) for i in range(len(dst) + 1)]
        for i in [i for i in range(len(dst)) if prods[i] == lead]:
            if dst[i] == src[c]:  # same leading block and same channel size: every channel keeps its place
                self.ann[out] = _Ann(a.segs, i, s)
                return
            for m in range(1, len(src) - c):  # the channel dim merged with the m dims after it
                merged = math.prod(src[c + 1:c + 1 + m])
                if dst[i] == src[c] * merged and math.prod(dst[i + 1:]) == math.prod(src[c + 1 + m:]):
                    self.ann[out] = _Ann(a.segs, i, s * merged)
                    return
            if src[c] % dst[i] == 0 and math.prod(dst[i + 1:]) == math.prod(src[c + 1:]) * (src[c] // dst[i]):
                inner = src[c] // dst[i]  # the channel dim split into dst[i] × inner
                if s % inner == 0:  # each unit still spans whole indices of the outer part
                    self.ann[out] = _Ann(a.segs, i, s // inner)
                    return
                if inner % s == 0 and self._regroupable(tok, a):  # channels become heads
                    self.spaces.regroup(a.segs[0][0], inner // s)
                    self.ann[out] = _Ann(((a.segs[0][0], a.units * s // inner),), i, 1)
                    return
        self.opaque(node, f"{node.name} in {self.where(node)} {src[1:]}→{dst[1:]} splits or mixes channels")

    def _regroupable(self, tok: int, a: _Ann) -> bool:
        return len(a.segs) == 1 and self.spaces.untouched(a.segs[0][0]) and len(self.users.get(tok, [])) == 1

    def align(self, pairs: list[tuple[int, _Ann]]) -> list[_Ann] | None:
        """Annotations of tensors whose channel dims must match unit for unit (attention heads), the finer ones
        regrouped to the coarsest grouping (query heads into the groups that share a key/value head); None when
        they cannot be."""
        if len({a.units * a.spatial for _, a in pairs}) != 1 or any(len(a.segs) != 1 for _, a in pairs):
            return None
        units = min(a.units for _, a in pairs)
        out = []
        for tok, a in pairs:
            if a.units != units:
                factor = a.units // units
                if a.units % units or not self._regroupable(tok, a):
                    return None
                self.spaces.regroup(a.segs[0][0], factor)
                a = _Ann(((a.segs[0][0], units),), a.cdim, a.spatial * factor)
            out.append(a)
        return out

    def f_attention(self, node):
        """``scaled_dot_product_attention(q, k, v)``: heads of q, k, v and the output are one space (with grouped
        keys and values, a unit is one key/value head and the query heads that share it)."""
        b = self.bind(node)
        q, k, v = b.get("query"), b.get("key"), b.get("value")
        toks = [t.id if isinstance(t, Tok) else None for t in (q, k, v)]
        anns = [self.ann.get(t) for t in toks]
        if any(a is None or a.cdim != 1 or len(self.graph.shapes[t]) != 4 for a, t in zip(anns, toks)):
            return self.opaque(node, f"{node.name} in {self.where(node)} is attention whose heads prunetool cannot "
                                     "follow")
        heads = [self.graph.shapes[t][1] for t in toks]
        if b.get("enable_gqa") and heads[0] != heads[1] and heads[0] % heads[1] == 0:
            # grouped-query attention inside the kernel: each key/value head serves heads[0] // heads[1] query heads
            anns = [anns[0]] + [_Ann(a.segs, a.cdim, a.spatial * (heads[0] // heads[1])) for a in anns[1:]]
        aligned = self.align(list(zip(toks, anns)))
        if aligned is None:
            return self.opaque(node, f"{node.name} in {self.where(node)} is attention whose heads prunetool cannot "
                                     "follow")
        for other in aligned[1:]:
            self.spaces.union(aligned[0].segs[0][0], other.segs[0][0])
        self.ann[node.outputs[0]] = _Ann(aligned[0].segs, 1, aligned[0].spatial)

    def f_matmul(self, node):
        b = self.bind(node)
        other, x = b.get("other"), b.get("input")
        if self.owned(other) is not None and len(self.shape(other)) == 2:
            return self.weighted(node, x, other, None, "linear", 1, 0)
        ins = self.annotated(node)
        if len(ins) == 2:  # a batched product of two annotated tensors (attention scores, scores × values)
            (t1, a1), (t2, a2) = ins
            n1, n2 = len(self.graph.shapes[t1]), len(self.graph.shapes[t2])
            nd = len(self.graph.shapes[node.outputs[0]])
            if a1.cdim - n1 == a2.cdim - n2 and a1.cdim < n1 - 2:
                aligned = self.align(ins)
                if aligned is not None:
                    self.spaces.union(aligned[0].segs[0][0], aligned[1].segs[0][0])
                    self.ann[node.outputs[0]] = _Ann(aligned[0].segs, a1.cdim + nd - n1, aligned[0].spatial)
                    return
            return self.opaque(node, f"{node.name} in {self.where(node)} combines them with other tensors")
        self.generic(node)

    def f_split(self, node):
        """``split``/``chunk`` along the channel dim of a fresh projection: the queries, keys and values of a fused
        q|k|v layer become spaces of their own."""
        ins = self.annotated(node)
        if len(ins) != 1:
            return self.generic(node)
        tok, a = ins[0]
        nd = len(self.graph.shapes[tok])
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % nd
        if dim != a.cdim:
            return self.probe(node, ins[0])
        sizes = [self.graph.shapes[o][dim] for o in node.outputs]
        if any(n % a.spatial for n in sizes) or not self._regroupable(tok, a):
            return self.opaque(node, f"{node.name} in {self.where(node)} splits channels that are read elsewhere")
        parts = self.spaces.partition(a.segs[0][0], [n // a.spatial for n in sizes])
        for o, part, n in zip(node.outputs, parts, sizes):
            self.ann[o] = _Ann(((part, n // a.spatial),), dim, a.spatial)

    def probe(self, node: Node, ins) -> None:
        """An op of one annotated tensor that trace has no rule for: rerun it on the traced tensors with one
        channel perturbed at a time. It passes the units through if each perturbation changes, in every output,
        only the block of the perturbed channel's unit along one dimension (a multiple of the unit count)."""
        tok, a = ins
        width = a.units * a.spatial
        original = self.graph.tensors[tok]
        if not original.dtype.is_floating_point:
            return self.opaque(node, f"{node.name} in {self.where(node)} is an op prunetool cannot cut through")

        def run(replacement):
            args = tree_map(lambda v: replacement if isinstance(v, Tok) and v.id == tok
                            else (self.graph.tensors[v.id].clone() if isinstance(v, Tok) else v),
                            (node.args, node.kwargs))
            with torch.no_grad():
                return _tensors(node.op(*args[0], **args[1]))

        try:
            base = run(original.clone())
            gen = torch.Generator().manual_seed(len(self.graph.nodes))
            channels = sorted({0, width - 1, int(torch.randint(width, (1,), generator=gen))})
            found: list[set | None] = [None] * len(base)
            for ch in channels:
                bumped = original.clone()
                bumped.select(a.cdim, ch).add_(1.0 + bumped.select(a.cdim, ch).abs())
                moved = run(bumped)
                if len(moved) != len(base):
                    raise ValueError
                for i, (b0, b1) in enumerate(zip(base, moved)):
                    blocks = _changed_blocks(b0, b1, ch // a.spatial, a.units)
                    if blocks is None:
                        continue  # nothing changed: this channel says nothing about where units go
                    found[i] = blocks if found[i] is None else found[i] & blocks
                    if not found[i]:
                        raise ValueError
            if any(f is None for f in found):
                raise ValueError
        except Exception:
            return self.opaque(node, f"{node.name} in {self.where(node)} mixes, splits or reorders channels")
        for out, blocks in zip(node.outputs, found):
            d, spatial = min(blocks, key=lambda b: (b[1] != a.spatial, b[0]))  # keep the element layout if possible
            self.ann[out] = _Ann(a.segs, d, spatial)

    def run(self, input_tokens: list[int], output_tokens: list[int]) -> None:
        for tok in input_tokens:
            shape = self.graph.shapes[tok]
            if len(shape) >= 2 and self.graph.tensors[tok].dtype.is_floating_point:
                self.ann[tok] = _Ann(((self.spaces.new(shape[1], "they are the model inputs"), shape[1]),), 1)
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


def _changed_blocks(before: torch.Tensor, after: torch.Tensor, unit: int, units: int) -> set | None:
    """The (dimension, indices per unit) along which every changed entry lies in block ``unit`` of ``units`` equal
    blocks; None when nothing changed. Raises ValueError when the shapes differ."""
    if before.shape != after.shape:
        raise ValueError
    changed = before != after
    if before.dtype.is_floating_point:
        changed &= ~(before.isnan() & after.isnan())
    if not changed.any():
        return None
    nz = changed.nonzero()
    out = set()
    for d in range(1, before.dim()):
        size = before.shape[d]
        if size % units:
            continue
        per = size // units
        if bool(((nz[:, d] // per) == unit).all()):
            out.add((d, per))
    return out


HANDLERS = {
    "scaled_dot_product_attention": _Analysis.f_attention, "split": _Analysis.f_split, "chunk": _Analysis.f_split,
    "linear": _Analysis.f_linear, "conv1d": _Analysis.f_conv, "conv2d": _Analysis.f_conv,
    "conv3d": _Analysis.f_conv, "addmm": _Analysis.f_addmm, "matmul": _Analysis.f_matmul,
    "embedding": _Analysis.f_embedding, "batch_norm": _Analysis.f_norm, "instance_norm": _Analysis.f_norm,
    "group_norm": _Analysis.f_group_norm, "prelu": _Analysis.f_prelu,
}


def trace(model: nn.Module, example, output_key: str | None = None) -> Trace:
    """Find the prunable groups of ``model`` from one forward pass on ``example`` (a tensor, or a dict of keyword
    tensors); ``output_key`` picks the logits in a structured output (:func:`prunetool.task.logits`)."""
    was_training = model.training
    model.eval()
    try:
        graph, input_tokens, output_tokens, output_shape = record(model, example, output_key)
    finally:
        model.train(was_training)
    analysis = _Analysis(graph, model)
    analysis.run(input_tokens, output_tokens)
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
        producers = list({(p.name, p.weight, p.offset): p for p in space.producers}.values())
        groups.append(Group(producers[0].name, producers, space.size, _unique(space.members),
                            _unique(space.consumers), space.blocks))
    order = analysis.order
    groups.sort(key=lambda g: min(order[p.name] for p in g.producers))
    shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else ()
    n = len(example) if isinstance(example, torch.Tensor) else len(next(iter(example.values())))
    produced = [t for node in graph.nodes for t in node.outputs]
    activations = sum(math.prod(graph.shapes[t]) * graph.tensors[t].element_size() for t in produced) // max(1, n)
    return Trace(groups, protected, shape, output_shape[1:], order, heads, activations)


def _unique(items: list) -> list:
    seen, out = set(), []
    for item in items:
        key = (item.name, item.offset, getattr(item, "tensors", None))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
