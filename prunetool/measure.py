"""Measure stage: parameters, MACs, accuracy and loss, latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from .batch import Batch, as_input, batch_len, batch_slice, batch_to, call, forward, model_dtype, resized
from .data import as_samples
from .distributed import reduce_sum
from .experts import eager
from .progress import QUIET, Bars
from .task import Fidelity, Quality, Tally


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, example: Batch | tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample's forward pass (matmuls and convolutions), via torch's FLOP counter;
    ``example`` is a batch (its first sample is counted) or one sample's shape."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, eager(model):  # experts one by one: torch counts no grouped matmul
        x = resized(example, 1, model, device)
        forward(model, x)
    return counter.get_total_flops() // 2


def quality_on(model: nn.Module, samples, output_key: str | None = None) -> Quality:
    """Accuracy, loss and the task's metric on labelled calibration samples."""
    dtype = model_dtype(model)
    tally = Tally()
    with torch.no_grad():
        for xb, yb, _ in as_samples(samples).batches(64):
            tally.add(call(model, batch_to(xb, None, dtype), output_key), yb)
    return tally.result()


def evaluate(model: nn.Module, loader: DataLoader | None, device: str = "cpu", bars: Bars = QUIET,
             label: str = "evaluating", output_key: str | None = None) -> Quality:
    """Top-1 accuracy (of samples, or of tokens), mean cross-entropy and the task's metric over ``loader``."""
    if loader is None:
        return Quality("accuracy", None, None)
    model.eval()
    tally = Tally()
    with torch.no_grad():
        for xb, yb in bars.track(loader, label, total=len(loader)):
            tally.add(call(model, as_input(xb, model, device), output_key), yb.to(device))
    tally.correct, tally.count, tally.loss_sum = (reduce_sum(tally.correct), reduce_sum(tally.count),
                                                  reduce_sum(tally.loss_sum))
    if tally.confusion is not None:  # segmentation: every process's shard of the pixels
        tally.confusion = reduce_sum(tally.confusion)
    return tally.result()


def fidelity(dense: nn.Module, small: nn.Module, inputs: Batch, device: str = "cpu", output_key: str | None = None,
             tokens: bool = False, batch: int = 16, metric: str | None = None) -> dict:
    """The cut model's outputs against the dense model's on ``inputs`` (no labels needed): ``metric``, by default
    the one that suits the output, cosine similarity and output error (:class:`prunetool.task.Fidelity`)."""
    tally = Fidelity(metric=metric, tokens=tokens)
    with torch.no_grad():
        for start in range(0, batch_len(inputs), batch):
            x = batch_slice(inputs, start, start + batch)
            tally.add(call(dense, as_input(x, dense, device), output_key).float().cpu(),
                      call(small, as_input(x, small, device), output_key).float().cpu())
    return {**tally.result(), "perfect": tally.perfect(), "samples": batch_len(inputs)}


def timings(run, warmup: int = 3, min_runs: int = 5, max_runs: int = 100, budget_s: float = 0.5) -> list[float]:
    """Wall times of ``run()`` in milliseconds after ``warmup`` untimed calls: at least ``min_runs``, then
    more until ``budget_s`` seconds have passed or ``max_runs`` are done."""
    for _ in range(warmup):
        run()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        times.append(1000.0 * (time.perf_counter() - t0))
    return times


def _forward(model: nn.Module, x: Batch):
    return model(**x) if isinstance(x, dict) else model(x)


