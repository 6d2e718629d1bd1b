"""Operations: one object per kind of weighted call, owning the arithmetic prunetool does on that call.

A consumer (a layer reading a group's units) is found by the call that multiplies its input by its own weight
(:mod:`prunetool.trace`). Everything prunetool then computes about that call is asked of its :class:`Op`:

- the call's signature: which argument is the weight, the input, the bias (:meth:`Op.weight_of`,
  :meth:`Op.input_of`, :meth:`Op.with_input`);
- channels: which dimension of the input and output holds them, whether a unit of a given width can be read
  there, the weight columns of a unit (:meth:`Op.columns`), a unit's view of an activation (:meth:`Op.unit_view`);
- the weight as a matrix (out × fan-in) and back; what removed units held at their means add to the outputs;
- least squares: output positions per sample, design rows at sampled positions (:meth:`Op.rows`), target rows
  (:meth:`Op.targets`);
- lowrank: whether a module can be factored, and its two-layer replacement (:meth:`Op.factored`).

The kinds (:mod:`prunetool.layers`) name the op of a module type (``layers.op_of``): ``nn.Linear`` →
:data:`LINEAR`, the convolutions → :data:`CONV`, Hugging Face's ``Conv1D`` → :data:`ADDMM`, and an atomic layer
its own :class:`ModuleOp`. A new kind of weighted call is one subclass registered with :func:`register` under the
torch function names it is made by.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class Op:
    """A weighted call ``y = f(x, W[, b])`` reading its input channels from one dimension of ``x``.

    ``signature``: the call's parameters in torch's order (positional arguments are bound by it); ``weight``,
    ``input``, ``bias``: which of them; ``out_dim``/``in_dim``: the weight's output and input dimensions."""

    calls: tuple[str, ...] = ()
    signature: tuple[str, ...] = ("input", "weight", "bias")
    weight, input, bias = "weight", "input", "bias"
    out_dim, in_dim = 0, 1
    channels_first = False  # channels in dimension 1 of the input and output (convolutions), else the last
    channel_block = 1  # output channels the deployed CPU kernels process in blocks of (1: no such blocks)

    # --- the call -------------------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by parameter name."""
        return {**dict(zip(self.signature, args)), **kwargs}

    def _get(self, args, kwargs, key):
        pos = self.signature.index(key)
        return args[pos] if len(args) > pos else kwargs.get(key)

    def weight_of(self, args: tuple, kwargs: dict):
        return self._get(args, kwargs, self.weight)

    def input_of(self, args: tuple, kwargs: dict):
        return self._get(args, kwargs, self.input)

    def with_input(self, args: tuple, kwargs: dict, x) -> tuple[tuple, dict]:
        """The call's arguments with its input replaced by ``x``."""
        pos = self.signature.index(self.input)
        if len(args) > pos:
            return (*args[:pos], x, *args[pos + 1:]), kwargs
        return args, {**kwargs, self.input: x}

    # --- channels -------------------------------------------------------------------------------------------
    def channel_dim(self, ndim: int) -> int:
        """The dimension holding the channels of an input or output of ``ndim`` dimensions."""
        return 1 if self.channels_first else ndim - 1

    def reads(self, cdim: int, spatial: int, ndim: int, repeat: int = 1) -> bool:
        """Whether units laid along ``cdim`` (each ``spatial`` channels wide, the block repeated ``repeat`` times)
        are this call's input channels."""
        return cdim == self.channel_dim(ndim) and (spatial == 1 and repeat == 1 or not self.channels_first)

    def columns(self, offset: int, spatial: int, units: torch.Tensor, repeat: int = 1,
                period: int = 0) -> torch.Tensor:
        """The indices along the weight's input dimension of ``units`` read at ``offset``, ``spatial`` wide,
        repeated every ``period`` indices: unit by unit, each unit's in (repeat, spatial) order."""
        cols = (offset + units)[:, None] * spatial + torch.arange(spatial)  # units, spatial
        return (cols[:, None, :] + torch.arange(repeat)[:, None] * period).reshape(-1)  # units · repeat · spatial

    def unit_view(self, x: torch.Tensor, offset: int, units: int, spatial: int, repeat: int = 1,
                  period: int = 0) -> torch.Tensor:
        """Units ``offset … offset+units`` of input ``x`` as (batch, units, positions, width): a view when the
        block is not repeated, else a copy whose width is (repeat, spatial) flattened."""
        n = x.shape[0]
        v = x.reshape(n, -1, x.shape[-1]) if x.dim() > 2 else x.reshape(n, 1, -1)  # n, positions, channels
        if repeat > 1:
            v = v.unflatten(2, (repeat, period))[..., offset * spatial:(offset + units) * spatial]
            v = v.unflatten(3, (units, spatial))  # n, positions, repeat, units, spatial
            return v.permute(0, 3, 1, 2, 4).flatten(3)
        return v[:, :, offset * spatial:(offset + units) * spatial].unflatten(2, (units, spatial)).transpose(1, 2)

    def exact_for_constants(self, padded: bool) -> bool:
        """Whether a unit constant in the input is constant in what the weight multiplies (no zero padding)."""
        return True

    def per_sample(self, x: torch.Tensor, n: int, flattened: bool = False) -> torch.Tensor | None:
        """``x`` (the call's input or output on a batch of ``n`` samples) with one leading entry per sample: itself,
        or, when ``flattened`` (its rows checked to be each sample's tokens in turn, as a ``view(-1, C)`` before
        Hugging Face's ``Conv1D`` makes them), its (n·k) × C rows as n × k × C; None otherwise."""
        if x.shape[0] == n:
            return x
        if flattened and not self.channels_first and x.shape[0] % n == 0:
            return x.reshape(n, -1, x.shape[-1])  # (n·k, …, C) → n, k·…, C
        return None

    # --- the weight -----------------------------------------------------------------------------------------
    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as out × fan-in (input dimension second, kernels flattened into it)."""
        moved = weight.movedim(self.in_dim, 1)
        return moved.reshape(moved.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`as_matrix` for a weight shaped like ``like``."""
        return matrix.reshape(like.movedim(self.in_dim, 1).shape).movedim(1, self.in_dim)

    def mean_delta(self, weight: torch.Tensor, columns: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """What inputs ``columns`` held at ``means`` (units × width) add to every output."""
        cols = weight.movedim(self.in_dim, 1)[:, columns]
        return cols @ means.reshape(-1).to(weight.device, weight.dtype)  # means are kept on the CPU

    # --- least squares --------------------------------------------------------------------------------------
    def has_rows(self, weight: torch.Tensor) -> bool:
        """Whether :meth:`rows` is implemented for this weight (the least-squares refit needs it)."""
        return True

    def positions(self, args: dict, weight: torch.Tensor, x: torch.Tensor) -> int:
        """Output positions per sample of the call on input ``x`` (``args``: the call's other arguments)."""
        return math.prod(x.shape[1:-1]) if x.dim() > 2 else 1

    def out_positions(self, out: torch.Tensor) -> int:
        """Output positions per sample of an output."""
        return math.prod(out.shape[1:-1]) if out.dim() > 2 else 1

    def rows(self, args: dict, weight: torch.Tensor, x: torch.Tensor, picks: torch.Tensor | None) -> torch.Tensor:
        """The design rows the weight multiplies, at the sampled output positions ``picks`` (n × P; None: all), as
        (n·P) × fan-in."""
        return _last_dim_rows(x, picks)

    def targets(self, out: torch.Tensor, picks: torch.Tensor | None = None) -> torch.Tensor:
        """The outputs at the sampled positions ``picks`` (None: all), as (n·P) × outputs."""
        return _last_dim_rows(out, picks)

    # --- lowrank ----------------------------------------------------------------------------------------------
    def factorable(self, module: nn.Module) -> bool:
        """Whether :meth:`factored` can replace ``module``."""
        return False

    def factored(self, module: nn.Module, k: int) -> nn.Sequential:
        """The two-layer replacement of ``module`` at rank ``k``: first ``k × fan-in``, then ``out × k``."""
        raise NotImplementedError(f"{type(module).__name__} cannot be factored")


def _last_dim_rows(x: torch.Tensor, picks: torch.Tensor | None) -> torch.Tensor:
    """The vectors along ``x``'s last dimension at positions ``picks`` (n × P; None: all), as (n·P) × C."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x[:, None, :]  # n, positions, C
    if picks is None:
        return flat.reshape(-1, flat.shape[-1])
    idx = picks[..., None].expand(-1, -1, flat.shape[-1]).to(x.device)
    return flat.gather(1, idx).reshape(-1, flat.shape[-1])


def _plain(module: nn.Module) -> bool:
    """A module holding nothing but ``weight`` and ``bias`` (a subclass that adds tensors is not factored)."""
    own = set(dict(module.named_parameters(recurse=False))) | set(dict(module.named_buffers(recurse=False)))
    return own <= {"weight", "bias"}


def _narrowed(module: nn.Module, k: int, width: str) -> nn.Module:
    """A copy of a layer subclass with ``k`` outputs (recorded in its attribute ``width``) and no bias: it keeps
    whatever its ``forward`` does around its call (padding of its own, say)."""
    first = copy.deepcopy(module)
    w = module.weight
    first.weight = nn.Parameter(torch.empty((k, *w.shape[1:]), dtype=w.dtype, device=w.device))
    first.register_parameter("bias", None)
    setattr(first, width, k)
    return first


class LinearOp(Op):
    """``linear(input, weight, bias)``: weight out × in, channels in the last dimension."""

    calls = ("linear",)

    def factorable(self, module):
        return isinstance(module, nn.Linear) and _plain(module)

    def factored(self, module, k):
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        first = nn.Linear(module.in_features, k, bias=False, **kw) if type(module) is nn.Linear \
            else _narrowed(module, k, "out_features")
        return nn.Sequential(first, nn.Linear(k, module.out_features, bias=module.bias is not None, **kw))


class TransposedOp(Op):
    """``addmm(bias, x, W)`` (Hugging Face's ``Conv1D``) and ``matmul(x, W)``: weight in × out."""

    out_dim, in_dim = 1, 0


class AddmmOp(TransposedOp):
    calls = ("addmm",)
    signature = ("input", "mat1", "mat2")
    weight, input, bias = "mat2", "mat1", "input"


class MatmulOp(TransposedOp):
    calls = ("matmul",)
    signature = ("input", "other")
    weight, input, bias = "other", "input", None


class ConvOp(Op):
    """``conv1d``/``conv2d``/``conv3d``: weight out × in/groups × kernel, channels in dimension 1 (the refit's
    rows for conv1d and conv2d only)."""

    calls = ("conv1d", "conv2d", "conv3d")
    signature = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    channels_first = True
    # ONNX Runtime's CPU convolutions (NCHWc): off multiples of 8 a width can run slower. 8 on AVX-512 too, where
    # MLAS blocks by 16: in ORT's optimised graph of the Fashion-MNIST ResNet-20 at 2x fewer MACs, widths of 8 keep
    # all 21 convolutions blocked with 3 layout reorders; any width leaves 6 unblocked with 18 reorders. Widths of
    # 16 would lose accuracy for no blocking gained (87.54% against 90.73% at 8)
    channel_block = 8

    def columns(self, offset, spatial, units, repeat=1, period=0):
        return offset + units

    def unit_view(self, x, offset, units, spatial, repeat=1, period=0):
        return x.reshape(x.shape[0], x.shape[1], -1)[:, offset:offset + units, :, None]  # n, units, positions, 1

    def exact_for_constants(self, padded):
        return not padded

    def mean_delta(self, weight, columns, means):
        cols = weight.movedim(self.in_dim, 1)[:, columns]  # out, units, *kernel
        return (cols.sum(tuple(range(2, cols.dim()))) * means[:, 0].to(weight.device, weight.dtype)).sum(1)

    def geometry(self, args: dict, weight: torch.Tensor):
        """Stride, padding and dilation of the call, one entry per spatial dimension."""
        nd = weight.dim() - 2
        stride, padding, dilation = args.get("stride", 1), args.get("padding", 0), args.get("dilation", 1)
        stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
        if padding == "valid":
            padding = 0
        if padding == "same":
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight.shape[2:]))
        return stride, _tuple(padding, nd), dilation

    def positions(self, args, weight, x):
        size = 1
        for d, (s, p, dl, k) in enumerate(zip(*self.geometry(args, weight), weight.shape[2:])):
            size *= (x.shape[2 + d] + 2 * p - dl * (k - 1) - 1) // s + 1
        return size

    def out_positions(self, out):
        return math.prod(out.shape[2:])

    def has_rows(self, weight):
        return weight.dim() <= 4  # conv1d and conv2d; a conv3d's patches are not unfolded

    def rows(self, args, weight, x, picks):
        stride, padding, dilation = self.geometry(args, weight)
        if weight.dim() == 3:  # conv1d as a conv2d of height 1
            x = x.unsqueeze(2)
            kernel, stride, padding, dilation = (1, weight.shape[2]), (1, *stride), (0, *padding), (1, *dilation)
        else:
            kernel = tuple(weight.shape[2:])
        if picks is None:
            cols = F.unfold(x, kernel, dilation, padding, stride)  # n, fan-in, positions
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        n, c, h, w = x.shape
        picks = picks.to(x.device)  # the engine draws positions on the CPU; the input may be on a GPU
        xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        w_out = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        i, j = picks // w_out, picks % w_out
        rows = (i * stride[0])[..., None] + torch.arange(kernel[0], device=x.device) * dilation[0]
        cols = (j * stride[1])[..., None] + torch.arange(kernel[1], device=x.device) * dilation[1]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        patches = xp.permute(0, 2, 3, 1)[batch, rows[:, :, :, None], cols[:, :, None, :]]  # n, P, kh, kw, c
        return patches.permute(0, 1, 4, 2, 3).reshape(n * picks.shape[1], c * kernel[0] * kernel[1])

    def targets(self, out, picks=None):
        if picks is None:
            return out.movedim(1, -1).reshape(-1, out.shape[1])
        flat = out.flatten(2)  # n, C, positions
        idx = picks[:, None, :].expand(-1, flat.shape[1], -1).to(out.device)
        return flat.gather(2, idx).transpose(1, 2).reshape(-1, flat.shape[1])

    def factorable(self, module):
        return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
                and _plain(module))

    def factored(self, module, k):
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        first = nn.Conv2d(module.in_channels, k, module.kernel_size, module.stride, module.padding, module.dilation,
                          bias=False, **kw) if type(module) is nn.Conv2d else _narrowed(module, k, "out_channels")
        return nn.Sequential(first, nn.Conv2d(k, module.out_channels, 1, bias=module.bias is not None, **kw))


class ModuleOp(Op):
    """An atomic layer's module call ``module(x)``: its weight ``weight`` (out × in, or in × out when
    ``transposed``), its input the first argument, channels in the last dimension."""

    signature = ("input",)
    weight = bias = None  # the kind names the module's weight and bias attributes

    def __init__(self, transposed: bool = False):
        self.out_dim, self.in_dim = (1, 0) if transposed else (0, 1)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


LINEAR, CONV, ADDMM, MATMUL = LinearOp(), ConvOp(), AddmmOp(), MatmulOp()
_BY_CALL: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Recognise the torch functions ``op.calls`` as weighted calls of ``op``."""
    for name in op.calls:
        _BY_CALL[name] = op
    return op


def of_call(name: str) -> Op | None:
    """The op of a torch function by its name (``"linear"``, ``"conv2d"``, ...); None for any other call."""
    return _BY_CALL.get(name)


def call_name(func) -> str:
    """The name a torch function is registered under (``torch._C._nn.linear`` → ``linear``)."""
    return getattr(func, "__name__", "").lstrip("_")


for _op in (LINEAR, CONV, ADDMM, MATMUL):
    register(_op)
