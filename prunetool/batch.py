"""A model's input: one tensor (images, features) or a dict of keyword tensors (``input_ids``,
``attention_mask``, or one per forward parameter), and the few operations every stage needs on either: length,
slices, device, calling the model for its logits, a batch of another size for measuring, and what the model's
forward takes (:func:`forward_of`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from . import precision
from .task import logits

Batch = Union[torch.Tensor, dict]


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 where it has none)."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (the dtype inputs are given in): float32 for half-precision weights
    while :class:`prunetool.precision.Compute` is in force."""
    dtype = stored_dtype(model)
    return torch.float32 if dtype in precision.HALF and precision.active() is not None else dtype


def token_ids(b: Batch) -> bool:
    """Whether ``b`` holds token ids: named inputs with an integer N × T tensor among them."""
    return isinstance(b, dict) and any(isinstance(v, torch.Tensor) and not v.dtype.is_floating_point
                                       and v.dim() == 2 for v in b.values())


def batch_len(b: Batch) -> int:
    return len(b) if isinstance(b, torch.Tensor) else len(next(iter(b.values())))


def batch_slice(b: Batch, start: int, stop: int) -> Batch:
    return b[start:stop] if isinstance(b, torch.Tensor) else {k: v[start:stop] for k, v in b.items()}


def batch_cat(parts: list[Batch]) -> Batch:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def batch_to(b: Batch, device=None, dtype: torch.dtype | None = None) -> Batch:
    """``b`` on ``device``; its floating tensors in ``dtype`` (the model's)."""
    def move(t):
        return t.to(device, dtype) if dtype is not None and t.dtype.is_floating_point else t.to(device)
    return move(b) if isinstance(b, torch.Tensor) else {k: move(v) for k, v in b.items()}


def as_input(b: Batch, model: nn.Module, device="cpu") -> Batch:
    """``b`` as ``model`` takes it: on ``device``, floating tensors in the model's dtype."""
    return batch_to(b, device, model_dtype(model))


def forward(model: nn.Module, b: Batch):
    """The model's output on batch ``b``, whatever its structure (a dict is passed as keyword arguments)."""
    return model(**b) if isinstance(b, dict) else model(b)


def call(model: nn.Module, b: Batch, output_key: str | None = None) -> torch.Tensor:
    """The model's logits on batch ``b`` (a dict is passed as keyword arguments), by :func:`prunetool.task.logits`."""
    return logits(forward(model, b), output_key)


def resized(example: Batch | tuple[int, ...], size: int, model: nn.Module | None = None, device="cpu") -> Batch:
    """A batch of ``size`` for timing and counting, in ``model``'s dtype (float32 without one): random normal inputs
    of a shape (``example`` a tuple), or the samples of ``example`` repeated (token ids must stay valid ids)."""
    dtype = model_dtype(model) if model is not None else torch.float32
    if isinstance(example, tuple):
        return torch.randn((size, *example), device=device, dtype=dtype)
    n = batch_len(example)
    idx = torch.arange(size) % n
    picked = example[idx] if isinstance(example, torch.Tensor) else {k: v[idx] for k, v in example.items()}
    return batch_to(picked, device, dtype)


def shape_of(example: Batch) -> tuple[int, ...]:
    """One sample's shape (of the first input for a dict: ``input_ids`` for tokens)."""
    t = example if isinstance(example, torch.Tensor) else next(iter(example.values()))
    return tuple(t.shape[1:])


@dataclass(frozen=True)
class Forward:
    """What a model's forward takes: its named parameters in order, those that can come by position, those
    without a default, and whether it also takes ``*args`` / ``**kwargs``."""

    names: tuple[str, ...]
    positional: tuple[str, ...]
    required: tuple[str, ...]
    var_args: bool = False
    var_kwargs: bool = False

    def takes(self, name: str) -> bool:
        """Whether a keyword input ``name`` reaches the forward."""
        return name in self.names or self.var_kwargs

    def shown(self, most: int = 4) -> str:
        """The parameters as a message shows them, those without a default if any: ``(image, meta)``."""
        names = list(self.required or self.names) or ["*args"] * self.var_args + ["**kwargs"] * self.var_kwargs
        return f"({', '.join(names[:most] + ['…'] * (len(names) > most))})"


def forward_of(model: nn.Module) -> Forward | None:
    """The parameters of ``model.forward`` (None when Python cannot tell: a scripted or compiled module)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kind = inspect.Parameter
    return Forward(tuple(p.name for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)),
                   tuple(p.name for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)),
                   tuple(p.name for p in params if p.default is kind.empty
                         and p.kind not in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD)),
                   any(p.kind == kind.VAR_POSITIONAL for p in params),
                   any(p.kind == kind.VAR_KEYWORD for p in params))
