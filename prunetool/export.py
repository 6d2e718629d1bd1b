"""ONNX export, checked: torch's exporter with a dynamic batch dimension, ``onnx.checker``, then onnxruntime
against PyTorch on the same inputs."""

from __future__ import annotations

import os
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UsageError, VerificationError

DEFAULT_ATOL = 1e-4
DEFAULT_OPSET = 17


def ort_session(path: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_latency(session, input_shape, batch_size: int, warmup: int = 3, runs: int = 30,
                budget_s: float = 0.5) -> list[float]:
    from .measure import timings

    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    name = session.get_inputs()[0].name
    return timings(lambda: session.run(None, {name: x}), warmup, max_runs=runs, budget_s=budget_s)


def export_onnx(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                latency_batches=(1,)) -> dict:
    """Export ``model`` to ``path`` (atomically), check it, and compare onnxruntime with PyTorch on ``x``."""
    import onnx

    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist; choose another --onnx")
    model = model.eval().cpu()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:1],), tmp, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        onnx.checker.check_model(tmp)
        session = ort_session(tmp)
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        if got.shape != want.shape:
            raise VerificationError(f"onnxruntime output shape {got.shape} differs from PyTorch's {want.shape}")
        diff = float(np.abs(got - want).max())
        shape = tuple(x.shape[1:])
        latency = {str(b): statistics.median(ort_latency(session, shape, b)) for b in latency_batches}
        os.replace(tmp, path)
    except (VerificationError, UsageError):
        raise
    except Exception as e:
        raise VerificationError(f"ONNX export failed: {str(e).splitlines()[0][:200]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(path), "opset": opset, "max_abs_diff": diff, "ort_latency_ms": latency}


def check_onnx(info: dict, atol: float) -> str | None:
    """The failure line when onnxruntime and PyTorch disagree by more than ``atol``."""
    if info["max_abs_diff"] > atol:
        return (f"ONNX output differs from PyTorch by {info['max_abs_diff']:.3g} "
                f"(above --onnx-atol {atol:g} by {info['max_abs_diff'] - atol:.3g})")
    return None
