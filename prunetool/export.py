"""Deployment artefacts, checked: ONNX (run by onnxruntime) and pt2 (``torch.export``, reloaded with
``torch.export.load``), each with a dynamic batch dimension and compared with PyTorch on the same inputs.

ONNX: torch's TorchScript-based exporter first (about a second on a ResNet), then, if it cannot export the
graph (adaptive pooling to a size that does not divide its input, say) or its output does not match, the
dynamo-based exporter (onnxscript; several seconds). Parity: ``max |exported − PyTorch| ≤ atol + rtol · max
|PyTorch|``: an absolute floor for outputs near zero, and a tolerance that grows with large logits. A file that
fails to export or to match raises :class:`VerificationError`; the caller writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import VerificationError
from .options import DEFAULT_ATOL, DEFAULT_RTOL

DEFAULT_OPSET = 17


def tolerance(want: np.ndarray, atol: float, rtol: float) -> tuple[float, float]:
    """The largest |output| and the tolerance it gives."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    return scale, atol + rtol * scale


def ort_session(path: str, threads: int | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_latency(session, input_shape, batch_size: int, warmup: int = 3, runs: int = 30,
                budget_s: float = 0.5) -> list[float]:
    from .measure import timings

    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    name = session.get_inputs()[0].name
    return timings(lambda: session.run(None, {name: x}), warmup, max_runs=runs, budget_s=budget_s)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings of their own."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export(model: nn.Module, x: torch.Tensor, path: str, opset: int, exporter: str) -> None:
    with _quiet():
        if exporter == "torchscript":
            torch.onnx.export(model, (x[:1],), path, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        else:  # an example of batch 2: torch.export specialises dimensions of size 1
            torch.onnx.export(model, (x[:2],), path, input_names=["input"], output_names=["output"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                              external_data=False)


def _first_line(e: Exception) -> str:
    text = str(e).replace("\x1b", "")
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:160]
    return type(e).__name__


def export_onnx(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, opset: int = DEFAULT_OPSET, latency_batches=(1,),
                shown_as: str | None = None) -> dict:
    """Export ``model`` to ``path``, check it, compare onnxruntime with PyTorch on ``x`` (batch ≥ 2)."""
    import onnx

    path = str(path)
    model = model.eval().cpu()
    with torch.no_grad():
        want = model(x).numpy()
    scale, tol = tolerance(want, atol, rtol)
    tried = []
    for exporter in ("torchscript", "dynamo"):
        try:
            _remove_external_data(path)
            _export(model, x, path, opset, exporter)
            onnx.checker.check_model(path)
            session = ort_session(path)
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        except Exception as e:
            tried.append(f"{exporter}: {_first_line(e)}")
            continue
        if got.shape != want.shape:
            tried.append(f"{exporter}: output shape {got.shape} differs from PyTorch's {want.shape}")
            continue
        diff = float(np.abs(got - want).max())
        if diff > tol:
            tried.append(f"{exporter}: output differs from PyTorch by {diff:.3g} (tolerance {tol:.3g} = --onnx-atol "
                         f"{atol:g} + --onnx-rtol {rtol:g} × max |output| {scale:.3g})")
            continue
        shape = tuple(x.shape[1:])
        latency = {str(b): statistics.median(ort_latency(session, shape, b)) for b in latency_batches}
        opset_used = next((o.version for o in onnx.load(path, load_external_data=False).opset_import
                           if o.domain in ("", "ai.onnx")), opset)
        return {"path": shown_as or path, "exporter": exporter, "opset": opset_used, "max_abs_diff": diff,
                "max_abs_output": scale, "tolerance": tol, "ort_latency_ms": latency}
    _remove_external_data(path)
    raise VerificationError(f"ONNX export of the result failed: {'; '.join(tried)}")


def _remove_external_data(path: str) -> None:
    """An exporter that failed half-way may have left its weights beside the file."""
    if os.path.exists(path + ".data"):
        os.unlink(path + ".data")


def export_pt2(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, atol: float = DEFAULT_ATOL,
               rtol: float = DEFAULT_RTOL, shown_as: str | None = None) -> dict:
    """``torch.export`` with a dynamic batch dimension, saved to ``path``, loaded back with
    ``torch.export.load`` and compared with the PyTorch model on ``x`` (batch ≥ 2)."""
    path = str(path)
    model = model.eval().cpu()
    with torch.no_grad():
        want = model(x)
    scale, tol = tolerance(want.numpy(), atol, rtol)
    try:
        with _quiet():
            program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, path)
            loaded = torch.export.load(path)
            with torch.no_grad():
                got = loaded.module()(x)
    except Exception as e:
        raise VerificationError(f"pt2 export of the result failed: {_first_line(e)}") from None
    if got.shape != want.shape:
        raise VerificationError(f"the pt2 program's output shape {tuple(got.shape)} differs from PyTorch's "
                                f"{tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if diff > tol:
        raise VerificationError(f"the pt2 program's output differs from PyTorch by {diff:.3g} (tolerance {tol:.3g})")
    return {"path": shown_as or path, "max_abs_diff": diff, "max_abs_output": scale, "tolerance": tol,
            "bytes": Path(path).stat().st_size}
