"""Verify stage: the produced model runs, keeps its output shape, and reloads to identical outputs."""

from __future__ import annotations

import io

import torch
from torch import nn

from .errors import VerificationError


def check_forward(model: nn.Module, x: torch.Tensor, output_shape: tuple[int, ...]) -> torch.Tensor:
    """Run ``model`` on ``x``; the output must have the dense model's shape and be finite."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise VerificationError(f"the cut model fails its forward pass: {str(e).splitlines()[0]}") from None
    if tuple(out.shape[1:]) != tuple(output_shape):
        raise VerificationError(f"output shape changed from {tuple(output_shape)} to {tuple(out.shape[1:])}")
    if not torch.isfinite(out).all():
        raise VerificationError("the cut model produces non-finite outputs")
    return out


def check_reload(data: bytes, x: torch.Tensor, expected: torch.Tensor) -> None:
    """Load saved bytes back through :func:`prunetool.load.load` semantics; outputs must be identical."""
    from .load import _from_object

    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = _from_object(obj, "<saved>", None, None).model.eval()
    with torch.no_grad():
        out = model(x)
    if not torch.equal(out, expected):
        diff = (out - expected).abs().max().item()
        raise VerificationError(f"the saved model reloads with different outputs (max abs diff {diff:.3g})")
