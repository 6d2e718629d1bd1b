"""The memory budget of the calibration passes: where kept tensors live, and how large batches may be.

Cached tensors (refit targets and stage activations together) stay on the device while they fit in three
quarters of ``memory`` bytes, and batches are sized to what is left. Beyond it, on a GPU they go to host memory
in float16; on the CPU, where host memory is what the budget bounds, they go unchanged to a temporary file (so
the budget changes where they live, never the result). Targets are read once, late, and leave first; a stage's
activations are given back as its last reader goes through them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from .errors import UsageError
from .groups import Trace

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _MALLOC_TRIM, _MALLOPT = _LIBC.malloc_trim, _LIBC.mallopt
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = _MALLOPT = None
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MAPPED_ALONE = 1 << 20  # bytes from which an allocation is mapped by itself


def trim_heap() -> None:
    """Hand freed heap memory back to the operating system. glibc keeps it otherwise: the many small tensors a
    pass frees leave holes that larger ones cannot reuse, and the process's resident size grows far past what it
    holds (2 GB more on resnet50's refit)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def map_large_alone() -> None:
    """Allocations of ``MAPPED_ALONE`` bytes or more get a mapping of their own, returned to the system when
    freed. glibc otherwise raises that threshold to the largest block freed so far (up to 32 MB), and the float32
    copies a half-precision model's calls make and free (tens of MB each, :mod:`prunetool.precision`) stay in the
    heap as holes: 2 GiB of a 1 B Llama's peak. Process-wide; every fresh page then costs a fault, which makes a
    half-precision run slower (docs/BENCHMARKS.md, "Memory"), so only such runs ask for it."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MAPPED_ALONE)


class Kept:
    """One kept tensor: where it lives (``tensor`` on the device, ``tensor`` in float16 on the host, or ``path``
    in the spill directory) and what to give back."""

    __slots__ = ("tensor", "path", "dtype", "shape", "nbytes")

    def __init__(self, tensor: torch.Tensor):
        self.tensor: torch.Tensor | None = tensor
        self.path: str | None = None
        self.dtype, self.shape = tensor.dtype, tensor.shape
        self.nbytes = tensor.numel() * tensor.element_size()  # what it takes of the budget (0 once spilled)


class Store:
    """Tensors kept for later, on the device while three quarters of the budget last (the rest is for the
    batches). Beyond that they go to host memory in float16 when the device is an accelerator; when the device is
    the CPU, whose memory the budget bounds, they go exactly to a temporary file (``TMPDIR``), deleted on release.
    Cold tensors (read once, late: the refit targets) leave the device first, to make room for hot ones (stage
    activations, read twice, at once)."""

    def __init__(self, settings):
        """``settings``: the run's :class:`prunetool.calibrate.Settings` (its ``memory`` and ``device``)."""
        self.settings = settings
        self.capacity = settings.memory - settings.memory // 4  # the last quarter is for the batches
        self.used = 0
        self.resident: dict[int, Kept] = {}  # id → cold entries on the device, oldest first
        self.disk = torch.device(settings.device).type == "cpu"  # where tensors past the budget go
        self.spilled = 0  # bytes written to the spill directory so far
        self._dir: str | None = None
        self._count = 0

    def keep(self, t: torch.Tensor, cold: bool = False) -> Kept:
        kept = Kept(t)
        if not t.dtype.is_floating_point:
            self.used += kept.nbytes
            return kept
        if self.used + kept.nbytes > self.capacity and not cold and self.resident:
            for other in list(self.resident.values()):
                if self.used + kept.nbytes <= self.capacity:
                    break
                self._spill(other)
            trim_heap()
        if self.used + kept.nbytes <= self.capacity:
            self.used += kept.nbytes
            if cold:
                self.resident[id(kept)] = kept
        else:
            kept.nbytes = 0  # never counted
            self._spill(kept)
        return kept

    def release(self, kept: Kept) -> None:
        self.resident.pop(id(kept), None)
        if kept.path is not None:
            os.remove(kept.path)
            kept.path = None
        elif kept.nbytes:
            self.used -= kept.nbytes
        kept.tensor, kept.nbytes = None, 0

    def get(self, kept: Kept) -> torch.Tensor:
        if kept.path is not None:
            raw = np.fromfile(kept.path, dtype=np.uint8)
            return torch.from_numpy(raw).view(kept.dtype).reshape(kept.shape).to(self.settings.device)
        return kept.tensor.to(self.settings.device, kept.dtype)  # itself when nothing moves

    def _spill(self, kept: Kept) -> None:
        t = kept.tensor.detach()
        self.used -= kept.nbytes
        self.resident.pop(id(kept), None)
        kept.nbytes = 0
        if not self.disk:
            kept.tensor = t.to("cpu", torch.float16)
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="prunetool-cache-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._count += 1
        path = os.path.join(self._dir, f"{self._count}.bin")
        try:
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)
        except OSError as e:
            raise UsageError(f"the calibration cache cannot write {path} ({e.strerror}); give it more memory "
                             "(--calib-memory) or point TMPDIR at a disk with room") from None
        self.spilled += t.numel() * t.element_size()
        kept.path, kept.tensor = path, None


def batch_size(trace: Trace, settings, backward: bool = False, reserve: int = 0) -> int:
    """Samples per batch so that a pass's activations fit in what the memory budget has left after the tensors
    already kept and ``reserve`` bytes the pass will keep (at least its last quarter; a forward keeps far fewer of
    its activations alive than a forward and backward)."""
    per_sample = max(1, trace.activation_bytes)
    kept = min(settings.cache().used + reserve, settings.cache().capacity)
    left = settings.memory - kept
    share = left / (per_sample if backward else per_sample / 2)
    return int(max(1, min(256 if backward else 64, share)))
