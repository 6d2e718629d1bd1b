"""A loaded checkpoint: the model and where it came from, and the dtypes its file held (shared by
:mod:`prunetool.load` and :mod:`prunetool.hf`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Checkpoint:
    """A loaded model and where it came from."""

    model: nn.Module
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    file_bytes: int | None = None
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # floating tensors of the file, by key
    arch_root: str | None = None  # the sys.path entry the architecture was imported from, when not installed
    tokenizer: str | None = None  # a directory with the model's tokenizer (a Hugging Face model directory)


def main_dtype(dtypes: dict[str, torch.dtype]) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for d in dtypes.values():
        counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.get) if counts else None


def cast_state(state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype] | None) -> dict[str, torch.Tensor]:
    """Each floating tensor in the dtype the source had for it (new tensors: the source's main dtype)."""
    if not dtypes:
        return state
    main = main_dtype(dtypes)
    return {k: (v.to(dtypes.get(k, main)) if v.dtype.is_floating_point else v) for k, v in state.items()}
