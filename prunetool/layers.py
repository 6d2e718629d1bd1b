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
"""

from __future__ import annotations

import torch
from torch import nn

# Attribute names that, by convention, record a width. A module type without an entry in the registry has
# those of its attributes updated that held the old width of a tensor dimension the cut changed.
WIDTH_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_features", "num_channels",
               "embedding_dim", "embed_dim", "hidden_dim", "hidden_size", "dim", "nf", "nx")


class Kind:
    """Default behaviour: update conventional width attributes that held an old size."""

    atomic = False

    def sync(self, module: nn.Module, changed: dict[int, int]) -> None:
        """``changed`` maps each old size of a sliced tensor dimension to its new size."""
        for attr in WIDTH_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in changed:
                setattr(module, attr, changed[value])


class LinearKind(Kind):
    def sync(self, module, changed):
        module.out_features, module.in_features = module.weight.shape


class ConvKind(Kind):
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

    @property
    def out_dim(self) -> int:
        return 0 if self.layout == "linear" else 1

    def sync(self, module, changed):
        w = getattr(module, self.weight)
        sizes = {"out": w.shape[self.out_dim], "in": w.shape[1 - self.out_dim]}
        for attr, which in self.widths.items():
            setattr(module, attr, sizes[which])


_REGISTRY: dict[type, Kind] = {}


def register(module_type: type, kind: Kind) -> Kind:
    """Use ``kind`` for ``module_type`` and its subclasses (a later registration of a subclass wins)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"{module_type!r} is not an nn.Module class")
    _REGISTRY[module_type] = kind
    return kind


def kind_of(module: nn.Module) -> Kind:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return _DEFAULT


_DEFAULT = Kind()
register(nn.Linear, LinearKind())
register(nn.modules.conv._ConvNd, ConvKind())
register(nn.modules.batchnorm._NormBase, NormKind())
register(nn.GroupNorm, GroupNormKind())
register(nn.PReLU, PReLUKind())
register(nn.Embedding, EmbeddingKind())
register(nn.LayerNorm, LayerNormKind())


def widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """The width attributes of every module (taken before a cut, for :func:`sync_containers`)."""
    out = {}
    for name, module in model.named_modules():
        found = {a: v for a in WIDTH_ATTRS if isinstance(v := getattr(module, a, None), int)
                 and not isinstance(v, bool)}
        if found:
            out[name] = found
    return out


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
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, attr, new)
