"""The channel analysis of a recorded forward pass: one handler per kind of call says how the call's inputs'
channel structure becomes its outputs' (passed through, merged, split, regrouped into heads), which module
consumes, produces or carries units, and which spaces it protects, with the reason."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import layers, ops
from .channels import Channels, Spaces
from .groups import Consumer, Member, Producer
from .record import Graph, Node, Ref, _tensors


# Signatures of the other calls the analysis reads by name (torch's own parameter names); a weighted call's is
# its op's (prunetool.ops).
SIGNATURES = {
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "group_norm": ("input", "num_groups", "weight", "bias"),
    "prelu": ("input", "weight"),
    "embedding": ("input", "weight"),
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
RESHAPE = {"flatten", "unflatten", "view", "reshape"}
MIXING = {"layer_norm": "normalises across channels", "rms_norm": "normalises across channels",
          "multi_head_attention_forward": "is attention with packed projections prunetool does not cut"}


class Analysis:
    """One pass over a recorded graph: ``channels`` maps each recorded tensor to its :class:`Channels`,
    ``spaces`` collects the unit spaces with their producers, members, consumers and protection reasons."""

    def __init__(self, graph: Graph, model: nn.Module):
        self.graph = graph
        self.spaces = Spaces()
        self.channels: dict[int, Channels] = {}
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
            elif node.name in SIGNATURES or ops.of_call(node.name):
                owners = {id(o[2]) for k, v in self.bind(node).items() if k != "input" and (o := self.owned(v))}
                for key in owners:
                    self.calls[key] = self.calls.get(key, 0) + 1
        self.order: dict[str, int] = {}
        self.views: dict[int, tuple[str, str, nn.Module]] = {}  # token → the 1-D parameter it is a view of
        self.batch: int | None = None  # the traced batch size (run() reads it off the inputs)

    # helpers
    def bind(self, node: Node) -> dict:
        op = ops.of_call(node.name)
        if op is not None:
            return op.bind(node.args, node.kwargs)
        return {**dict(zip(SIGNATURES.get(node.name, ()), node.args)), **node.kwargs}

    def owned(self, x) -> tuple[str, str, nn.Module] | None:
        return self.owner.get(id(self.graph.tensors[x.id])) if isinstance(x, Ref) else None

    def shape(self, x) -> tuple[int, ...]:
        return self.graph.shapes[x.id] if isinstance(x, Ref) else ()

    def fresh(self, tok: int, reason: str) -> None:
        shape = self.graph.shapes[tok]
        if len(shape) >= 2:
            cdim = 1 if len(shape) == 4 else len(shape) - 1
            self.channels[tok] = Channels(((self.spaces.new(shape[cdim], reason), shape[cdim]),), cdim)

    def opaque(self, node: Node, reason: str) -> None:
        for tok in node.inputs:
            self.spaces.protect(self.channels.get(tok), reason)
        for tok in node.outputs:
            self.fresh(tok, reason)

    def annotated(self, node: Node) -> list[tuple[int, Channels]]:
        return [(t, self.channels[t]) for t in node.inputs if t in self.channels]

    def where(self, node: Node) -> str:
        """The module that made the call, with its type: ``blocks.0.norm (LayerNorm)``."""
        if not node.where:
            return "the model's forward"
        return f"{node.where} ({type(self.modules[node.where]).__name__})"

    # producers and consumers
    def weighted(self, node: Node, op: ops.Op, x, weight, bias, padded: bool = False):
        """A call ``op`` that multiplies ``x`` by a module's own ``weight``: consumer of x's units, producer of its
        outputs."""
        own = self.owned(weight)
        if own is None or not isinstance(self.graph.tensors[weight.id], nn.Parameter):
            return self.opaque(node, f"{node.name} in {self.where(node)} uses a weight computed in its forward")
        name, attr, module = own
        self.order.setdefault(name, len(self.order))
        bias_own = self.owned(bias)
        bias_attr = bias_own[1] if bias_own is not None and bias_own[2] is module else None
        uses = self.calls.get(id(module), 1)
        a = self.channels.get(x.id) if isinstance(x, Ref) else None
        out = node.outputs[0]
        if a is not None:
            if uses > 1:
                self.spaces.protect(a, f"{name} is called {uses} times")
            elif not _reads(op, a, len(self.shape(x))):
                self.spaces.protect(a, f"{name} ({node.name}) reads them interleaved with each other (a permute and "
                                       "a reshape before it stride them)" if a.repeat > 1 else
                                    f"{name} ({node.name}) does not read them as its input channels")
            else:
                for space, offset in a.offsets():
                    self.spaces.get(space).consumers.append(Consumer(
                        name, module, offset, a.spatial, self._norm_after(out), attr, op.in_dim, op, padded, bias_attr,
                        a.repeat, a.units * a.spatial))
        units = self.graph.tensors[weight.id].shape[op.out_dim]
        space = self.spaces.new(units, f"{name} is called {uses} times" if uses > 1 else None)
        self.spaces.spaces[space].producers.append(Producer(name, module, attr, bias_attr, op.out_dim))
        self.channels[out] = Channels(((space, units),), op.channel_dim(len(self.graph.shapes[out])))
        return space

    def f_weighted(self, node):
        """A registered weighted call (``linear``, ``addmm``, one of a user's :mod:`prunetool.ops`)."""
        op, b = ops.of_call(node.name), self.bind(node)
        self.weighted(node, op, b.get(op.input), b.get(op.weight), b.get(op.bias) if op.bias else None)

    def f_conv(self, node):
        b = self.bind(node)
        x, weight = b.get("input"), b.get("weight")
        groups = b.get("groups", 1)
        padding = b.get("padding", 0)
        padded = padding == "same" or any(p != 0 for p in (padding if isinstance(padding, (tuple, list))
                                                              else (padding,)) if not isinstance(p, str))
        w = self.graph.tensors[weight.id] if isinstance(weight, Ref) else None
        a = self.channels.get(x.id) if isinstance(x, Ref) else None
        own = self.owned(weight)
        if w is not None and own is not None and groups > 1 and w.shape[0] == groups == self.shape(x)[1]:
            # depthwise: one filter per channel, cut with the units it filters
            name, attr, module = own
            bias_own = self.owned(b.get("bias"))
            if a is None or a.dim != 1 or not a.plain or self.calls.get(id(module), 1) > 1:
                return self.opaque(node, f"depthwise conv {name} cannot be cut here")
            tensors = ((attr, 0),) + (((bias_own[1], 0),) if bias_own is not None else ())
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(name, module, offset, tensors))
            self.channels[node.outputs[0]] = a
            return
        if groups > 1 and a is not None:
            self.spaces.protect(a, f"read by grouped conv {own[0] if own else self.where(node)}")
            a = None
            x = None
        space = self.weighted(node, ops.CONV, x, weight, b.get("bias"), padded)
        if space is not None:
            self.spaces.spaces[space].blocks = groups

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
        self.channels[out] = Channels(((space, w.shape[1]),), len(self.graph.shapes[out]) - 1)

    # members
    def f_norm(self, node):
        b = self.bind(node)
        x = b.get("input")
        a = self.channels.get(x.id) if isinstance(x, Ref) else None
        if a is None:
            return
        owned = [(k, self.owned(v)) for k, v in b.items() if k != "input" and self.owned(v) is not None]
        modules = {id(o[2]) for _, o in owned}
        if len(modules) > 1 or a.dim != 1 or not a.plain or any(self.calls.get(m, 1) > 1 for m in modules):
            return self.opaque(node, f"{node.name} in {self.where(node)} cannot be cut here")
        if owned:
            module = owned[0][1][2]
            tensors = tuple((o[1], 0) for _, o in owned)
            for space, offset in a.offsets():
                self.spaces.get(space).members.append(Member(owned[0][1][0], module, offset, tensors))
        self.channels[node.outputs[0]] = a

    def f_group_norm(self, node):
        b = self.bind(node)
        x = b.get("input")
        a = self.channels.get(x.id) if isinstance(x, Ref) else None
        if a is not None and b.get("num_groups") == a.units and a.dim == 1:
            return self.f_norm(node)
        self.opaque(node, f"group_norm in {self.where(node)} normalises across channels")

    def f_prelu(self, node):
        b = self.bind(node)
        own = self.owned(b.get("weight"))
        x = b.get("input")
        a = self.channels.get(x.id) if isinstance(x, Ref) else None
        if a is None:
            return
        if own is None or self.graph.tensors[b["weight"].id].numel() == 1:
            self.channels[node.outputs[0]] = a
            return
        if a.dim != 1 or not a.plain:
            return self.opaque(node, f"PReLU {own[0]} cannot be cut here")
        for space, offset in a.offsets():
            self.spaces.get(space).members.append(Member(own[0], own[2], offset, ((own[1], 0),)))
        self.channels[node.outputs[0]] = a

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
        args = [Ref(t) for t in node.inputs]
        weight = getattr(node.op, kind.weight)
        wtok = self.graph.token(weight)
        bias = getattr(node.op, kind.bias) if kind.bias else None
        btok = Ref(self.graph.token(bias)) if isinstance(bias, torch.Tensor) else None
        self.weighted(node, kind.op, args[0] if args else None, Ref(wtok), btok)

    # functions
    def function(self, node: Node) -> None:
        name = node.name
        handler = HANDLERS.get(name) or (Analysis.f_weighted if ops.of_call(name) else None)
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
        if name == "type_as" and node.inputs and node.inputs[0] in self.channels:
            ins = ins[:1]  # the other tensor gives only the dtype
        if len(ins) != 1:
            return self.opaque(node, f"{name} in {self.where(node)} combines them with other tensors")
        if name in ELEMENTWISE and all(self._scalar(t) for t in node.inputs if t not in self.channels):
            for out in node.outputs:
                self.channels[out] = ins[0][1]
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
        cdim = ref.dim + nd - len(self.graph.shapes[ref_tok])
        for tok, a in ins[1:]:
            same = (a.dim + nd - len(self.graph.shapes[tok]) == cdim and a.spatial == ref.spatial
                    and a.repeat == ref.repeat)
            if same and [n for _, n in a.parts] == [n for _, n in ref.parts]:
                for (s1, _), (s2, _) in zip(ref.parts, a.parts):
                    self.spaces.union(s1, s2)
            elif same and a.units == 1:
                continue
            else:
                return self.opaque(node, f"{node.name} in {self.where(node)} combines tensors with different "
                                         "channel layouts")
        for tok in node.inputs:
            if tok in self.channels:
                continue
            shape = (1,) * (nd - len(self.graph.shapes[tok])) + self.graph.shapes[tok]
            if len(shape) > nd or shape[cdim] == 1:
                continue
            owner = self.owner.get(id(self.graph.tensors[tok])) or self.views.get(tok)
            if owner is not None and ref.plain and math.prod(shape) == shape[cdim]:
                module_name, attr, module = owner
                pdim = 0 if tok in self.views else cdim - (nd - len(self.graph.shapes[tok]))
                for space, offset in ref.offsets():
                    self.spaces.get(space).members.append(Member(module_name, module, offset, ((attr, pdim),)))
            else:
                return self.opaque(node, f"{node.name} in {self.where(node)} mixes them with a per-channel constant")
        self.channels[out] = Channels(ref.parts, cdim, ref.spatial, ref.repeat)

    def cat(self, node: Node, ins) -> None:
        out = node.outputs[0]
        nd = len(self.graph.shapes[out])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % nd
        empty = [t for t in node.inputs if t not in self.channels and self.graph.shapes[t] == (0,)]
        if empty and len(ins) == 1 and len(node.inputs) == len(empty) + 1:  # a cache's empty start: x itself
            self.channels[out] = ins[0][1]
            return
        if len(ins) != len(node.inputs):
            return self.opaque(node, f"{node.name} in {self.where(node)} joins them with tensors prunetool cannot "
                                     "slice")
        cdims = {a.dim for _, a in ins}
        if len(cdims) != 1 or any(not a.plain for _, a in ins):
            return self.opaque(node, f"{node.name} in {self.where(node)} joins tensors with different channel "
                                     "layouts")
        cdim = cdims.pop()
        if dim == cdim:
            self.channels[out] = Channels(tuple(seg for _, a in ins for seg in a.parts), cdim)
        else:
            self.binary(node, ins)

    def reshape(self, node: Node) -> None:
        """A reshape that keeps the channel dimension, merges it with the dimensions after it (a flatten: each unit
        then spans their size) or before it (positions flattened in front of the channels, after a permute: the
        units' block repeats), splits a repeated block back, or splits the channel dimension (into heads: its
        units become blocks of channels)."""
        tok = node.inputs[0]
        a = self.channels[tok]
        src, dst = self.graph.shapes[tok], self.graph.shapes[node.outputs[0]]
        c, s, out = a.dim, a.spatial, node.outputs[0]
        period = a.units * s
        prods = [math.prod(dst[:i]) for i in range(len(dst) + 1)]
        for j in range(c - 1, 0, -1):  # src[j:c] merged in front of the channels (never the batch dimension)
            lead = math.prod(src[:j])
            for i in [i for i in range(1, len(dst)) if prods[i] == lead]:
                for m in range(len(src) - c):  # and the m dims after them
                    if dst[i] == math.prod(src[j:c + 1 + m]) and math.prod(dst[i + 1:]) == math.prod(src[c + 1 + m:]):
                        self.channels[out] = Channels(a.parts, i, s * math.prod(src[c + 1:c + 1 + m]),
                                                      a.repeat * math.prod(src[j:c]))
                        return
        lead = math.prod(src[:c])
        for i in [i for i in range(len(dst)) if prods[i] == lead]:
            if dst[i] == src[c]:  # same leading block and same channel size: every channel keeps its place
                self.channels[out] = Channels(a.parts, i, s, a.repeat)
                return
            for m in range(1, len(src) - c):  # the channel dim merged with the m dims after it
                merged = math.prod(src[c + 1:c + 1 + m])
                if dst[i] == src[c] * merged and math.prod(dst[i + 1:]) == math.prod(src[c + 1 + m:]):
                    self.channels[out] = Channels(a.parts, i, s * merged, a.repeat)
                    return
            if a.repeat > 1:  # the repeated block split back out: (repeat · period) → repeat × period
                if dst[i] == a.repeat and i + 1 < len(dst) and dst[i + 1] == period and \
                        math.prod(dst[i + 2:]) == math.prod(src[c + 1:]):
                    self.channels[out] = Channels(a.parts, i + 1, s)
                    return
                continue
            if src[c] % dst[i] == 0 and math.prod(dst[i + 1:]) == math.prod(src[c + 1:]) * (src[c] // dst[i]):
                inner = src[c] // dst[i]  # the channel dim split into dst[i] × inner
                if s % inner == 0:  # each unit still spans whole indices of the outer part
                    self.channels[out] = Channels(a.parts, i, s // inner)
                    return
                if inner % s == 0 and self._regroupable(tok, a):  # channels become heads
                    self.spaces.regroup(a.parts[0][0], inner // s)
                    self.channels[out] = Channels(((a.parts[0][0], a.units * s // inner),), i, 1)
                    return
        self.opaque(node, f"{node.name} in {self.where(node)} {src[1:]}→{dst[1:]} splits or mixes channels")

    def _regroupable(self, tok: int, a: Channels) -> bool:
        return len(a.parts) == 1 and self.spaces.untouched(a.parts[0][0]) and len(self.users.get(tok, [])) == 1

    def align(self, pairs: list[tuple[int, Channels]]) -> list[Channels] | None:
        """Annotations of tensors whose channel dims must match unit for unit (attention heads), the finer ones
        regrouped to the coarsest grouping (query heads into the groups that share a key/value head); None when
        they cannot be."""
        if len({a.units * a.spatial for _, a in pairs}) != 1 or any(len(a.parts) != 1 or a.repeat > 1
                                                                     for _, a in pairs):
            return None
        units = min(a.units for _, a in pairs)
        out = []
        for tok, a in pairs:
            if a.units != units:
                factor = a.units // units
                if a.units % units or not self._regroupable(tok, a):
                    return None
                self.spaces.regroup(a.parts[0][0], factor)
                a = Channels(((a.parts[0][0], units),), a.dim, a.spatial * factor)
            out.append(a)
        return out

    def f_attention(self, node):
        """``scaled_dot_product_attention(q, k, v)``: heads of q, k, v and the output are one space (with grouped
        keys and values, a unit is one key/value head and the query heads that share it)."""
        b = self.bind(node)
        q, k, v = b.get("query"), b.get("key"), b.get("value")
        toks = [t.id if isinstance(t, Ref) else None for t in (q, k, v)]
        anns = [self.channels.get(t) for t in toks]
        if any(a is None or a.dim != 1 or len(self.graph.shapes[t]) != 4 for a, t in zip(anns, toks)):
            return self.opaque(node, f"{node.name} in {self.where(node)} is attention whose heads prunetool cannot "
                                     "follow")
        heads = [self.graph.shapes[t][1] for t in toks]
        if b.get("enable_gqa") and heads[0] != heads[1] and heads[0] % heads[1] == 0:
            # grouped-query attention inside the kernel: each key/value head serves heads[0] // heads[1] query heads
            anns = [anns[0]] + [Channels(a.parts, a.dim, a.spatial * (heads[0] // heads[1]), a.repeat)
                                for a in anns[1:]]
        aligned = self.align(list(zip(toks, anns)))
        mask = b.get("attn_mask")
        bias = self.channels.get(mask.id) if isinstance(mask, Ref) else None
        if bias is not None and (len(self.shape(mask)) != 4 or self.shape(mask)[1] == 1):
            bias = None  # one mask broadcast over the heads: nothing of theirs to cut
        if aligned is not None and bias is not None:  # a per-head bias (T5's relative positions): cut with the heads
            ok = bias.dim == 1 and bias.plain and len(bias.parts) == 1 and bias.units == aligned[0].units and \
                aligned[0].spatial == 1
            aligned = aligned + [bias] if ok else None
        if aligned is None:
            return self.opaque(node, f"{node.name} in {self.where(node)} is attention whose heads prunetool cannot "
                                     "follow")
        for other in aligned[1:]:
            self.spaces.union(aligned[0].parts[0][0], other.parts[0][0])
        self.channels[node.outputs[0]] = Channels(aligned[0].parts, 1, aligned[0].spatial)

    def f_matmul(self, node):
        b = self.bind(node)
        other, x = b.get("other"), b.get("input")
        if self.owned(other) is not None and len(self.shape(other)) == 2:
            return self.weighted(node, ops.MATMUL, x, other, None)
        ins = self.annotated(node)
        if len(ins) == 2:  # a batched product of two annotated tensors (attention scores, scores × values)
            (t1, a1), (t2, a2) = ins
            n1, n2 = len(self.graph.shapes[t1]), len(self.graph.shapes[t2])
            nd = len(self.graph.shapes[node.outputs[0]])
            if a1.dim - n1 == a2.dim - n2 and a1.dim < n1 - 2:
                aligned = self.align(ins)
                if aligned is not None:
                    self.spaces.union(aligned[0].parts[0][0], aligned[1].parts[0][0])
                    self.channels[node.outputs[0]] = Channels(aligned[0].parts, a1.dim + nd - n1, aligned[0].spatial)
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
        if dim != a.dim:
            return self.probe(node, ins[0])
        sizes = [self.graph.shapes[o][dim] for o in node.outputs]
        if a.repeat > 1 or any(n % a.spatial for n in sizes) or not self._regroupable(tok, a):
            return self.opaque(node, f"{node.name} in {self.where(node)} splits channels that are read elsewhere")
        parts = self.spaces.partition(a.parts[0][0], [n // a.spatial for n in sizes])
        for o, part, n in zip(node.outputs, parts, sizes):
            self.channels[o] = Channels(((part, n // a.spatial),), dim, a.spatial)

    def probe(self, node: Node, ins) -> None:
        """An op of one annotated tensor that trace has no rule for: rerun it on the traced tensors with one
        channel perturbed at a time. It passes the units through if each perturbation changes, in every output,
        only the block of the perturbed channel's unit along one dimension (a multiple of the unit count)."""
        tok, a = ins
        width = a.units * a.spatial
        original = self.graph.tensors[tok]
        if not original.dtype.is_floating_point or a.repeat > 1:
            return self.opaque(node, f"{node.name} in {self.where(node)} is an op prunetool cannot cut through")

        def run(replacement):
            args = tree_map(lambda v: replacement if isinstance(v, Ref) and v.id == tok
                            else (self.graph.tensors[v.id].clone() if isinstance(v, Ref) else v),
                            (node.args, node.kwargs))
            with torch.no_grad():
                return _tensors(node.op(*args[0], **args[1]))

        try:
            base = run(original.clone())
            gen = torch.Generator().manual_seed(len(self.graph.nodes))
            channels = sorted({0, width - 1, int(torch.randint(width, (1,), generator=gen))})
            found: list[set | None] = [None] * len(base)
            for i, b0 in enumerate(base):  # an empty slice (Phi-3's rotary part when it is the whole head) holds none
                if b0.numel() == 0 and b0.dim() == original.dim() and b0.shape[a.dim] == original.shape[a.dim]:
                    found[i] = {(a.dim, a.spatial)}
            for ch in channels:
                bumped = original.clone()
                bumped.select(a.dim, ch).add_(1.0 + bumped.select(a.dim, ch).abs())
                moved = run(bumped)
                if len(moved) != len(base):
                    raise ValueError
                for i, (b0, b1) in enumerate(zip(base, moved)):
                    unbatched = b0.dim() > 0 and b0.shape[0] != self.batch
                    blocks = _changed_blocks(b0, b1, ch // a.spatial, a.units, 0 if unbatched else 1)
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
            self.channels[out] = Channels(a.parts, d, spatial)

    def run(self, input_tokens: list[int], output_tokens: list[int]) -> None:
        self.batch = next((self.graph.shapes[t][0] for t in input_tokens if self.graph.shapes[t]), None)
        for tok in input_tokens:
            shape = self.graph.shapes[tok]
            if len(shape) >= 2 and self.graph.tensors[tok].dtype.is_floating_point:
                self.channels[tok] = Channels(((self.spaces.new(shape[1], "they are the model inputs"), shape[1]),), 1)
        for node in self.graph.nodes:
            if node.kind == "module":
                self.module(node)
            else:
                self.function(node)
        self.output_roots = set()
        for tok in output_tokens:
            self.spaces.protect(self.channels.get(tok), "its units are model outputs")
            for space, _ in (self.channels[tok].parts if tok in self.channels else ()):
                self.output_roots.add(space)


def _reads(op: ops.Op, a: Channels, ndim: int) -> bool:
    """Whether ``op`` reads the units of ``a`` as its input channels (an op of a user's written before layouts
    repeated takes no ``repeat``: it reads none that are)."""
    if a.repeat == 1:
        return op.reads(a.dim, a.spatial, ndim)
    try:
        return op.reads(a.dim, a.spatial, ndim, repeat=a.repeat)
    except TypeError:
        return False


def _changed_blocks(before: torch.Tensor, after: torch.Tensor, unit: int, units: int, first: int = 1) -> set | None:
    """The (dimension, indices per unit) along which every changed entry lies in block ``unit`` of ``units`` equal
    blocks, from dimension ``first`` on (0 for a tensor without a batch dimension: T5's position bias, built from
    the sequence length, before it meets the batch); None when nothing changed. Raises ValueError when the shapes
    differ."""
    if before.shape != after.shape:
        raise ValueError
    changed = before != after
    if before.dtype.is_floating_point:
        changed &= ~(before.isnan() & after.isnan())
    if not changed.any():
        return None
    nz = changed.nonzero()
    out = set()
    for d in range(first, before.dim()):
        size = before.shape[d]
        if size % units:
            continue
        per = size // units
        if bool(((nz[:, d] // per) == unit).all()):
            out.add((d, per))
    return out


HANDLERS = {
    "scaled_dot_product_attention": Analysis.f_attention, "split": Analysis.f_split, "chunk": Analysis.f_split,
    "conv1d": Analysis.f_conv, "conv2d": Analysis.f_conv, "conv3d": Analysis.f_conv,
    "matmul": Analysis.f_matmul,
    "embedding": Analysis.f_embedding, "batch_norm": Analysis.f_norm, "instance_norm": Analysis.f_norm,
    "group_norm": Analysis.f_group_norm, "prelu": Analysis.f_prelu,
}
