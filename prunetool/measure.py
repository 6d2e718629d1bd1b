"""Measure stage: parameters, MACs, accuracy and loss, latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from .batch import Batch, as_input, call, resized
from .distributed import reduce_sum
from .progress import QUIET, Bars
from .task import Quality, Tally


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, example: Batch | tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample's forward pass (matmuls and convolutions), via torch's FLOP counter;
    ``example`` is a batch (its first sample is counted) or one sample's shape."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        x = resized(example, 1, model, device)
        model(**x) if isinstance(x, dict) else model(x)
    return counter.get_total_flops() // 2


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
    return tally.result()


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


def forward_times(model: nn.Module, example: Batch | tuple[int, ...], batch_size: int, device: str = "cpu",
                  **kwargs) -> list[float]:
    """Times of eager forward passes on a batch of ``batch_size`` (random inputs of a shape, or ``example``'s
    samples repeated), synchronised on CUDA."""
    model.eval()
    x = resized(example, batch_size, model, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        _forward(model, x)
        sync()

    with torch.inference_mode():
        return timings(run, **kwargs)


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


def compare_latency(before: nn.Module, after: nn.Module, example: Batch | tuple[int, ...], batch: int,
                    device: str = "cpu", rounds: int = 7, budget_s: float = 2.0) -> dict:
    """Latency of two models measured in alternating rounds (so that both see the same machine), with the spread
    of each and of the speed-up: the per-round ratios' p10, p50 and p90. ``noisy`` when the speed-up's p10–p90
    range is wider than ±``NOISE`` of its median."""
    xa = resized(example, batch, before, device)
    xb = resized(xa, batch, after, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    before.eval()
    after.eval()

    def once(model, x) -> float:
        t0 = time.perf_counter()
        _forward(model, x)
        sync()
        return 1000.0 * (time.perf_counter() - t0)

    with torch.inference_mode():
        for _ in range(2):  # warm-up
            once(before, xa)
            once(after, xb)
        first = once(before, xa) + once(after, xb)
        per_round = max(1, int(budget_s * 1000 / rounds / max(first, 1e-3)))
        times_a, times_b, ratios = [], [], []
        for _ in range(rounds):
            ta = [once(before, xa) for _ in range(per_round)]
            tb = [once(after, xb) for _ in range(per_round)]
            times_a += ta
            times_b += tb
            ratios.append(statistics.median(ta) / max(statistics.median(tb), 1e-9))
    speedup = {"p10": percentile(ratios, 0.1), "p50": statistics.median(ratios), "p90": percentile(ratios, 0.9)}
    spread = (speedup["p90"] - speedup["p10"]) / 2 / max(speedup["p50"], 1e-9)
    return {"batch": batch, "before": timing_stats(times_a, batch), "after": timing_stats(times_b, batch),
            "speedup": speedup, "spread": spread, "noisy": spread > NOISE, "rounds": rounds}
