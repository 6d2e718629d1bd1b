"""A model's input: one tensor (images, features) or a dict of keyword tensors (``input_ids``,
``attention_mask``), and the few operations every stage needs on either: length, slices, device, calling the
model for its logits, and a batch of another size for measuring."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .task import logits

Batch = Union[torch.Tensor, dict]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (the dtype inputs are given in)."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


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


def call(model: nn.Module, b: Batch, output_key: str | None = None) -> torch.Tensor:
    """The model's logits on batch ``b`` (a dict is passed as keyword arguments), by :func:`prunetool.task.logits`."""
    return logits(model(**b) if isinstance(b, dict) else model(b), output_key)


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
    """One sample's shape (of ``input_ids`` for a dict)."""
    t = example if isinstance(example, torch.Tensor) else next(iter(example.values()))
    return tuple(t.shape[1:])
