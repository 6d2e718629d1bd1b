"""Half-precision weights, computed in float32, onloaded where they are used.

A bfloat16/float16 checkpoint stays in its dtype in memory: a float32 copy of the whole model (and of the cut
model beside it) would double what the run holds. :class:`Compute` is a ``TorchFunctionMode`` that casts at the
point of use instead: a call that computes (a linear, a convolution, an embedding, a product...) gets float32
copies of the half-precision tensors it reads (a parameter always; any other one when the call also reads
float32), so every activation is float32 and every result is what the float32 model would give on the weights
as saved. The copies live for the call; for backward passes, a copy autograd keeps is stored as the half tensor
it came from and cast again when it is read (so a backward through the whole model never holds a float32 copy of
it). Calls that move, view or write tensors (``detach``, ``index_select``, ``copy_``...) are left alone: the cut
slices and sets weights in the checkpoint's dtype.

With a compute ``device`` (``--offload``), parameters stay in host memory and each call onloads the ones it reads
to the device (GPTQ's and llm-compressor's sequential pipelines do the same at the granularity of a block).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

HALF = (torch.float16, torch.bfloat16)

# calls that read or move a tensor without computing with it (and every in-place call: its name ends in "_")
_STRUCTURAL = frozenset("""
__get__ __set__ __getitem__ __setitem__ __len__ __repr__ __format__ __reduce_ex__ __deepcopy__ __hash__ __eq__
__ne__ __bool__ detach clone contiguous to type float double half bfloat16 cpu cuda view view_as reshape reshape_as
flatten unflatten t transpose permute movedim index_select narrow select split chunk unbind squeeze unsqueeze
expand expand_as numel size dim element_size data_ptr is_floating_point is_complex stride storage_offset
untyped_storage equal is_contiguous new_empty new_zeros new_ones new_full new_tensor empty_like zeros_like
ones_like full_like requires_grad_ tolist item numpy pin_memory share_memory_ is_pinned get_device nelement
""".split())


def _name(func) -> str:
    return getattr(func, "__name__", "") or ""


class Compute(TorchFunctionMode):
    """Computing calls read float32 copies of half-precision tensors (and, with ``device``, onload parameters to
    it). Enter it for the whole job (:func:`prunetool.commands.common.start`)."""

    def __init__(self, device: str | None = None, files: list[str] = ()):
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.files = list(files)  # the checkpoint's weight files (a Hugging Face cache links them to blobs)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.pages = FilePages()

    def __enter__(self):
        self.pages = FilePages.of_weight_files(self.files)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self.pages.close()
        out = super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in _STRUCTURAL or (name.endswith("_") and not name.endswith("__")):
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        mixed = any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in flat)
        moved = False
        for i, t in enumerate(flat):
            if not isinstance(t, torch.Tensor):
                continue
            half = t.dtype in HALF and (mixed or isinstance(t, nn.Parameter))
            away = self.device is not None and t.device != self.device and (isinstance(t, nn.Parameter) or half
                                                                            or t.device.type == "cpu")
            if half or away:
                flat[i] = self._onload(t, half)
                moved = True
        if moved:
            args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)

    def _onload(self, t: torch.Tensor, half: bool) -> torch.Tensor:
        up = t.to(device=self.device or t.device, dtype=torch.float32 if half else t.dtype)
        if half:
            self.pages.release(t)  # read from the checkpoint's file again when next needed
        if up is not t:  # autograd keeps the original, cast again when read (a graph kept alive, as a trace's
            up._prunetool_source = t  # outputs keep theirs, would otherwise hold a float32 copy of every weight)
        return up

    def _pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t  # a linear saves its weight's transpose: a view of the copy
        source = getattr(base, "_prunetool_source", None)
        if source is None or base.shape != source.shape or base.stride() != source.stride():
            return t.detach()  # not ``t``: a saved output would then hold its own grad_fn, a cycle gc cannot see
        return source, t.dtype, t.device, t.shape, t.stride(), t.storage_offset()

    def _unpack(self, packed):
        if isinstance(packed, tuple):
            source, dtype, device, shape, stride, offset = packed
            up = source.to(device=device, dtype=dtype).as_strided(shape, stride, offset)
            self.pages.release(source)
            return up
        return packed


class FilePages:
    """Pages of weights that are views of a checkpoint file mapped into memory (as ``from_pretrained`` maps
    safetensors shards), handed back to the page cache after each use and read from it again at the next: only
    the weights in use stay resident, the others are the file's. A page goes back only while it holds the
    file's bytes (``/proc/self/pagemap``: a file page, or neither present nor swapped); one written since loading
    is a private copy, in memory or swapped out, and dropping it would lose the write. Linux only; elsewhere
    nothing is released. The file must not change on disk while the job runs (it is read again)."""

    PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    _DONTNEED = 4  # madvise(2)

    def __init__(self, ranges: list[tuple[int, int]] | None = None):
        self.ranges = ranges or []
        self.held = False  # while timing: weights stay resident, as where the model is served
        self._pagemap = None
        self._madvise = None
        if self.ranges:
            try:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
                self._madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
                self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                self.ranges = []

    @classmethod
    def of_weight_files(cls, files: list[str] = ()) -> "FilePages":
        """The mappings of ``files`` and of any ``.safetensors`` file in this process now (the kernel lists a
        mapping under the file's resolved path)."""
        ranges, real = [], {os.path.realpath(f) for f in files}
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    path = fields[5].strip() if len(fields) == 6 else ""
                    if path.endswith(".safetensors") or path in real:
                        lo, hi = fields[0].split("-")
                        ranges.append((int(lo, 16), int(hi, 16)))
        except OSError:
            pass
        return cls(ranges)

    def covers(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in a mapped weight file."""
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        return t.device.type == "cpu" and any(lo <= start and end <= hi for lo, hi in self.ranges)

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap, self.ranges = None, []

    def release(self, t: torch.Tensor) -> None:
        """Hand back the whole pages of ``t`` if they lie in a mapped weight file and hold its bytes."""
        if self.held or not self.ranges or not t.is_contiguous() or not self.covers(t):
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first, last = -(-start // self.PAGE), end // self.PAGE  # whole pages only: the edges may hold others
        if last <= first:
            return
        raw = os.pread(self._pagemap, (last - first) * 8, first * 8)
        if len(raw) != (last - first) * 8:
            return
        entries = np.frombuffer(raw, dtype=np.uint64)
        present, swapped = entries >> np.uint64(63), (entries >> np.uint64(62)) & np.uint64(1)
        file = (entries >> np.uint64(61)) & np.uint64(1)
        if np.any((present & (file ^ np.uint64(1))) | swapped):
            return  # a private copy (written since loading, resident or swapped out): only this process has it
        self._madvise(first * self.PAGE, (last - first) * self.PAGE, self._DONTNEED)


def active() -> Compute | None:
    """The :class:`Compute` mode in force, if any."""
    from torch.overrides import _get_current_function_mode_stack

    return next((m for m in _get_current_function_mode_stack() if isinstance(m, Compute)), None)


def release(t: torch.Tensor) -> None:
    """Hand ``t``'s pages back to the weight file it is mapped from, under an active :class:`Compute` (a tensor
    the cut replaced by its slice, or one read outside a computing call)."""
    mode = active()
    if mode is not None:
        mode.pages.release(t)


@contextlib.contextmanager
def resident():
    """Mapped weights stay resident inside (latency is timed on weights in memory, as where the model is served:
    pages read again from the page cache at every call would slow the dense model more than the cut, whose new
    tensors are in memory anyway)."""
    mode = active()
    if mode is None:
        yield
        return
    before, mode.pages.held = mode.pages.held, True
    try:
        yield
    finally:
        mode.pages.held = before


def has_half(model: nn.Module) -> bool:
    return any(t.dtype in HALF for t in list(model.parameters()) + list(model.buffers()))
