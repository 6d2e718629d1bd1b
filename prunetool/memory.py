"""Say it before the run: the peak memory a job will take, from the checkpoint's size and the options, checked
against what the machine has before anything is loaded.

The estimate is measured, not derived (docs/BENCHMARKS.md, "Memory"): with weights kept in their dtype
(:mod:`prunetool.precision`), a run holds the dense model and the cut model beside it (sharing what the cut did
not change; the written file is checked without a copy), and on top of those the calibration budget
(``--calib-memory``) and the outputs of the checks (``OUTPUT_BYTES``). The dense weights of a half-precision
Hugging Face directory stay in its mapped files and are read on demand (:class:`prunetool.precision.FilePages`):
only the cut's new tensors and the weights in use are resident. With ``--offload`` the weights stay in host
memory and the device holds one call's weights at a time.
"""

from __future__ import annotations

import json
import os
import resource
import struct
from pathlib import Path

from .errors import UsageError

GB = 1 << 30
# Fitted on bf16 Llama-style models of 100 M to 1 B parameters (docs/BENCHMARKS.md, "Memory") and rounded up: held
# whole (prunetool's own files), each GiB of weights cost 2.23 GiB of peak; read on demand from a Hugging Face
# directory, about 1.5.
RUNTIME = int(0.5 * GB)  # torch and transformers imported, the interpreter, the data
MODEL_COPIES = 2.5  # the dense model, the cut beside it, the heap they leave behind
MAPPED_COPIES = 1.8  # read on demand: the cut's new tensors, the weights in use and their float32 copies
WORKSPACE = 1.1  # the calibration budget and the batches beyond it


def weights_bytes(checkpoint) -> int | None:
    """Bytes of the checkpoint's tensors (a Hugging Face directory: its weight files); None for a model in
    memory or a path that is not there (refused elsewhere)."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        return None
    path = Path(checkpoint)
    if path.is_dir():
        files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        return sum(f.stat().st_size for f in files) or None
    return path.stat().st_size if path.is_file() else None


def mapped(checkpoint) -> bool:
    """Whether the checkpoint is a Hugging Face directory whose safetensors hold half-precision weights only:
    ``from_pretrained`` maps those files, and a half-precision run reads them on demand (read from the files'
    headers, before anything is loaded)."""
    if not isinstance(checkpoint, (str, os.PathLike)) or not Path(checkpoint).is_dir():
        return False
    files = list(Path(checkpoint).glob("*.safetensors"))
    kinds = set()
    try:
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(n, 100 << 20)))
            if not isinstance(header, dict):
                return False
            kinds |= {str(v["dtype"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, RecursionError, struct.error):
        return False
    return bool(files) and bool(kinds) and kinds <= {"BF16", "F16"}


def copies(on_demand: bool) -> float:
    """How many times the checkpoint's size a run holds, its weights read on demand or whole."""
    return MAPPED_COPIES if on_demand else MODEL_COPIES


def estimate(weights: int, calib_memory: int, outputs: int, on_demand: bool = False) -> int:
    """Peak resident bytes of a run on a checkpoint of ``weights`` bytes, read on demand or whole (see the module
    docstring)."""
    return int(RUNTIME + copies(on_demand) * weights + WORKSPACE * calib_memory + outputs)


def available() -> int | None:
    """Bytes this process may still take: the memory the kernel calls available, or less under a cgroup limit."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def peak() -> int:
    """This process's peak resident bytes so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def size(n: float) -> str:
    return f"{n / GB:.1f} GiB" if n >= GB / 10 else f"{n / (1 << 20):.0f} MiB"


def check(checkpoint, calib_memory: int, outputs: int, device: str = "cpu", offload: bool = False) -> dict | None:
    """The estimate for this run, or a refusal (exit 2) naming what to change when the machine cannot hold it.
    On a GPU without ``offload`` the models live on the device, so its free memory is checked too."""
    weights = weights_bytes(checkpoint)
    if weights is None:
        return None
    on_demand = mapped(checkpoint)
    need = estimate(weights, calib_memory, outputs, on_demand)
    host = available()
    if host is not None and need > host:
        raise UsageError(
            f"this run needs about {size(need)} of memory (a {size(weights)} checkpoint held about "
            f"{copies(on_demand):g} times, with --calib-memory {size(calib_memory)}) and {size(host)} is available: "
            f"lower --calib-memory, close what else runs, or use a machine with more memory")
    result = {"estimate_bytes": need, "available_bytes": host, "weights_bytes": weights, "weights_on_demand": on_demand,
              "calib_memory_bytes": calib_memory, "outputs_bytes": outputs}
    if device.startswith("cuda") and not offload:
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        gpu = int(MODEL_COPIES * weights + WORKSPACE * calib_memory)  # on the device, the dense model is whole
        if gpu > free:
            raise UsageError(f"this run needs about {size(gpu)} of GPU memory and {device} has {size(free)} free: "
                             "add --offload (weights stay in host memory, each layer onloaded as it runs) or "
                             "lower --calib-memory")
        result["device_estimate_bytes"] = gpu
    return result
