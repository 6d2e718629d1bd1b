"""Deployment artefacts, checked: ONNX (run by onnxruntime) and pt2 (``torch.export``, reloaded with
``torch.export.load``), each with a dynamic batch dimension and compared with PyTorch on the same inputs.

ONNX: torch's TorchScript-based exporter first (about a second on a ResNet), then, if it cannot export the
graph (adaptive pooling to a size that does not divide its input, say) or its output does not match, the
dynamo-based exporter (onnxscript; several seconds). Parity: ``max |exported − PyTorch| ≤ max(atol + rtol · max
|PyTorch|, 4 · noise)``: an absolute floor for outputs near zero, a part that grows with large logits, and the
model's own float32 rounding noise (``noise = max |float32 output − float64 output|``, measured only when the
first part is exceeded): two float32 implementations of the same graph that sum in different orders differ by
about that much, which on a deep network with large activations (resnext101, efficientnet_v2_l with random
weights) is more than any fixed tolerance allows. A file that fails to export or to match raises
:class:`VerificationError`; the caller writes nothing.

A token model is exported with its keyword inputs as named inputs (``input_ids``, ``attention_mask``), batch and
sequence length dynamic, and its logits (:func:`prunetool.task.logits`) as the one output.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import layers
from .batch import Batch, resized
from .errors import VerificationError
from .measure import compare_latency, interleaved, paired_speedup, timings
from .options import DEFAULT_ATOL, DEFAULT_RTOL
from .task import logits

DEFAULT_OPSET = 17


def tolerance(want: np.ndarray, atol: float, rtol: float) -> tuple[float, float]:
    """The largest |output| and the tolerance it gives."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    return scale, atol + rtol * scale


NOISE_FACTOR = 4.0  # exported vs PyTorch: each is one float32 rounding of the graph, so ≤ 2·noise; 2× headroom


def float32_noise(model: nn.Module, values: tuple, want: np.ndarray) -> float | None:
    """``max |want − float64 model(values)|``: the float32 rounding noise of ``model`` on these inputs, ``want``
    its float32 output. None when the model does not run in float64 (an op without a double kernel)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return None  # a half-precision model is compared at its own precision; noise is not measured
    try:
        double = layers.clone(model).double()
        with torch.no_grad():
            exact = double(*(v.double() if v.is_floating_point() else v for v in values))
    except Exception:  # noqa: BLE001 - any op without a float64 kernel: no noise floor, the fixed tolerance stands
        return None
    return float(np.abs(exact.numpy() - want.astype(np.float64)).max())


def within(diff: float, fixed: float, want: np.ndarray, model: nn.Module, values: tuple,
           noise: list) -> tuple[bool, float]:
    """Whether ``diff`` passes parity, and the tolerance applied: ``fixed`` (from :func:`tolerance`), raised to
    ``NOISE_FACTOR`` × the model's float32 noise when ``diff`` exceeds it. ``noise`` caches that noise across the
    exporters tried (a one-element list, empty until measured)."""
    if diff <= fixed:
        return True, fixed
    if not noise:
        noise.append(float32_noise(model, values, want))
    tol = fixed if noise[0] is None else max(fixed, NOISE_FACTOR * noise[0])
    return diff <= tol, tol


def _tolerance_text(tol: float, atol: float, rtol: float, scale: float, noise: list) -> str:
    text = f"tolerance {tol:.3g} = max(--onnx-atol {atol:g} + --onnx-rtol {rtol:g} × max |output| {scale:.3g}"
    return text + (f", {NOISE_FACTOR:g} × float32 noise {noise[0]:.3g})" if noise and noise[0] is not None else ")")


def ort_session(path: str, threads: int | None = None):
    """An onnxruntime CPU session as deployments make it (its threads spinning between operators)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


# ONNX Runtime places a session's intra-op threads when it starts, for the session's life: on this loaded 2-core
# machine about half the sessions of the 80 µs MobileNet sample ran at 0.09 ms and the others at 0.055 (at one thread,
# 0.05 every time), so a comparison times each model in several fresh sessions and reads the best
# (prunetool.measure.best_session)
SESSIONS = 7  # one a round of a comparison (measure.interleaved: 7 rounds)
SESSIONS_BYTES = 2 ** 31  # the sessions of one model held at once: their weights within this
REPORT_SESSIONS = 3  # fresh sessions an export's reported latency is the best of (one model alone: no pairing)


