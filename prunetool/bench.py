"""``bench``: latency (median, p90), throughput and peak memory of checkpoints side by side, in PyTorch eager
and in onnxruntime."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import torch

from .errors import UsageError
from .export import export_onnx, ort_latency, ort_session
from .load import load
from .measure import forward_times, params
from .progress import Bars


def _percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _stats(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"median_ms": median, "p90_ms": _percentile(times, 0.9), "throughput": 1000.0 * batch / median,
            "runs": len(times)}


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_forward_mb(model, shape, batch, device) -> float | None:
    """Memory a forward pass at ``batch`` adds at its peak: CUDA's allocator peak, or on the CPU the growth
    of the process's resident high-water mark (reset through /proc/self/clear_refs)."""
    x = torch.randn((batch, *shape), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_kb("VmRSS:")
    with torch.inference_mode():
        model(x)
    peak = _rss_kb("VmHWM:")
    return None if before is None or peak is None else max(0, peak - before) / 1024


def bench(paths: list[str], input_shape: tuple[int, ...] | None = None, batch_sizes=(1, 32), threads: int | None = None,
          device: str = "cpu", onnx: bool = True, warmup: int = 5, runs: int = 50, arch: str | None = None,
          arch_kwargs: dict | None = None, unsafe_pickle: bool = False, progress: bool = False) -> dict:
    """Benchmark each checkpoint; ratios are to the first one."""
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)
    bars = Bars(progress)
    rows = []
    jobs = [(p, runtime) for p in paths for runtime in (("torch", "onnxruntime") if onnx else ("torch",))]
    models = {}
    for path, runtime in bars.track(jobs, "benchmarking"):
        if path not in models:
            ckpt = load(path, arch, arch_kwargs, unsafe_pickle)
            shape = input_shape or tuple(ckpt.record.get("input_shape") or ())
            if not shape:
                raise UsageError(f"{path} records no input shape; pass --input-shape, e.g. 1,28,28")
            models[path] = (ckpt.model.eval(), shape)
        model, shape = models[path]
        entry = {"checkpoint": str(path), "runtime": runtime, "params": params(model), "input_shape": list(shape),
                 "device": device if runtime == "torch" else "cpu", "batches": {}}
        if runtime == "torch":
            model.to(device)
            for b in batch_sizes:
                times = forward_times(model, shape, b, device, warmup=warmup, max_runs=runs, budget_s=1.0)
                entry["batches"][str(b)] = _stats(times, b)
            entry["peak_forward_mb"] = peak_forward_mb(model, shape, max(batch_sizes), device)
            model.to("cpu")
        else:
            fd, tmp = tempfile.mkstemp(suffix=".onnx")
            os.close(fd)
            try:
                export_onnx(model, torch.randn(2, *shape), tmp, latency_batches=())
                session = ort_session(tmp)
                if threads is not None:
                    import onnxruntime

                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = threads
                    session = onnxruntime.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
                for b in batch_sizes:
                    entry["batches"][str(b)] = _stats(ort_latency(session, shape, b, warmup, runs, 1.0), b)
                entry["peak_forward_mb"] = None
            finally:
                os.unlink(tmp)
        rows.append(entry)
    for entry in rows:
        first = next(r for r in rows if r["runtime"] == entry["runtime"])
        for b, stats in entry["batches"].items():
            stats["speedup_vs_first"] = first["batches"][b]["median_ms"] / stats["median_ms"]
    return {"command": "bench", "threads": torch.get_num_threads(), "batch_sizes": list(batch_sizes), "results": rows}