def synced(model: nn.Module, x: Batch, device: str = "cpu"):
    """One eager forward pass of ``model`` on ``x`` as a callable to time, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        _forward(model, x)
        sync()

    return run


def forward_times(model: nn.Module, example: Batch | tuple[int, ...], batch_size: int, device: str = "cpu",
                  **kwargs) -> list[float]:
    """Times of eager forward passes on a batch of ``batch_size`` (random inputs of a shape, or ``example``'s
    samples repeated), synchronised on CUDA."""
    model.eval()
    x = resized(example, batch_size, model, device)
    with torch.inference_mode():
        return timings(synced(model, x, device), **kwargs)


def latency(model: nn.Module, example: Batch | tuple[int, ...], batch_size: int, device: str = "cpu",
            warmup: int = 3, min_runs: int = 5, max_runs: int = 100, budget_s: float = 0.5) -> float:
    """Median wall time of one forward pass in milliseconds, after warm-up."""
    return statistics.median(forward_times(model, example, batch_size, device, warmup=warmup,
                                           min_runs=min_runs, max_runs=max_runs, budget_s=budget_s))


def percentile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timing_stats(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"median_ms": median, "p10_ms": percentile(times, 0.1), "p90_ms": percentile(times, 0.9),
            "throughput": 1000.0 * batch / median, "runs": len(times)}


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_forward_mb(model: nn.Module, example: Batch | tuple[int, ...], batch: int, device: str) -> float | None:
    """Memory a forward pass at ``batch`` adds at its peak: CUDA's allocator peak, or on the CPU the growth of
    the process's resident high-water mark (reset through /proc/self/clear_refs)."""
    x = resized(example, batch, model, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            _forward(model, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_kb("VmRSS:")
    with torch.inference_mode():
        _forward(model, x)
    peak = _rss_kb("VmHWM:")
    return None if before is None or peak is None else max(0, peak - before) / 1024


NOISE = 0.2  # a speed-up is judged only when its p10–p90 range over measurement rounds is within ±20% of its median


def interleaved(runs: list, rounds: int = 7, budget_s: float = 2.0, warmup: int = 2,
                max_runs: int | None = None, settle: float = 0.0) -> list[list[list[float]]]:
    """Wall times in milliseconds of each of ``runs`` (callables, one timed call each) measured in alternating
    rounds, so that all see the same machine: ``warmup`` untimed calls of each, then ``rounds`` rounds in which
    each is called as often as fits ``budget_s`` over all rounds (at least once a round; with ``max_runs``, at most
    that often in all when it is at least ``rounds``). ``settle``: seconds of rest, then one untimed call, before
    each run's calls in a round, so that the threads the one before left spinning are parked and each is timed as
    it runs alone. A run may be a list of equivalent callables (fresh sessions of one model): round ``r`` calls its
    ``r mod len``-th, each warmed up. Returns, for each run, its times in each round."""

    def once(run) -> float:
        t0 = time.perf_counter()
        run()
        return 1000.0 * (time.perf_counter() - t0)

    alternatives = [run if isinstance(run, (list, tuple)) else [run] for run in runs]

    def at(run: int, r: int):
        return alternatives[run][r % len(alternatives[run])]

    for each in alternatives:
        for alternative in each:
            for _ in range(warmup):
                alternative()
    first = sum(once(at(i, 0)) for i in range(len(runs)))
    per_round = max(1, int(budget_s * 1000 / rounds / max(first, 1e-3)))
    if max_runs is not None:
        per_round = max(1, min(per_round, max_runs // rounds))
    times = [[] for _ in runs]
    for r in range(rounds):
        for i, kept in enumerate(times):
            call_ = at(i, r)
            if settle:
                time.sleep(settle)
                call_()
            kept.append([once(call_) for _ in range(per_round)])
    return times


def flat(rounds: list[list[float]]) -> list[float]:
    """All times of the rounds of :func:`interleaved`, in order."""
    return [t for r in rounds for t in r]


def session_medians(rounds: list[list[float]], sessions: int) -> list[float]:
    """The median of each of ``sessions`` sessions of one model timed in turn by :func:`interleaved` (round ``r``
    is session ``r mod sessions``'s), fastest first."""
    return sorted(statistics.median(flat(rounds[s::sessions])) for s in range(min(sessions, len(rounds))))


def best_session(rounds: list[list[float]], sessions: int) -> float:
    """The least of :func:`session_medians`: the time the model runs in when its session's threads are placed
    well."""
    return session_medians(rounds, sessions)[0]


def paired_speedup(base: list[list[float]], other: list[list[float]], sessions: int = 1) -> dict:
    """The speed-up of ``other`` over ``base`` from their rounds of :func:`interleaved`: ``speedup`` is the p10,
    p50 and p90 of the per-round ratios of medians (each round's pair saw the same machine), ``spread`` half their
    p10–p90 range over the p50, ``noisy`` when that is above ``NOISE`` (the ratio cannot be judged). With
    ``sessions`` (each model timed in that many fresh sessions in turn), the p50 is the ratio of the two
    :func:`best_session` times, and the p10/p90 are it and the ratio of the second best ones: a session's thread
    placement is drawn when it starts and lasts as long as it does, so rounds of different sessions disagree by
    more than the machine's noise, and the comparison is judged by whether its two best placements agree."""
    if sessions > 1 and min(len(base), len(other)) >= 2:
        b, o = session_medians(base, sessions), session_medians(other, sessions)
        best, second = b[0] / max(o[0], 1e-9), b[1] / max(o[1], 1e-9)
        speedup = {"p10": min(best, second), "p50": best, "p90": max(best, second)}
    else:
        ratios = [statistics.median(a) / max(statistics.median(b), 1e-9) for a, b in zip(base, other)]
        speedup = {"p10": percentile(ratios, 0.1), "p50": statistics.median(ratios), "p90": percentile(ratios, 0.9)}
    spread = (speedup["p90"] - speedup["p10"]) / 2 / max(speedup["p50"], 1e-9)
    return {"speedup": speedup, "spread": spread, "noisy": spread > NOISE}


def compare_latency(before: nn.Module, after: nn.Module, example: Batch | tuple[int, ...], batch: int,
                    device: str = "cpu", rounds: int = 7, budget_s: float = 2.0) -> dict:
    """Latency of two models measured in alternating rounds (:func:`interleaved`), with the spread of each and of
    the speed-up (:func:`paired_speedup`): the per-round ratios' p10, p50 and p90. ``noisy`` when the speed-up's
    p10–p90 range is wider than ±``NOISE`` of its median."""
    xa = resized(example, batch, before, device)
    xb = resized(xa, batch, after, device)
    before.eval()
    after.eval()
    with torch.inference_mode():
        times_a, times_b = interleaved([synced(before, xa, device), synced(after, xb, device)], rounds, budget_s)
    return {"batch": batch, "before": timing_stats(flat(times_a), batch), "after": timing_stats(flat(times_b), batch),
            **paired_speedup(times_a, times_b), "rounds": rounds}
