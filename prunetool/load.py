"""Load stage: checkpoints (state_dict + architecture, pickled module, prunetool's own files) and saving.

prunetool's own files are plain dicts of tensors and primitives, so they load with
``torch.load(weights_only=True)``. The architecture is rebuilt from its import path and then
resized to the saved tensor shapes, so a shrunk model reloads without pickle.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .factor import refactor

FORMAT_KEY = "prunetool_format"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded model and where it came from."""

    model: nn.Module
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    file_bytes: int | None = None


def import_arch(spec: str):
    """Resolve ``module.path:Callable`` or ``path/to/file.py:Callable``."""
    if ":" not in spec:
        raise UsageError(f"--arch {spec!r} is not MODULE:CALLABLE; write it like mypkg.nets:LeNet")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name)
            if not file.is_file():
                raise UsageError(f"--arch file {mod_name} does not exist; check the path")
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except UsageError:
        raise
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} for --arch ({e}); check the module path or PYTHONPATH") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{mod_name!r} has no attribute {attr!r}; check the name after ':' in --arch")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--arch {spec!r} is not callable; name a class or factory function")
    return obj


def build_arch(spec: str, kwargs: dict | None = None) -> nn.Module:
    factory = import_arch(spec)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as e:
        raise UsageError(f"cannot build {spec} with --arch-kwargs {json.dumps(kwargs or {})}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def parse_arch_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--arch-kwargs is not valid JSON ({e.msg}); write it like '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object, like '{\"num_classes\": 10}'")
    return value


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: dict) -> dict | None:
    if _is_state_dict(obj):
        return obj
    for key in ("state_dict", "model_state_dict", "model", "net", "module"):
        if key in obj and _is_state_dict(obj[key]):
            return obj[key]
    return None


def _fit_keys(state: dict, expected: set[str]) -> dict:
    """Strip a common prefix such as ``module.`` or ``model.`` when that makes the keys fit."""
    best = state
    current = state
    while True:
        if expected <= set(current):
            return current
        heads = {k.split(".", 1)[0] for k in current}
        if len(heads) != 1 or not all("." in k for k in current):
            return best
        head = heads.pop()
        current = {k[len(head) + 1:]: v for k, v in current.items()}
        if len(set(current) & expected) > len(set(best) & expected):
            best = current


