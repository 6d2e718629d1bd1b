"""The layer-type registry: how each kind of layer holds its units, and how its attributes follow a cut.

trace finds *what* a layer does from the calls it makes (a module whose own weight feeds ``linear`` or
``conv2d`` is a producer and a consumer, whatever its class or children). This registry says the rest, per
module type, looked up along the MRO so that subclasses (timm's ``BatchNormAct2d``, a ``Conv2d`` that pads in
its own ``forward``) get their base's entry:

- ``sync``: after cut or load has sliced a module's tensors, set the attributes that record widths
  (``out_features``, ``in_channels``, ``groups`` of a depthwise conv, ``num_features``, ...);
- ``atomic`` kinds are traced as one call (their ``forward`` is not looked into): a layer whose arithmetic
  trace cannot see, such as an ``einsum`` with its own weight, registers one with its weight layout.

A layer of your own::

    from prunetool import layers

    class MyLinear(nn.Module):          # y = x @ self.w.T + self.b, written with einsum
        ...

    layers.register(MyLinear, layers.Atomic(layout="linear", weight="w", bias="b",
                                            widths={"n_out": "out", "n_in": "in"}))

``layout`` is ``"linear"`` (weight ``out × in``, reads the last dimension) or ``"transposed"`` (weight
``in × out``, as Hugging Face's GPT-2 ``Conv1D``); ``widths`` names the attributes that record the output and
input widths.

A class can also be registered by its dotted name (``"transformers.models.gpt2.modeling_gpt2.GPT2Attention"``),
so that a kind for a library's layer costs nothing until that library is imported. An attention block that
records its head count (GPT-2's ``split_size``, BERT's ``all_head_size``) gets an :class:`AttentionKind`: its
``follow`` sets them from its projections after a cut inside it.

``torch.nn.MultiheadAttention`` computes its head size from the model width, so heads cannot be removed from it
as it is: :func:`prepare` gives each one the class :class:`MultiheadAttention`, the same module (same tensors,
same state_dict keys) whose forward also runs with fewer heads.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, precision

# Attribute names that, by convention, record a width. A module type without an entry in the registry has
# those of its attributes updated that held the old width of a tensor dimension the cut changed.
WIDTH_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_features", "num_channels",
               "embedding_dim", "embed_dim", "hidden_dim", "hidden_size", "dim", "nf", "nx")


class Kind:
    """Default behaviour: update conventional width attributes that held an old size.

    ``op`` is the :class:`prunetool.ops.Op` of the module's own weighted call (None: the module makes none that
    prunetool reads as its own); ``adds_bias``: a ``bias`` attribute given to it is used by that call;
    ``fused``: it may take a fused fast path that hides its calls when autograd is off; ``recalibrated``: its
    running statistics are re-estimated after a cut (BatchNorm); ``embedding``: a lookup table of token ids.
    A kind for a subclass of a torch layer should subclass that layer's kind (``LinearKind``, ``ConvKind``, ...)
    to keep its op and these answers."""

    atomic = False
    op: ops.Op | None = None
    adds_bias = False
    fused = False
    recalibrated = False
    embedding = False

    def sync(self, module: nn.Module, changed: dict[int, int]) -> None:
        """``changed`` maps each old size of a sliced tensor dimension to its new size."""
        for attr in WIDTH_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in changed:
                setattr(module, attr, changed[value])

    def follow(self, module: nn.Module) -> None:
        """Called on every module that holds a layer whose tensors were sliced, after those layers synced."""


class LinearKind(Kind):
    op, adds_bias = ops.LINEAR, True

    def sync(self, module, changed):
        module.out_features, module.in_features = module.weight.shape


class ConvKind(Kind):
    op, adds_bias = ops.CONV, True

    def sync(self, module, changed):
        out = module.weight.shape[0]
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if depthwise and out != module.out_channels:
            module.groups = module.in_channels = module.out_channels = out
        else:
            module.out_channels = out
            module.in_channels = module.weight.shape[1] * module.groups


class NormKind(Kind):
    """BatchNorm, InstanceNorm (and subclasses that also activate, such as timm's ``BatchNormAct2d``)."""

    def sync(self, module, changed):
        for attr in ("weight", "running_mean"):
            t = getattr(module, attr, None)
            if t is not None:
                module.num_features = t.shape[0]
                return


class BatchNormKind(NormKind):
    recalibrated = True


class GroupNormKind(Kind):
    def sync(self, module, changed):
        if module.weight is not None:
            old = module.num_channels
            module.num_channels = module.weight.shape[0]
            if module.num_groups == old:  # one channel per group: stays so
                module.num_groups = module.num_channels


class PReLUKind(Kind):
    def sync(self, module, changed):
        module.num_parameters = module.weight.numel()


class EmbeddingKind(Kind):
    embedding = True

    def sync(self, module, changed):
        module.num_embeddings, module.embedding_dim = module.weight.shape


class LayerNormKind(Kind):
    def sync(self, module, changed):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)


