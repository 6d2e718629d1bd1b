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
from torch import nn
from torch.overrides import TorchFunctionMode

from . import layers, ops
from .batch import batch_len, batch_slice, forward


@dataclass
class Call:
    """One captured call: its op, the input it read, its other arguments by name, and (when run) its output."""

    op: ops.Op
    input: torch.Tensor
    args: dict
    output: torch.Tensor | None = None

    def rows(self, weight: torch.Tensor, x: torch.Tensor | None = None, picks: torch.Tensor | None = None):
        """The design rows ``weight`` multiplies in this call, for input ``x`` (default: the call's) at the sampled
        output positions ``picks`` (None: all); see :meth:`prunetool.ops.Op.rows`."""
        return self.op.rows(self.args, weight, self.input if x is None else x, picks)

    def positions(self, weight: torch.Tensor, x: torch.Tensor | None = None) -> int:
        """Output positions per sample of the call on ``x`` (default: its own input)."""
        return self.op.positions(self.args, weight, self.input if x is None else x)


class _Hooks(TorchFunctionMode):
    """Calls whose weight is watched: ``on_input(x)`` may return a replacement input, ``on_output(y)`` sees the
    output."""

    def __init__(self, inputs: dict[int, Callable], outputs: dict[int, Callable]):
        super().__init__()
        self.inputs, self.outputs = inputs, outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = ops.of_call(ops.call_name(func))
        if op is not None:
            key = id(op.weight_of(args, kwargs))
            if key in self.inputs:
                new = self.inputs[key](op.input_of(args, kwargs))
                if new is not None:
                    args, kwargs = op.with_input(args, kwargs, new)
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


class Stop(Exception):
    """Raised by a hook to end a forward pass early, once it has what it needs."""


class NeverCalled(RuntimeError):
    """A layer whose call a pass waited for was never made (its module did not run on that batch)."""


def capture(model: nn.Module, name: str, batch, weight: str = "weight", run: Callable | None = None) -> Call:
    """Run ``model`` on ``batch`` only as far as layer ``name``'s own call; return that call (output included)."""
    module = model.get_submodule(name)
    box: list[Call] = []
    kind = layers.kind_of(module)
    if kind.atomic:
        def pre(mod, args):
            with torch.no_grad():
                out = mod.forward(*args)  # forward itself: calling the module would run this hook again
            box.append(Call(kind.op, args[0], {}, out))
            raise Stop
        handle = module.register_forward_pre_hook(pre)
        try:
            _run(model, batch, run)
        except Stop:
            pass
        finally:
            handle.remove()
    else:
        w = getattr(module, weight)

        class Catch(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                op = ops.of_call(ops.call_name(func))
                if op is not None and op.weight_of(args, kwargs) is w:
                    out = func(*args, **kwargs)
                    box.append(Call(op, op.input_of(args, kwargs), op.bind(args, kwargs), out))
                    raise Stop
                return func(*args, **kwargs)

        try:
            with Catch():
                _run(model, batch, run)
        except Stop:
            pass
    if not box:
        raise NeverCalled(f"{name} ({type(module).__name__}) never made a weighted call with its own weight")
    return box[0]


def first_call(model: nn.Module, name: str, batches, weight: str = "weight") -> Call | None:
    """:func:`capture` on the first two samples of ``batches``, else on the first whole batch where layer ``name``
    makes its call (an expert runs on its tokens only); None where it makes none."""
    for i, batch in enumerate(batches):
        tries = [batch_slice(batch, 0, 2), batch] if i == 0 and batch_len(batch) > 2 else [batch]
        for b in tries:
            try:
                return capture(model, name, b, weight)
            except NeverCalled:
                continue
    return None


def _run(model, batch, run):
    with torch.no_grad():
        if run is not None:
            run(model, batch)
        else:
            forward(model, batch)