def ort_sessions(path: str, model: nn.Module, threads: int | None = None, count: int = SESSIONS) -> list:
    """``count`` fresh sessions of the export of ``model`` at ``path``, fewer where the model is large (their
    weights within :data:`SESSIONS_BYTES`; an export's weights may lie in files of their own), at least one."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return [ort_session(path, threads) for _ in range(max(1, min(count, SESSIONS_BYTES // max(size, 1))))]


def ort_runs(sessions: list, x: Batch, count: int) -> list:
    """The first ``count`` of one model's fresh ``sessions``, each a run on batch ``x``: one run of
    :func:`prunetool.measure.interleaved`, which times session ``r mod count`` in round ``r``."""
    feed = ort_feed(sessions[0], x)
    return [lambda s=s: s.run(None, feed) for s in sessions[:count]]


def ort_latency(session, example, batch_size: int, warmup: int = 3, runs: int = 30,
                budget_s: float = 0.5) -> list[float]:
    """Times of onnxruntime runs on a batch of ``batch_size``: random inputs of a shape (``example`` a tuple), or a
    batch's samples repeated."""
    if isinstance(example, tuple):
        feed = {session.get_inputs()[0].name:
                np.random.default_rng(0).standard_normal((batch_size, *example)).astype(np.float32)}
    else:
        feed = ort_feed(session, resized(example, batch_size))
    return timings(lambda: session.run(None, feed), warmup, max_runs=runs, budget_s=budget_s)


class Logits(nn.Module):
    """``model`` as exporters take it: positional tensors in, the logits out."""

    def __init__(self, model: nn.Module, keys: list[str] | None, output_key: str | None = None):
        super().__init__()
        self.model, self.keys, self.output_key = model, keys, output_key
        self.training = model.training  # exporters restore the wrapper's mode on every module: keep the model's

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.keys, inputs))) if self.keys else self.model(inputs[0])
        return logits(out, self.output_key)


def _inputs(x: Batch) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    if isinstance(x, torch.Tensor):
        return ["input"], (x,)
    return list(x), tuple(x.values())


