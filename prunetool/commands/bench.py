"""``bench``: latency (median, p10, p90), throughput and peak memory of checkpoints side by side, in PyTorch eager
and in onnxruntime; ratios are to the first checkpoint."""

from __future__ import annotations

import os
import tempfile

import torch

from ..batch import call, shape_of
from ..data import random_tokens, vocabulary
from ..errors import UsageError
from ..export import export_onnx, ort_latency, ort_session
from ..load import load, upcast_half
from ..measure import forward_times, params, peak_forward_mb, timing_stats
from ..progress import Bars
from ..task import OutputError


def _example(path, ckpt, input_shape, tokens, others=()):
    """One sample's shape, or (token models) two sequences of random ids. A checkpoint that records no input takes
    what another one compared with it records (a model and its compressed copy take the same inputs)."""
    record = ckpt.record if ckpt.record.get("input_shape") else next(
        (o.record for o in others if o.record.get("input_shape")), {})
    recorded = record.get("input_shape")
    if tokens is None and input_shape is None and recorded and record.get("inputs") == "tokens":
        tokens = recorded[0]
    if tokens is not None:
        vocab = vocabulary(ckpt.model)
        if vocab is None:
            raise UsageError(f"--tokens: {path} embeds no token ids; use --input-shape")
        return random_tokens(2, tokens, vocab, torch.Generator().manual_seed(0))
    shape = input_shape or tuple(recorded or ())
    if not shape:
        raise UsageError(f"{path} records no input shape; pass --input-shape (e.g. 1,28,28) or --tokens (e.g. 128)")
    return shape


def _batch(shape):
    return torch.randn(2, *shape) if isinstance(shape, tuple) else shape


def _check_output(path, model, shape, output_key) -> None:
    """The exported graph keeps the logits: refuse, before any timing, an output the rule cannot read."""
    with torch.no_grad():
        try:
            call(model, _batch(shape), output_key)
        except OutputError as e:
            raise UsageError(f"{path}: {e}") from None


def bench(paths: list[str], input_shape: tuple[int, ...] | None = None, batch_sizes=(1, 32), threads: int | None = None,
          device: str = "cpu", onnx: bool = True, warmup: int = 5, runs: int = 50, arch: str | None = None,
          arch_kwargs: dict | None = None, unsafe_pickle: bool = False, progress: bool = False,
          tokens: int | None = None, trust_remote_code: bool = False, output_key: str | None = None) -> dict:
    """Benchmark each checkpoint; ratios are to the first one. Inputs: random of ``input_shape``, or sequences of
    ``tokens`` random token ids (by default what each checkpoint records). ``output_key`` names the entry of a
    structured output that the ONNX export keeps (default: ``logits``, else the first tensor)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads} must be at least 1")
        torch.set_num_threads(threads)
    if runs < 1:
        raise UsageError(f"--runs {runs} must be at least 1")
    if warmup < 0:
        raise UsageError(f"--warmup {warmup} must be 0 or more")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"--batch-sizes {','.join(map(str, batch_sizes))}: batch sizes must be at least 1")
    bars = Bars(progress)
    rows = []
    jobs = [(p, runtime) for p in paths for runtime in (("torch", "onnxruntime") if onnx else ("torch",))]
    ckpts = {p: load(p, arch, arch_kwargs, unsafe_pickle, trust_remote_code) for p in dict.fromkeys(paths)}
    models = {}
    for path, ckpt in ckpts.items():
        upcast_half(ckpt.model)
        models[path] = (ckpt.model.eval(), _example(path, ckpt, input_shape, tokens, ckpts.values()))
        if onnx:
            _check_output(path, *models[path], output_key)
    for path, runtime in bars.track(jobs, "benchmarking"):
        model, shape = models[path]
        entry = {"checkpoint": str(path), "runtime": runtime, "params": params(model),
                 "input_shape": list(shape) if isinstance(shape, tuple) else [shape_of(shape)[0], "tokens"],
                 "device": device if runtime == "torch" else "cpu", "batches": {}}
        if runtime == "torch":
            model.to(device)
            for b in batch_sizes:
                times = forward_times(model, shape, b, device, warmup=warmup, min_runs=min(5, runs), max_runs=runs,
                                      budget_s=1.0)
                entry["batches"][str(b)] = timing_stats(times, b)
            entry["peak_forward_mb"] = peak_forward_mb(model, shape, max(batch_sizes), device)
            model.to("cpu")
        else:
            fd, tmp = tempfile.mkstemp(suffix=".onnx")
            os.close(fd)
            try:
                export_onnx(model, _batch(shape), tmp, latency_batches=(), output_key=output_key)
                session = ort_session(tmp, threads)
                for b in batch_sizes:
                    entry["batches"][str(b)] = timing_stats(ort_latency(session, shape, b, warmup, runs, 1.0), b)
                entry["peak_forward_mb"] = None
            finally:
                os.unlink(tmp)
        rows.append(entry)
    for entry in rows:
        first = next(r for r in rows if r["runtime"] == entry["runtime"])
        for b, stats in entry["batches"].items():
            stats["speedup_vs_first"] = first["batches"][b]["median_ms"] / stats["median_ms"]
    return {"command": "bench", "threads": torch.get_num_threads(), "batch_sizes": list(batch_sizes), "results": rows}
