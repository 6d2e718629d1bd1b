"""A layer's own call: the input it really reads and the output it makes, whatever its module does around it.

A consumer is found by the call that uses its weight (``linear``, ``conv1d``/``conv2d``, ``addmm``,
``matmul``), so hooks that read or replace a consumer's input, and the least-squares refit that needs its
design matrix, intercept that call rather than the module's ``forward``: a ``Conv2d`` subclass that pads in
its ``forward`` is read after its padding, with the stride, padding and dilation of the call it makes.
Layers registered as atomic in :mod:`prunetool.layers` are read at their module call instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import layers

# Which argument holds the weight and which the input, by the name torch gives the call.
WEIGHT_ARG = {"linear": (1, "weight"), "conv1d": (1, "weight"), "conv2d": (1, "weight"), "conv3d": (1, "weight"),
              "addmm": (2, "mat2"), "matmul": (1, "other")}
INPUT_ARG = {"linear": (0, "input"), "conv1d": (0, "input"), "conv2d": (0, "input"), "conv3d": (0, "input"),
             "addmm": (1, "mat1"), "matmul": (0, "input")}
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _name(func) -> str:
    return getattr(func, "__name__", "").lstrip("_")


def _get(args: tuple, kwargs: dict, where: tuple[int, str]):
    pos, key = where
    return args[pos] if len(args) > pos else kwargs.get(key)


def _put(args: tuple, kwargs: dict, where: tuple[int, str], value) -> tuple[tuple, dict]:
    pos, key = where
    if len(args) > pos:
        args = args[:pos] + (value,) + args[pos + 1:]
    else:
        kwargs = {**kwargs, key: value}
    return args, kwargs


@dataclass
class Call:
    """One captured call: its name, the input it read, its arguments, and (when run) its output."""

    name: str
    input: torch.Tensor
    args: dict
    output: torch.Tensor | None = None


class _Hooks(TorchFunctionMode):
    """Calls whose weight is watched: ``on_input(x)`` may return a replacement input, ``on_output(y)`` sees the
    output."""

    def __init__(self, inputs: dict[int, Callable], outputs: dict[int, Callable]):
        super().__init__()
        self.inputs, self.outputs = inputs, outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in WEIGHT_ARG:
            key = id(_get(args, kwargs, WEIGHT_ARG[name]))
            if key in self.inputs:
                new = self.inputs[key](_get(args, kwargs, INPUT_ARG[name]))
                if new is not None:
                    args, kwargs = _put(args, kwargs, INPUT_ARG[name], new)
            out = func(*args, **kwargs)
            if key in self.outputs:
                self.outputs[key](out)
            return out
        return func(*args, **kwargs)


@contextmanager
def hooks(model: nn.Module, on_input: dict[str, Callable] | None = None, on_output: dict[str, Callable] | None = None,
          weights: dict[str, str] | None = None):
    """Within the context, the calls of layers ``name`` (keys of ``on_input``/``on_output``) report their input
    (the handler may return a replacement) and their output. ``weights`` names each layer's weight attribute
    (default ``weight``)."""
    on_input, on_output, weights = on_input or {}, on_output or {}, weights or {}
    modules = dict(model.named_modules())
    by_weight_in, by_weight_out, handles = {}, {}, []
    for table, target in ((on_input, by_weight_in), (on_output, by_weight_out)):
        for name, fn in table.items():
            module = modules[name]
            kind = layers.kind_of(module)
            if kind.atomic:
                if table is on_input:
                    def pre(mod, args, fn=fn):
                        new = fn(args[0])
                        return None if new is None else (new, *args[1:])
                    handles.append(module.register_forward_pre_hook(pre))
                else:
                    handles.append(module.register_forward_hook(lambda mod, args, out, fn=fn: fn(out)))
            else:
                target[id(getattr(module, weights.get(name, "weight")))] = fn
    try:
        if by_weight_in or by_weight_out:
            with _Hooks(by_weight_in, by_weight_out):
                yield
        else:
            yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def activation_gradients(model: nn.Module):
    """Within the context a backward pass through ``model`` computes the gradients of activations and nothing
    else: its parameters stop requiring grad (their gradients, and the products that make them, are skipped),
    and a module that owns parameters but is given no floating input that requires grad gets its first one, the
    data, as a tensor that does (passed twice, it stays one tensor). Without that, nothing before the first
    tensor that requires grad would be differentiated: hooks on those layers' outputs would see no gradient, the
    loss might not require grad at all, and torch's attention layers would take their fused paths, which skip
    the calls hooks read. ``requires_grad`` is restored on exit.
    """
    def lift(module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        floats = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floats or any(t.requires_grad for t in floats):
            return None
        first = floats[0]  # the data; a float mask or bias passed beside it needs no gradient
        lifted = first.detach().requires_grad_()

        def one(t):
            return lifted if t is first else t
        return tuple(one(t) for t in args), {k: one(v) for k, v in kwargs.items()}

    frozen = [p for p in model.parameters() if p.requires_grad]
    handles = []
    try:
        for m in model.modules():
            if next(m.parameters(recurse=False), None) is not None:
                handles.append(m.register_forward_pre_hook(lift, with_kwargs=True))
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


def capture(model: nn.Module, name: str, batch, weight: str = "weight", run: Callable | None = None) -> Call:
    """Run ``model`` on ``batch`` only as far as layer ``name``'s own call; return that call (output included)."""
    module = model.get_submodule(name)
    box: list[Call] = []
    kind = layers.kind_of(module)
    if kind.atomic:
        def pre(mod, args):
            with torch.no_grad():
                out = mod.forward(*args)  # forward itself: calling the module would run this hook again
            box.append(Call("atomic", args[0], {"layout": kind.layout}, out))
            raise _Stop
        handle = module.register_forward_pre_hook(pre)
        try:
            _run(model, batch, run)
        except _Stop:
            pass
        finally:
            handle.remove()
    else:
        w = getattr(module, weight)

        class Catch(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                fname = _name(func)
                if fname in WEIGHT_ARG and _get(args, kwargs, WEIGHT_ARG[fname]) is w:
                    out = func(*args, **kwargs)
                    bound = dict(zip(CONV_ARGS, args)) if fname.startswith("conv") else {}
                    bound.update(kwargs)
                    box.append(Call(fname, _get(args, kwargs, INPUT_ARG[fname]), bound, out))
                    raise _Stop
                return func(*args, **kwargs)

        try:
            with Catch():
                _run(model, batch, run)
        except _Stop:
            pass
    if not box:
        raise RuntimeError(f"{name} ({type(module).__name__}) never called linear/conv with its own weight")
    return box[0]


def _run(model, batch, run):
    with torch.no_grad():
        if run is not None:
            run(model, batch)
        elif isinstance(batch, dict):
            model(**batch)
        else:
            model(batch)


def conv_geometry(call: Call, weight: torch.Tensor):
    a = call.args
    nd = weight.dim() - 2
    stride, padding, dilation = a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1)
    stride, dilation = (_tuple(stride, nd), _tuple(dilation, nd))
    if padding == "valid":
        padding = 0
    if padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight.shape[2:]))
    return stride, _tuple(padding, nd), dilation


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def design_matrix(call: Call, weight: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """The rows a layer's weight multiplies (conv: unfolded patches), for input ``x`` (default: the call's)."""
    x = call.input if x is None else x
    if call.name.startswith("conv"):
        stride, padding, dilation = conv_geometry(call, weight)
        if weight.dim() == 3:  # conv1d as a conv2d of height 1
            x = x.unsqueeze(2)
            kernel, stride, padding, dilation = (1, weight.shape[2]), (1, *stride), (0, *padding), (1, *dilation)
        else:
            kernel = tuple(weight.shape[2:])
        cols = F.unfold(x, kernel, dilation, padding, stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def targets(call: Call, out: torch.Tensor | None = None) -> torch.Tensor:
    """A call's output as rows of output units."""
    out = call.output if out is None else out
    if call.name.startswith("conv"):
        return out.movedim(1, -1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


def rows_per_sample(call: Call, weight: torch.Tensor) -> int:
    return design_matrix(call, weight, call.input[:1]).shape[0]