class Atomic(Kind):
    """A layer traced as one call: ``layout`` ``"linear"`` (weight out × in) or ``"transposed"`` (in × out)."""

    atomic = True

    def __init__(self, layout: str = "linear", weight: str = "weight", bias: str | None = "bias",
                 widths: dict[str, str] | None = None):
        if layout not in ("linear", "transposed"):
            raise ValueError(f"layout must be 'linear' or 'transposed', not {layout!r}")
        self.layout, self.weight, self.bias = layout, weight, bias
        self.widths = widths or {}
        self.op = ops.ModuleOp(transposed=layout == "transposed")

    @property
    def out_dim(self) -> int:
        return self.op.out_dim

    def sync(self, module, changed):
        w = getattr(module, self.weight)
        sizes = {"out": w.shape[self.out_dim], "in": w.shape[1 - self.out_dim]}
        for attr, which in self.widths.items():
            setattr(module, attr, sizes[which])


class AttentionKind(Kind):
    """An attention block whose forward reads its head count from attributes: after a cut inside it, ``heads``
    (attribute names) are set to the query projection's width over the head size, ``widths`` to that width.

    ``query`` names the child projection; with ``fused`` parts (GPT-2's q|k|v ``c_attn``) its width is
    divided by that. ``head_size`` is the attribute holding the size of one head."""

    def __init__(self, query: str, head_size: str, heads: tuple[str, ...] = (), widths: tuple[str, ...] = (),
                 fused: int = 1, key: str | None = None, kv_heads: tuple[str, ...] = ()):
        self.query, self.head_size, self.heads, self.widths = query, head_size, heads, widths
        self.parts, self.key, self.kv_heads = fused, key, kv_heads  # not ``fused``: Kind.fused is the fast path

    def follow(self, module):
        size = getattr(module, self.head_size, None)
        proj = getattr(module, self.query, None)
        if not isinstance(size, int) or proj is None:
            return
        width = _out_width(proj) // self.parts
        key = getattr(module, self.key, None) if self.key else None
        values = {**{a: width for a in self.widths}, **{a: width // size for a in self.heads},
                  **{a: _out_width(key) // size for a in self.kv_heads if key is not None}}
        for attr, value in values.items():
            if isinstance(getattr(module, attr, None), int):  # only what the module records
                setattr(module, attr, value)


def _out_width(layer: nn.Module) -> int:
    if is_factored(layer):  # lowrank's product: the second factor's outputs are the layer's
        layer = layer[1]
    op = kind_of(layer).op
    return layer.weight.shape[op.out_dim if op is not None else 0]


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that also runs with heads removed (``in_proj_weight`` of 3·h·d rows for h heads of
    size ``head_dim``, the model width unchanged). Self-attention computes q, k and v in one call on the packed
    projection, which is what lets trace see its heads; anything it does not handle goes to the parent's forward
    while no head has been removed."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        inner = self.in_proj_weight.shape[0] // 3 if self.in_proj_weight is not None else self.embed_dim
        plain = self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
        if not plain or (attn_mask is not None and attn_mask.dim() == 3) or query.dim() != 3:
            if inner != self.embed_dim:
                raise RuntimeError("this MultiheadAttention has heads removed; it supports batched inputs, 2-D "
                                   "masks, no bias_k/bias_v and no add_zero_attn")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, t, s = query.shape[0], query.shape[1], key.shape[1]
        heads = inner // self.head_dim
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w, b = self.in_proj_weight.chunk(3), (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                                                  else (None,) * 3)
            q, k, v = F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        q = q.reshape(n, t, heads, self.head_dim).transpose(1, 2)
        k = k.reshape(n, s, heads, self.head_dim).transpose(1, 2)
        v = v.reshape(n, s, heads, self.head_dim).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, t, inner))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights


def _additive_mask(attn_mask, key_padding_mask, dtype):
    """``nn.MultiheadAttention``'s masks (True or -inf: not attended) as one additive float mask."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, "padding")):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        if shape == "padding":
            m = m[:, None, None, :]
        mask = m if mask is None else mask + m
    return mask


class MultiheadAttentionKind(Kind):
    fused = True

    def sync(self, module, changed):
        module.num_heads = module.in_proj_weight.shape[0] // 3 // module.head_dim


class FusedKind(Kind):
    """A torch layer with a fused inference kernel (taken without autograd) that hides the calls it makes."""

    fused = True


class EncoderLayerKind(FusedKind):
    """``nn.TransformerEncoderLayer``: its fused inference kernel assumes every head; with heads removed it takes
    the module path (the flag it checks is used for nothing else)."""

    def follow(self, module):
        attn = module.self_attn
        if attn.in_proj_weight is not None and attn.in_proj_weight.shape[0] != 3 * attn.embed_dim:
            module.activation_relu_or_gelu = 0


class TransposedLinearKind(Kind):
    """A linear layer with its weight stored in × out (Hugging Face's ``Conv1D``)."""

    op = ops.ADDMM

    def sync(self, module, changed):
        module.nx, module.nf = module.weight.shape


def prepare(model: nn.Module) -> nn.Module:
    """Give every ``nn.MultiheadAttention`` (exactly that class) the class :class:`MultiheadAttention`, in place:
    same tensors and keys, a forward that trace can follow into heads. Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
    return model


def needs_prepare(model: nn.Module) -> bool:
    return any(type(m) is nn.MultiheadAttention for m in model.modules())


_REGISTRY: dict[type | str, Kind] = {}


def register(module_type: type | str, kind: Kind) -> Kind:
    """Use ``kind`` for ``module_type`` (a class, or its dotted name ``"package.module.Class"``) and its
    subclasses (a later registration of a subclass wins)."""
    if isinstance(module_type, str):
        if "." not in module_type:
            raise TypeError(f"{module_type!r} is not a dotted class name (package.module.Class)")
    elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"{module_type!r} is not an nn.Module class")
    _REGISTRY[module_type] = kind
    return kind


def kind_of(module: nn.Module) -> Kind:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _REGISTRY:
            return _REGISTRY[name]
    return _DEFAULT


_DEFAULT = Kind()
register(nn.Linear, LinearKind())
register(nn.modules.conv._ConvNd, ConvKind())
register(nn.modules.batchnorm._NormBase, NormKind())
register(nn.modules.batchnorm._BatchNorm, BatchNormKind())
register(nn.GroupNorm, GroupNormKind())
register(nn.PReLU, PReLUKind())
register(nn.Embedding, EmbeddingKind())
register(nn.LayerNorm, LayerNormKind())
register(nn.MultiheadAttention, FusedKind())
register(MultiheadAttention, MultiheadAttentionKind())
register(nn.TransformerEncoderLayer, EncoderLayerKind())
register(nn.TransformerDecoderLayer, FusedKind())

# Hugging Face transformers, by name (nothing is imported).
_HF = "transformers.models"
register("transformers.pytorch_utils.Conv1D", TransposedLinearKind())
register(f"{_HF}.gpt2.modeling_gpt2.GPT2Attention", AttentionKind("c_attn", "head_dim", ("num_heads",),
                                                                  ("split_size",), fused=3))
register(f"{_HF}.bert.modeling_bert.BertSelfAttention", AttentionKind("query", "attention_head_size",
                                                                      ("num_attention_heads",), ("all_head_size",)))
register(f"{_HF}.vit.modeling_vit.ViTAttention", AttentionKind("q_proj", "head_dim", ("num_attention_heads",)))
register(f"{_HF}.t5.modeling_t5.T5Attention", AttentionKind("q", "key_value_proj_dim", ("n_heads",), ("inner_dim",)))
for _family, _cls in (("opt", "OPTAttention"), ("whisper", "WhisperAttention")):  # view(bsz, -1, num_heads, ...)
    register(f"{_HF}.{_family}.modeling_{_family}.{_cls}", AttentionKind("q_proj", "head_dim", ("num_heads",)))
for _family, _cls in (("llama", "LlamaAttention"), ("qwen2", "Qwen2Attention"), ("mistral", "MistralAttention")):
    register(f"{_HF}.{_family}.modeling_{_family}.{_cls}",
             AttentionKind("q_proj", "head_dim", ("num_heads",), key="k_proj", kv_heads=("num_key_value_heads",)))


def op_of(module: nn.Module) -> ops.Op | None:
    """The op of a module's own weighted call (see :class:`Kind`)."""
    return kind_of(module).op


def fused(model: nn.Module) -> bool:
    """Whether ``model`` holds a layer that takes a fused fast path without autograd (and hides its calls)."""
    return any(kind_of(m).fused for m in model.modules())


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The layers whose running statistics are re-estimated after a cut, in module order."""
    return [m for m in model.modules() if kind_of(m).recalibrated]


def embeddings(model: nn.Module) -> list[nn.Module]:
    """The token lookup tables of a model, in module order."""
    return [m for m in model.modules() if kind_of(m).embedding]


def factorable(module: nn.Module) -> bool:
    """Whether lowrank can replace ``module`` by a product of two layers (:meth:`prunetool.ops.Op.factored`)."""
    op = op_of(module)
    return op is not None and op.factorable(module)


def is_factored(module: nn.Module) -> bool:
    """Whether ``module`` is the replacement :meth:`prunetool.ops.Op.factored` makes: two factorable layers in an
    ``nn.Sequential``."""
    return isinstance(module, nn.Sequential) and len(module) == 2 and all(factorable(m) for m in module)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def is_stack(module: nn.Module) -> bool:
    """Whether ``module`` is a list of layers (``nn.ModuleList`` or ``nn.Sequential``) whose children can go."""
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def without(stack: nn.Module, kept: list[int]) -> nn.Module:
    """A list of ``stack``'s layers at ``kept``, of ``stack``'s kind (renumbered from 0)."""
    layers = [stack[i] for i in kept]
    return nn.Sequential(*layers) if isinstance(stack, nn.Sequential) else nn.ModuleList(layers)


SKIPPED = "skip"  # a structural record's value for a removed block (a rank otherwise)


class Skip(nn.Module):
    """A removed residual block: its input (the first positional argument, else the first tensor keyword) passes
    through unchanged."""

    def forward(self, *args, **kwargs):
        if args:
            return args[0]
        return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def refactor(model: nn.Module, factored: dict[str, int | str]) -> None:
    """Give a freshly built model the structure recorded in a saved file (layer → rank of its factorisation, or
    :data:`SKIPPED` for a block removed whole; shapes only)."""
    for name, k in factored.items():
        module = model.get_submodule(name)
        replace(model, name, Skip() if k == SKIPPED else op_of(module).factored(module, k))


def widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """The width attributes of every module (taken before a cut, for :func:`sync_containers`)."""
    out = {}
    for name, module in model.named_modules():
        found = {a: v for a in WIDTH_ATTRS if isinstance(v := getattr(module, a, None), int)
                 and not isinstance(v, bool)}
        if found:
            out[name] = found
    return out


def resync(model: nn.Module, changed: dict[str, dict[int, int]], before: dict[str, dict[str, int]]) -> None:
    """After ``changed`` layers (name → old size → new size) were sliced: each syncs its width attributes, every
    module holding one of them follows (:meth:`Kind.follow`), and containers recording a width follow it."""
    modules = dict(model.named_modules())
    for name, sizes in changed.items():
        kind_of(modules[name]).sync(modules[name], sizes)
    holders = {".".join(name.split(".")[:i]) for name in changed for i in range(name.count(".") + 1)}
    for name in sorted(holders, key=lambda n: (-n.count("."), n) if n else (1, "")):
        if name in modules:
            kind_of(modules[name]).follow(modules[name])
    sync_containers(model, before)
    clear_caches(model)


def clear_caches(model: nn.Module) -> nn.Module:
    """Empty every module's dict of tensors whose attribute name says it is a cache (timm's LeViT, EfficientFormer
    and EfficientViT keep ``attention_bias_cache``, filled by an eval-mode forward): it holds tensors derived from
    parameters, stale after a cut and, when filled with gradients on, not deep-copyable. The module refills it."""
    for module in model.modules():
        for attr, value in vars(module).items():
            if ("cache" in attr.lower() and isinstance(value, dict) and value
                    and all(isinstance(v, torch.Tensor) for v in value.values())):
                value.clear()
    return model


def clone(model: nn.Module, share: bool = False) -> nn.Module:
    """``copy.deepcopy`` of a model, its caches emptied first (:func:`clear_caches`) and any other tensor attribute
    that autograd produced (not a leaf, so not deep-copyable) copied detached.

    ``share=True`` copies the modules but not their parameters and buffers: the copy holds the same tensors, and
    costs no memory until a cut replaces them. A cut never writes into a tensor (it sets new ones), so the
    original is safe; anything that does write in place (BatchNorm recalibration, training) calls
    :func:`unshare` first."""
    clear_caches(model)
    memo = {}
    if share:
        for t in list(model.parameters()) + list(model.buffers()):
            memo[id(t)] = t
    for module in model.modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def unshare(model: nn.Module, other: nn.Module) -> None:
    """Give ``model`` its own copy of every parameter and buffer it still shares with ``other`` (see
    :func:`clone`), before anything writes into them."""
    theirs = {id(t) for t in list(other.parameters()) + list(other.buffers())}
    with torch.no_grad():
        for module in model.modules():
            for attr, t in list(module._parameters.items()):
                if t is not None and id(t) in theirs:
                    module._parameters[attr] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
            for attr, t in list(module._buffers.items()):
                if t is not None and id(t) in theirs:
                    module._buffers[attr] = t.clone()


def sync_containers(model: nn.Module, before: dict[str, dict[str, int]]) -> None:
    """Containers that record a width of what they hold (torchvision's ``Conv2dNormActivation.out_channels``,
    ``InvertedResidual.out_channels``) follow it: an ``out_*``/other width follows the last descendant that had
    the same attribute at the same value before the cut, an ``in_*`` width the first."""
    modules = dict(model.named_modules())
    for name, attrs in before.items():
        module = modules.get(name)
        if module is None or not any(True for _ in module.children()):
            continue
        prefix = f"{name}." if name else ""
        inner = [n for n in modules if n.startswith(prefix) and n != name and n in before]
        for attr, old in attrs.items():
            same = [n for n in inner if before[n].get(attr) == old]
            if not same:
                continue
            source = same[0] if attr.startswith("in_") else same[-1]
            new = getattr(modules[source], attr, old)
            if new != old and getattr(module, attr) == old:
                setattr(module, attr, new)


def slice_tensor(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    """Keep entries ``keep`` of ``module.<attr>`` along ``dim``, as a parameter or a buffer as it was."""
    t = getattr(module, attr)
    new = t.detach().index_select(dim, keep.to(t.device)).contiguous().clone()
    precision.release(t)
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, attr, new)
