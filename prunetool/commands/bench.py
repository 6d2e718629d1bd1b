"""``bench``: latency (median, p10, p90), throughput and peak memory of checkpoints side by side, in PyTorch eager
and in onnxruntime; ratios are to the first checkpoint."""

from __future__ import annotations

import os
import tempfile

import torch

from ..batch import shape_of
from ..data import random_tokens, vocabulary
from ..errors import UsageError
from ..export import export_onnx, ort_latency, ort_session
from ..load import load, upcast_half
from ..measure import forward_times, params, peak_forward_mb, timing_stats
from ..progress import Bars


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


def bench(paths: list[str], input_shape: tuple[int, ...] | None = None, batch_sizes=(1, 32), threads: int | None = None,
          device: str = "cpu", onnx: bool = True, warmup: int = 5, runs: int = 50, arch: str | None = None,
          arch_kwargs: dict | None = None, unsafe_pickle: bool = False, progress: bool = False,
          tokens: int | None = None, trust_remote_code: bool = False) -> dict:
    """Benchmark each checkpoint; ratios are to the first one. Inputs: random of ``input_shape``, or sequences of
    ``tokens`` random token ids (by default what each checkpoint records)."""
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
                export_onnx(model, torch.randn(2, *shape) if isinstance(shape, tuple) else shape, tmp,
                            latency_batches=())
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
