"""``bench``: latency (median, p10, p90), throughput and peak memory of checkpoints side by side, in PyTorch eager
and in onnxruntime; ratios are to the first checkpoint. The checkpoints of a runtime are timed in alternating rounds
(:func:`prunetool.measure.interleaved`, as ``shrink`` times before and after), so each speed-up is the median of
per-round ratios (in onnxruntime, the ratio of the best of several fresh sessions), with its p10–p90 range and a
``noisy`` flag when the machine was too noisy to judge it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..batch import call, resized, shape_of
from ..data import random_tokens, vocabulary
from ..errors import UsageError
from ..export import SETTLE_S, export_onnx, ort_runs, ort_sessions
from ..load import load, upcast_half
from ..measure import best_session, flat, interleaved, paired_speedup, params, peak_forward_mb, synced, timing_stats
from ..options import BenchOptions, Measurement, Source
from ..progress import Bars
from ..task import OutputError

ROUNDS = 7  # alternating rounds per batch size (fewer when --runs is smaller)
BUDGET_S = 1.0  # seconds of timing per checkpoint and batch size


def _example(path, ckpt, input_shape, tokens, others=()):
    """One sample's shape, or (token models) two sequences of random ids. A checkpoint that records no input takes
    what another one compared with it records (a model and its compressed copy take the same inputs)."""
    record = ckpt.record if ckpt.record.get("input_shape") else next(
        (o.record for o in others if o.record.get("input_shape")), {})
    recorded = record.get("input_shape")
    if record.get("inputs") == "named" and tokens is None and input_shape is None:
        raise UsageError("these checkpoints take several named inputs (one was made from named arrays); bench times "
                         "one input tensor (--input-shape) or token ids (--tokens): time them in your own harness")
    if tokens is None and input_shape is None and recorded and record.get("inputs") == "tokens":
        tokens = recorded[0]
    if tokens is not None:
        vocab = vocabulary(ckpt.model)
        if vocab is None:
            raise UsageError(f"--tokens: {path} embeds no token ids; use --input-shape")
        return random_tokens(2, tokens, vocab, torch.Generator().manual_seed(0), ckpt.model)
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


def bench(paths: list[str], input_shape: tuple[int, ...] | None = None, batch_sizes=BenchOptions.batch_sizes,
          threads: int | None = None, device: str = Measurement.device, onnx: bool = BenchOptions.onnx,
          warmup: int = BenchOptions.warmup, runs: int = BenchOptions.runs, arch: str | None = None,
          arch_kwargs: dict | None = None, unsafe_pickle: bool = Source.unsafe_pickle, progress: bool = False,
          tokens: int | None = None, trust_remote_code: bool = Source.trust_remote_code,
          output_key: str | None = None) -> dict:
    """Benchmark each checkpoint; ratios are to the first one: the median of per-round ratios, the checkpoints timed
    in alternating rounds (``speedup_vs_first``, with ``speedup`` p10/p50/p90, ``spread`` and ``noisy`` as ``shrink``
    reports them). Each is called ``warmup`` times untimed, then at most ``runs`` times (at least once in each of
    ``min(7, runs)`` rounds, about a second each in all). In onnxruntime each is held by several fresh sessions
    (:data:`prunetool.export.SESSIONS`), one a round in turn, and its speed-up is the ratio of the best sessions'
    medians (``best_session_ms``): a session keeps the thread placement it started with. Inputs: random of
    ``input_shape``, or sequences of ``tokens`` random token ids (by default what each checkpoint records).
    ``output_key`` names the entry of a structured output that the ONNX export keeps (default: ``logits``, else the
    first tensor)."""
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
    runtimes = ("torch", "onnxruntime") if onnx else ("torch",)
    ckpts = {p: load(p, arch, arch_kwargs, unsafe_pickle, trust_remote_code) for p in dict.fromkeys(paths)}
    models = {}
    for path, ckpt in ckpts.items():
        upcast_half(ckpt.model)
        models[path] = (ckpt.model.eval(), _example(path, ckpt, input_shape, tokens, ckpts.values()))
        if onnx:
            _check_output(path, *models[path], output_key)
    rows = {(i, runtime): {"checkpoint": str(path), "runtime": runtime, "params": params(models[path][0]),
                           "input_shape": _shown(models[path][1]), "device": device if runtime == "torch" else "cpu",
                           "batches": {}}
            for i, path in enumerate(paths) for runtime in runtimes}
    rounds = min(ROUNDS, runs)
    with tempfile.TemporaryDirectory(prefix="prunetool-bench-") as tmp:
        for runtime in runtimes:
            if runtime == "torch":
                for model, _ in models.values():
                    model.to(device)
                runs_at, sessions = _torch_runs([models[p] for p in paths], device), 1
            else:
                runs_at, sessions = _ort_runs(models, paths, tmp, threads, output_key)
            for b in bars.track(batch_sizes, f"benchmarking ({runtime})"):
                with torch.inference_mode():
                    times = interleaved(runs_at(b), rounds, BUDGET_S * len(paths), warmup, runs,
                                        settle=SETTLE_S if runtime == "onnxruntime" else 0.0)
                for i, t in enumerate(times):
                    judged = paired_speedup(times[0], t, sessions)
                    best = {"sessions": sessions, "best_session_ms": best_session(t, sessions)} if sessions > 1 else {}
                    rows[i, runtime]["batches"][str(b)] = {**timing_stats(flat(t), b), **best,
                                                           "speedup_vs_first": judged["speedup"]["p50"], **judged}
            for i, path in enumerate(paths):
                model, shape = models[path]
                rows[i, runtime]["peak_forward_mb"] = (peak_forward_mb(model, shape, max(batch_sizes), device)
                                                       if runtime == "torch" else None)
            for model, _ in models.values():
                model.to("cpu")
    return {"command": "bench", "threads": torch.get_num_threads(), "batch_sizes": list(batch_sizes), "rounds": rounds,
            "results": list(rows.values())}


def _shown(shape) -> list:
    return list(shape) if isinstance(shape, tuple) else [shape_of(shape)[0], "tokens"]


def _torch_runs(models: list, device: str):
    """For a batch size, each model's timed eager forward pass (in the order given) on its own inputs."""
    return lambda b: [synced(model, resized(shape, b, model, device), device) for model, shape in models]


def _ort_runs(models: dict, paths: list[str], tmp: str, threads: int | None, output_key: str | None):
    """For a batch size, each checkpoint's timed onnxruntime run (in the order of ``paths``), exported into
    ``tmp`` once."""
    sessions = {}
    for path in dict.fromkeys(paths):
        model, shape = models[path]
        f = str(Path(tmp) / f"{len(sessions)}.onnx")
        export_onnx(model, _batch(shape), f, latency_batches=(), output_key=output_key)
        sessions[path] = ort_sessions(f, model, threads), shape
    k = min(len(s) for s, _ in sessions.values())  # each checkpoint in k fresh sessions, one a round in turn

    def at(b):
        return [ort_runs(held, resized(shape, b), k) for held, shape in map(sessions.get, paths)]

    return at, k