def ort_feed(session, x: Batch) -> dict:
    """onnxruntime's feed for batch ``x``: the session's inputs in order, as numpy arrays."""
    names = [i.name for i in session.get_inputs()]
    _, values = _inputs(x)
    return {n: v.numpy() for n, v in zip(names, values)}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings of their own."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _native_quiet():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _native_quiet():
    """Descriptors 1 and 2 sent to the null device: torch's C++ side writes there past Python's streams (a
    TorchScript export that fails logs its whole graph, megabytes for a transformer, before the dynamo one runs)."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()  # what Python holds goes out before the descriptor moves
    saved = []
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:
                    continue  # closed: nothing to silence
                os.dup2(null.fileno(), fd)
            yield
    finally:
        _flush_c_streams()  # what C++ buffered goes to the null device too, not out later
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _flush_c_streams() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach this way (Windows): nothing buffered there
        pass


def _dims(x: Batch) -> list[dict[int, str]]:
    """Dynamic dimensions of each input: the batch, and the sequence of token inputs."""
    names, values = _inputs(x)
    return [{0: "batch", 1: "sequence"} if not v.dtype.is_floating_point and v.dim() == 2 else {0: "batch"}
            for v in values]


def _export(model: nn.Module, x: Batch, path: str, opset: int, exporter: str) -> None:
    names, values = _inputs(x)
    dims = _dims(x)
    with _quiet():
        if exporter == "torchscript":
            torch.onnx.export(model, tuple(v[:1] for v in values), path, input_names=names, output_names=["output"],
                              dynamic_axes={**dict(zip(names, dims)), "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        else:  # an example of batch 2: torch.export specialises dimensions of size 1
            shared = {label: torch.export.Dim(label) for label in ("batch", "sequence")}
            torch.onnx.export(model, tuple(v[:2] for v in values), path, input_names=names, output_names=["output"],
                              dynamic_shapes=(tuple({d: shared[label] for d, label in dd.items()} for dd in dims),),
                              dynamo=True, verbose=False, external_data=False)


def _first_line(e: Exception) -> str:
    text = str(e).replace("\x1b", "")
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:160]
    return type(e).__name__


def export_onnx(model: nn.Module, x: Batch, path: str | os.PathLike, atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, opset: int = DEFAULT_OPSET, latency_batches=(1,),
                shown_as: str | None = None, output_key: str | None = None) -> dict:
    """Export ``model`` to ``path``, check it, compare onnxruntime with PyTorch on ``x`` (batch ≥ 2); its latency
    at each of ``latency_batches``, the best median of up to :data:`REPORT_SESSIONS` fresh sessions."""
    import onnx

    path = str(path)
    model = Logits(model.eval().cpu(), None if isinstance(x, torch.Tensor) else list(x), output_key)
    _, values = _inputs(x)
    with torch.no_grad():
        want = model(*values).numpy()
    scale, fixed = tolerance(want, atol, rtol)
    noise, tried = [], []
    for exporter in ("torchscript", "dynamo"):
        try:
            _remove_external_data(path)
            _export(model, x, path, opset, exporter)
            onnx.checker.check_model(path)
            session = ort_session(path)
            got = session.run(None, ort_feed(session, x))[0]
        except Exception as e:
            tried.append(f"{exporter}: {_first_line(e)}")
            continue
        if got.shape != want.shape:
            tried.append(f"{exporter}: output shape {got.shape} differs from PyTorch's {want.shape}")
            continue
        diff = float(np.abs(got - want).max())
        ok, tol = within(diff, fixed, want, model, values, noise)
        if not ok:
            tried.append(f"{exporter}: output differs from PyTorch by {diff:.3g} "
                         f"({_tolerance_text(tol, atol, rtol, scale, noise)})")
            continue
        example = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else x
        sessions = [session, *ort_sessions(path, model, count=REPORT_SESSIONS - 1)] if latency_batches else []
        latency = {str(b): min(statistics.median(_settled(ort_latency, s, example, b)) for s in sessions)
                   for b in latency_batches}
        timed, sessions = len(sessions), None
        opset_used = next((o.version for o in onnx.load(path, load_external_data=False).opset_import
                           if o.domain in ("", "ai.onnx")), opset)
        return {"path": shown_as or path, "exporter": exporter, "opset": opset_used, "max_abs_diff": diff,
                "max_abs_output": scale, "tolerance": tol, "float32_noise": noise[0] if noise else None,
                "ort_latency_ms": latency, "ort_latency_sessions": timed}
    _remove_external_data(path)
    raise VerificationError(f"ONNX export of the result failed: {'; '.join(tried)}")


def _settled(timing, *args):
    """``timing(*args)`` after :data:`SETTLE_S` of rest: the threads of a session just timed spin a while, and on
    few cores they would slow the next one."""
    time.sleep(SETTLE_S)
    return timing(*args)


def _remove_external_data(path: str) -> None:
    """An exporter that failed half-way may have left its weights beside the file."""
    if os.path.exists(path + ".data"):
        os.unlink(path + ".data")


def export_pt2(model: nn.Module, x: Batch, path: str | os.PathLike, atol: float = DEFAULT_ATOL,
               rtol: float = DEFAULT_RTOL, shown_as: str | None = None, output_key: str | None = None) -> dict:
    """``torch.export`` with a dynamic batch dimension (and sequence, for tokens), saved to ``path``, loaded back
    with ``torch.export.load`` and compared with the PyTorch model on ``x`` (batch ≥ 2)."""
    path = str(path)
    model = Logits(model.eval().cpu(), None if isinstance(x, torch.Tensor) else list(x), output_key)
    _, values = _inputs(x)
    with torch.no_grad():
        want = model(*values)
    scale, fixed = tolerance(want.numpy(), atol, rtol)
    shared = {label: torch.export.Dim(label) for label in ("batch", "sequence")}
    dynamic = (tuple({d: shared[label] for d, label in dd.items()} for dd in _dims(x)),)  # forward(*inputs)
    try:
        with _quiet():
            program = torch.export.export(model, tuple(v[:2] for v in values), dynamic_shapes=dynamic)
            torch.export.save(program, path)
            loaded = torch.export.load(path)
            with torch.no_grad():
                got = loaded.module()(*values)
    except Exception as e:
        raise VerificationError(f"pt2 export of the result failed: {_first_line(e)}") from None
    if got.shape != want.shape:
        raise VerificationError(f"the pt2 program's output shape {tuple(got.shape)} differs from PyTorch's "
                                f"{tuple(want.shape)}")
    diff, noise = float((got - want).abs().max()), []
    ok, tol = within(diff, fixed, want.numpy(), model, values, noise)
    if not ok:
        raise VerificationError(f"the pt2 program's output differs from PyTorch by {diff:.3g} "
                                f"({_tolerance_text(tol, atol, rtol, scale, noise)})")
    return {"path": shown_as or path, "max_abs_diff": diff, "max_abs_output": scale, "tolerance": tol,
            "float32_noise": noise[0] if noise else None, "bytes": Path(path).stat().st_size}


# Rest before each session's calls in a round of a comparison: parked threads of the other session. Sessions whose
# threads may not spin run every operator's threads from sleep, which on 2 cores read a 1.08x cut (timed alone) as
# 1.9x; spinning sessions alternated without rest read 0.9x for a 1.29x cut on another machine
SETTLE_S = 0.02


class DeployedSpeed:
    """Speed-ups over ``dense`` at ``batch`` where the model ships: in onnxruntime (each model exported to a
    temporary file, checked by :func:`export_onnx` and held by :data:`SESSIONS` fresh sessions), or in PyTorch eager
    when the dense model does not export or on a ``device`` other than the CPU (``runtime`` says which). Each
    comparison runs the two in alternating rounds (:func:`prunetool.measure.interleaved`, resting :data:`SETTLE_S`
    before each session's calls so that each runs as it would alone): in PyTorch the median of the per-round
    ratios, in onnxruntime the ratio of the best sessions' medians (:func:`prunetool.measure.best_session`)."""

    def __init__(self, dense: nn.Module, example: Batch | tuple[int, ...], batch: int = 1,
                 output_key: str | None = None, threads: int | None = None, device: str = "cpu"):
        self.dense, self.example, self.batch = dense, example, batch
        self.output_key, self.threads = output_key, threads
        self.device = device
        self.dir = tempfile.TemporaryDirectory(prefix="prunetool-latency-")
        self.runtime, self.sessions = "pytorch", []
        if device != "cpu":  # served on the accelerator: PyTorch there (ONNX Runtime here runs on the CPU)
            return
        try:
            self.sessions = self._sessions(dense)
            self.runtime = "onnxruntime"
        except Exception as e:  # a graph ONNX cannot hold: time what PyTorch runs
            warnings.warn(f"latency is measured in PyTorch: the model does not export to ONNX ({_first_line(e)})")

    def _sessions(self, model: nn.Module) -> list:
        path = Path(self.dir.name) / "model.onnx"
        try:
            export_onnx(model, resized(self.example, 2, model), path, latency_batches=(), output_key=self.output_key)
            return ort_sessions(str(path), model, self.threads)
        finally:  # the session holds the graph: no file piles up
            for f in Path(self.dir.name).iterdir():
                f.unlink()

    def speedup(self, model: nn.Module, rounds: int = 7, budget_s: float = 2.0) -> dict:
        """``paired_speedup`` of ``model`` over the dense one (``speedup.p50``: in PyTorch the median per-round
        ratio, in onnxruntime the ratio of the best sessions)."""
        if self.runtime == "pytorch":
            where = [next(m.parameters()).device for m in (self.dense, model)]
            try:
                self.dense.to(self.device)
                model.to(self.device)
                return compare_latency(self.dense, model, self.example, self.batch, self.device, rounds, budget_s)
            finally:  # each back where it was (weights shared between the two move with either)
                model.to(where[1])
                self.dense.to(where[0])
        cut = self._sessions(model)
        k = min(len(self.sessions), len(cut))  # each model in k fresh sessions, one a round in turn
        x = resized(self.example, self.batch)
        times = interleaved([ort_runs(s, x, k) for s in (self.sessions, cut)], rounds, budget_s, settle=SETTLE_S)
        return paired_speedup(*times, sessions=k)

    def close(self) -> None:
        self.dir.cleanup()