def _describe_mismatch(model: nn.Module, state: dict) -> str | None:
    own = model.state_dict()
    # BatchNorm's step counter is absent from old checkpoints and unused in eval: not worth refusing over
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if shapes:
        parts.append(f"shape of {', '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
    return "; ".join(parts) or None


def resize_to_state_dict(model: nn.Module, state: dict) -> None:
    """Give every Linear/Conv/BatchNorm the tensor shapes found in ``state`` (a shrunk model)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for pname in ("weight", "bias"):
            key = prefix + pname
            if key not in state:
                continue
            cur = getattr(module, pname, None)
            if cur is None and pname == "bias" and isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
                module.bias = nn.Parameter(torch.empty_like(state[key]))
            elif isinstance(cur, nn.Parameter) and cur.shape != state[key].shape:
                setattr(module, pname, nn.Parameter(torch.empty_like(state[key])))
        for bname, buf in list(module.named_buffers(recurse=False)):
            key = prefix + bname
            if key in state and buf is not None and buf.shape != state[key].shape:
                module.register_buffer(bname, torch.empty_like(state[key]))
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd):
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase) and module.weight is not None:
            module.num_features = module.weight.shape[0]
        elif isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
            module.num_features = module.running_mean.shape[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file; check the checkpoint path")
    if p.is_dir():
        raise UsageError(f"{p} is a directory; pass a checkpoint file (.pt/.pth)")
    return p.read_bytes()


def load(path: str | os.PathLike, arch: str | None = None, arch_kwargs: dict | None = None,
         unsafe_pickle: bool = False) -> Checkpoint:
    """Load a checkpoint: prunetool's own file, a state_dict with ``arch``, or (if allowed) a pickled module."""
    data = _read(path)
    digest = _sha256(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise UsageError(f"{path} is not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
        if not unsafe_pickle:
            raise UsageError(
                f"{path} holds pickled Python objects (a whole nn.Module?); loading it can run arbitrary code: "
                "pass --unsafe-pickle if you trust the file, or save a state_dict and pass --arch") from None
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # zip/format errors from torch.load have no common type
        raise UsageError(f"{path} is not a PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None

    ckpt = _from_object(obj, str(path), arch, arch_kwargs)
    ckpt.path, ckpt.sha256, ckpt.file_bytes = str(path), digest, len(data)
    ckpt.model.eval()
    return ckpt


def _from_object(obj: Any, path: str, arch: str | None, arch_kwargs: dict | None) -> Checkpoint:
    if isinstance(obj, dict) and obj.get(FORMAT_KEY):
        return _from_own(obj, path, arch, arch_kwargs)
    if isinstance(obj, nn.Module):
        return Checkpoint(obj, arch or _class_path(obj), arch_kwargs or {})
    if isinstance(obj, dict):
        for key in ("model", "module", "net"):
            if isinstance(obj.get(key), nn.Module):
                return Checkpoint(obj[key], arch or _class_path(obj[key]), arch_kwargs or {})
        state = _find_state_dict(obj)
        if state is not None:
            if not arch:
                raise UsageError(f"{path} is a state_dict without its architecture; pass --arch MODULE:CALLABLE "
                                 "(e.g. torchvision.models:resnet18)")
            model = build_arch(arch, arch_kwargs)
            _load_into(model, state, path, arch)
            return Checkpoint(model, arch, arch_kwargs or {})
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict or model; pass a checkpoint saved "
                     "with torch.save(model.state_dict(), ...)")


def _load_into(model: nn.Module, state: dict, path: str, arch: str) -> None:
    state = _fit_keys(state, set(model.state_dict()))
    problem = _describe_mismatch(model, state)
    if problem:
        raise UsageError(f"{path} does not fit --arch {arch}: {problem}; check --arch and --arch-kwargs")
    model.load_state_dict(state, strict=False)


def _from_own(obj: dict, path: str, arch: str | None, arch_kwargs: dict | None) -> Checkpoint:
    record = json.loads(obj.get("record", "{}"))
    arch = arch or obj.get("arch")
    kwargs = arch_kwargs if arch_kwargs else json.loads(obj.get("arch_kwargs", "{}"))
    if not arch:
        raise UsageError(f"{path} records no architecture; pass --arch MODULE:CALLABLE")
    model = build_arch(arch, kwargs)
    state = obj["state_dict"]
    refactor(model, record.get("factored", {}))
    resize_to_state_dict(model, state)
    _load_into(model, state, path, arch)
    return Checkpoint(model, arch, kwargs, record)


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def serialize(model: nn.Module, arch: str | None, arch_kwargs: dict | None = None, record: dict | None = None) -> bytes:
    """The bytes of prunetool's file format for ``model``."""
    payload = {
        FORMAT_KEY: FORMAT_VERSION,
        "arch": arch or _class_path(model),
        "arch_kwargs": json.dumps(arch_kwargs or {}),
        "record": json.dumps(record or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def check_writable(path: str | os.PathLike, source: str | None = None) -> None:
    """Fail early (before any work) if ``path`` cannot be written or would overwrite the input."""
    p = Path(path)
    if source is not None and p.exists() and p.resolve() == Path(source).resolve():
        raise UsageError(f"--out {p} is the input checkpoint; choose another output path")
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"--out {p} is a directory; give a file path")
    if not parent.is_dir():
        raise UsageError(f"cannot write {p}: directory {parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"cannot write {p}: permission denied; choose another --out")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename, so no partial file is ever left."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the result unreadable to others
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike, arch: str | None = None, arch_kwargs: dict | None = None,
         record: dict | None = None) -> int:
    """Save ``model`` in prunetool's format (atomically); returns the file size in bytes."""
    data = serialize(model, arch, arch_kwargs, record)
    write_atomic(path, data)
    return len(data)
