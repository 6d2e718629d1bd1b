"""Load stage: checkpoints in (state_dicts with an architecture, safetensors, pickled modules, prunetool's own
files) and prunetool's own files out.

prunetool's own file holds plain tensors and JSON, as ``.safetensors`` (tensors, JSON in the header's metadata)
or ``.pt`` (a dict that ``torch.load(weights_only=True)`` reads). Besides the weights it records the
*structure*: the architecture's import path and arguments, the layers a factorisation replaced, every simple
public module attribute that differs from a fresh build (``groups``, channel counts, container widths, head
counts), the state-dict version metadata some layers check, and a SHA-256 of the tensors. Loading rebuilds the
architecture, reapplies factorisations, resizes every parameter and buffer by key to the saved shape, restores
the attributes and checks the tensors against their hash. Files of format 1 still load.

A recorded architecture is called only if it is an ``nn.Module`` class, a function annotated to return one, or
any callable when the file was signed by this machine's key (:mod:`prunetool.trust`: every file prunetool writes
here reloads with no flags); ``--arch`` given by the user is taken as is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import hf, layers, trust
from .checkpoint import Checkpoint, cast_state, main_dtype
from .errors import UsageError

FORMAT_KEY = "prunetool_format"
FORMAT_VERSION = 2


# --- architectures ---------------------------------------------------------------------------------

def _source_root(module) -> str | None:
    """The directory to put on ``sys.path`` to import ``module`` again, unless it comes from site-packages."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = module.__name__.count(".") + (1 if path.name == "__init__.py" else 0)
    root = path.parents[depth]
    if "site-packages" in root.parts or "dist-packages" in root.parts:
        return None
    return str(root)


def import_arch(spec: str, root: str | None = None, recorded_in: str | None = None, signed: bool = False):
    """Resolve ``module.path:Callable`` or ``path/to/file.py:Callable``.

    ``recorded_in`` (a file) means the spec was read from that file rather than typed by the user. A file
    ``signed`` by this machine's key may name anything but Python's own callables, imported also from the working
    directory or ``root`` (where it was imported from when the file was written). An unsigned one may name only
    an ``nn.Module`` class or a function annotated to return one, in a module Python finds as it is: a ``.py``
    path is refused before it runs (:mod:`prunetool.trust`).
    """
    flag = f"the architecture recorded in {recorded_in}" if recorded_in else "--arch"
    if ":" not in spec:
        raise UsageError(f"{flag} {spec!r} is not MODULE:CALLABLE; write it like mypkg.nets:LeNet")
    mod_name, _, attr = spec.rpartition(":")
    foreign = recorded_in is not None and not signed
    if foreign and mod_name.endswith(".py"):
        raise UsageError(f"{recorded_in} names architecture {spec}, a file of its own, and was not written on this "
                         f"machine (no signature of {trust.key_path()}); pass --arch {spec} (arch= in Python) if you "
                         "trust the file")
    try:
        if mod_name.endswith(".py"):
            module = _import_file(mod_name, root, flag)
        elif foreign:
            module = _import_installed(mod_name, spec, recorded_in)
        else:
            module = _import_module(mod_name, root, flag, recorded_in)
    except UsageError:
        raise
    except Exception as e:  # the module itself fails: syntax error, exception at import
        raise UsageError(f"importing {mod_name} for {flag} fails ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}); fix that module") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{mod_name!r} has no attribute {attr!r}; check the name after ':' in {flag}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{flag} {spec!r} is not callable; name a class or factory function")
    if foreign and not trust.builds_module(obj):
        raise UsageError(f"{recorded_in} names architecture {spec}, a plain function, and was not written on this "
                         f"machine (no signature of {trust.key_path()}); pass --arch {spec} (arch= in Python) if you "
                         "trust the file")
    if recorded_in is not None and not trust.builds_module(obj) and trust.standard_library(obj):
        raise UsageError(f"{recorded_in} names architecture {spec}, a callable of Python itself, which prunetool never "
                         f"calls from a file; pass --arch {spec} if you mean it")
    return obj


def _import_installed(name: str, spec: str, recorded_in: str):
    """Import ``name`` only where Python finds it as it is (an unsigned file's architecture)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):
            raise
        raise UsageError(f"{recorded_in} names architecture {spec}, and was not written on this machine (no "
                         f"signature of {trust.key_path()}): pass --arch {spec} (arch= in Python) if you trust the "
                         "file") from None


def _cwd_on_path() -> None:
    """Modules in the working directory import as they do for ``python -m`` (the console script lacks it)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _import_module(name: str, root: str | None, flag: str, recorded_in: str | None):
    _cwd_on_path()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):
            raise  # the module exists but one of its own imports is missing
        if root and Path(root, *name.split(".")).with_suffix(".py").exists() or \
                root and Path(root, *name.split("."), "__init__.py").exists():
            sys.path.insert(0, root)
            warnings.warn(f"imported {name} from {root}, where {recorded_in or 'it'} was made")
            return importlib.import_module(name)
        where = f" (the file was made with it importable from {root})" if root else ""
        raise UsageError(f"cannot import {name!r} for {flag}{where}: install its package or add its folder to "
                         "PYTHONPATH, e.g. PYTHONPATH=/path/to/project") from None


def _import_file(path: str, root: str | None, flag: str):
    file = Path(path)
    if not file.is_file() and root and Path(root).is_file():
        file = Path(root)
    if not file.is_file():
        raise UsageError(f"{flag}: file {path} does not exist; check the path")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arch_source(spec: str) -> str | None:
    """The source file of ``spec``'s module, found without running it (None when it cannot be found)."""
    mod_name = spec.rpartition(":")[0]
    if mod_name.endswith(".py"):
        return mod_name
    _cwd_on_path()
    try:
        found = importlib.util.find_spec(mod_name)
    except Exception:  # a parent package fails to import: import_arch says so
        return None
    return found.origin if found is not None and found.has_location else None


def arch_root(spec: str) -> str | None:
    """Where ``spec``'s module lives, if it is not an installed package (recorded so reloads work elsewhere)."""
    mod_name = spec.rpartition(":")[0]
    if mod_name.endswith(".py"):
        return str(Path(mod_name).resolve())
    module = sys.modules.get(mod_name)
    return _source_root(module) if module is not None else None


def build_arch(spec: str, kwargs: dict | None = None, root: str | None = None,
               recorded_in: str | None = None, signed: bool = False) -> nn.Module:
    factory = import_arch(spec, root, recorded_in, signed)
    flag = f"the architecture recorded in {recorded_in}" if recorded_in else "--arch"
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise UsageError(f"cannot build {spec} with arguments {json.dumps(kwargs or {})} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                         f"check {flag} and --arch-kwargs") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{flag} {spec} returned {type(model).__name__}, not an nn.Module")
    return layers.prepare(model)


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


# --- state dicts -------------------------------------------------------------------------------------

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


def _fit_keys(state: dict, expected: set[str]) -> tuple[dict, str]:
    """Strip a common prefix such as ``module.`` or ``model.`` when that makes the keys fit; returns the keys
    and the prefix taken off."""
    best, best_prefix = state, ""
    current, prefix = state, ""
    while True:
        if expected <= set(current):
            return current, prefix
        heads = {k.split(".", 1)[0] for k in current}
        if len(heads) != 1 or not all("." in k for k in current):
            return best, best_prefix
        head = heads.pop()
        current = {k[len(head) + 1:]: v for k, v in current.items()}
        prefix += head + "."
        if len(set(current) & expected) > len(set(best) & expected):
            best, best_prefix = current, prefix


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
    """Give every parameter and buffer named in ``state`` its shape and dtype there (a cut model), creating
    parameters the cut added (a bias), then let each resized layer's width attributes follow."""
    changed: dict[str, dict[int, int]] = {}
    before = layers.widths(model)
    for key, t in state.items():
        mname, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            continue
        if attr in module._parameters:
            cur = module._parameters[attr]
            if cur is None or cur.shape != t.shape or cur.dtype != t.dtype:
                module._parameters[attr] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype),
                                                        requires_grad=True if cur is None else cur.requires_grad)
        elif attr in module._buffers:
            cur = module._buffers[attr]
            if cur is None or cur.shape != t.shape or cur.dtype != t.dtype:
                module._buffers[attr] = torch.empty(t.shape, dtype=t.dtype)
        else:
            continue
        if cur is not None and cur.shape != t.shape:
            sizes = changed.setdefault(mname, {})
            sizes.update({a: b for a, b in zip(cur.shape, t.shape) if a != b})
    layers.resync(model, changed, before)


def _simple(v) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v)


def _attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _simple(v)}


def attribute_diff(model: nn.Module, fresh: nn.Module) -> dict[str, dict]:
    """Simple public attributes of ``model``'s modules that differ from the same modules of ``fresh``."""
    fresh_modules = dict(fresh.named_modules())
    diff = {}
    for name, module in model.named_modules():
        other = fresh_modules.get(name)
        if other is None:
            continue
        mine, theirs = _attributes(module), _attributes(other)
        changed = {k: v for k, v in mine.items() if k not in theirs or theirs[k] != v}
        if changed:
            diff[name] = changed
    return diff


def restore_attributes(model: nn.Module, diff: dict[str, dict]) -> None:
    modules = dict(model.named_modules())
    for name, attrs in diff.items():
        module = modules.get(name)
        if module is None:
            continue
        for k, v in attrs.items():
            if isinstance(v, list) and isinstance(getattr(module, k, None), tuple):
                v = tuple(v)
            setattr(module, k, v)


def _versions(model: nn.Module) -> dict[str, dict]:
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {k: dict(v) for k, v in meta.items() if v}


def _with_versions(state: dict, versions: dict | None) -> dict:
    state = OrderedDict(state)
    if versions:
        state._metadata = OrderedDict((k, dict(v)) for k, v in versions.items())
    return state


def packed(t: torch.Tensor, seen: set | None = None) -> torch.Tensor:
    """``t`` on the CPU with unit strides in every dimension (``contiguous()`` keeps any stride on a dimension of
    size 1, a layer cut to one unit, which byte views and some writers refuse): ``t`` itself when it already is,
    else a copy. With ``seen`` (storages already packed), a tensor sharing one is copied too: safetensors writes
    no two names over the same bytes (tied weights)."""
    t = t.detach().cpu()
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= n
    plain = tuple(reversed(strides)) == t.stride() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if seen is not None and t.numel():
        plain = plain and t.untyped_storage().data_ptr() not in seen
        seen.add(t.untyped_storage().data_ptr())
    return t if plain else torch.empty(t.shape, dtype=t.dtype).copy_(t)


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = packed(state[key])
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # read in place: no copy of a large tensor
    return h.hexdigest()


# --- reading -----------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file; check the checkpoint path")
    if p.is_dir():
        raise UsageError(f"{p} is a directory; pass a checkpoint file (.pt, .pth or .safetensors)")
    return p.read_bytes()


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = struct.unpack("<Q", data[:8])[0]
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _stream_safetensors(path: Path, reuse: dict[str, torch.Tensor] | None = None) -> tuple[
        dict, dict[str, torch.Tensor], str, int]:
    """A safetensors file read tensor by tensor straight into tensors of their own (the whole file's bytes are never
    held beside them, as reading it first and parsing would), hashing the bytes as they pass: (metadata, tensors,
    SHA-256 of the file, size). The layout is checked as safetensors checks it (every tensor inside the data
    section, sized by its dtype and shape, none overlapping); ValueError otherwise, KeyError for a dtype it does not
    know here. ``reuse``: tensors already in memory that the file is expected to hold; a tensor read equal to its
    namesake there, bit for bit, is given as that one (the one read is dropped at once)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError("the header runs past the end of the file")
        raw = f.read(n)
        h.update(head)
        h.update(raw)
        header = json.loads(raw)
        start = pos = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        tensors = {}
        # with ``reuse``, each tensor is read into one scratch buffer and kept only when it differs: reading into
        # fresh tensors freed at once would leave the heap as large as the file (glibc keeps what is freed)
        scratch = torch.empty(0, dtype=torch.uint8)
        for key, info in entries:
            dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = (start + o for o in info["data_offsets"])
            if begin < pos or end > size or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key} overlaps another, lies outside the file or does not match its shape")
            if begin > pos:  # bytes between tensors: hashed, not kept
                h.update(f.read(begin - pos))
            mine = (reuse or {}).get(key)
            if mine is not None and end - begin > scratch.numel():
                scratch = torch.empty(end - begin, dtype=torch.uint8)
            t = scratch[:end - begin].view(dtype).reshape(shape) if mine is not None else \
                torch.empty(shape, dtype=dtype)
            if t.numel():
                buf = t.reshape(-1).view(torch.uint8).numpy()  # written by the read
                if f.readinto(buf) != len(buf):
                    raise ValueError(f"tensor {key} is cut short")
                h.update(buf)
            if mine is not None:
                same = mine.dtype == t.dtype and mine.shape == t.shape and mine.device == t.device and \
                    torch.equal(_bits(mine), _bits(t))
                t = mine if same else t.clone()
            tensors[key] = t
            pos = end
        h.update(f.read())
    return header.get("__metadata__") or {}, tensors, h.hexdigest(), size


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers of its width (NaNs and signed zeros compared as stored)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _own_or_state(meta: dict, tensors: dict) -> dict:
    """What a safetensors file holds: prunetool's own file (metadata and state dict), or a plain state dict."""
    if meta.get(FORMAT_KEY):
        return {FORMAT_KEY: int(meta[FORMAT_KEY]), "arch": meta.get("arch"), "arch_kwargs": meta.get("arch_kwargs", "{}"),
                "record": meta.get("record", "{}"), "structure": meta.get("structure", "{}"), "state_dict": tensors}
    return tensors


def _read_safetensors(data: bytes, path: str) -> dict:
    from safetensors.torch import load as st_load

    try:
        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = st_load(data)
    except Exception as e:
        raise UsageError(f"{path} is a damaged safetensors file ({str(e).splitlines()[0][:120]}); "
                         "write it again") from None
    return _own_or_state(meta, tensors)


def load(path: str | os.PathLike, arch: str | None = None, arch_kwargs: dict | None = None,
         unsafe_pickle: bool = False, trust_remote_code: bool = False,
         reuse: dict[str, torch.Tensor] | None = None) -> Checkpoint:
    """Load a checkpoint: prunetool's own file, a state_dict (``.pt`` or ``.safetensors``) with ``arch``, a Hugging
    Face model directory (:mod:`prunetool.hf`), or (if allowed) a pickled module.

    prunetool's own file needs no ``arch``: the callable it records is called when it is an ``nn.Module`` class,
    a function annotated ``-> nn.Module``, or any other builder when the file was signed by this machine's key
    (:mod:`prunetool.trust`; every file prunetool writes here is). A file from elsewhere that names a plain
    function raises :class:`UsageError` unless ``arch`` is given: passing it says you trust the file.

    ``reuse`` (a state dict in memory): a safetensors file's tensors that equal their namesakes there bit for bit
    are taken from it, so that checking a file just written costs no second copy of the model.
    """
    if hf.is_dir(path):
        if arch:
            raise UsageError(f"{path} is a Hugging Face model directory: its config names the architecture; drop "
                             "--arch")
        return hf.load_dir(path, trust_remote_code)
    if Path(path).is_dir():
        raise UsageError(f"{path} is a directory without config.json; pass a checkpoint file (.pt, .pth, "
                         ".safetensors) or a Hugging Face model directory")
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            first = f.read(9)
        n = struct.unpack("<Q", first[:8])[0] if len(first) == 9 else 0
        if 2 <= n <= p.stat().st_size - 8 and first[8:9] == b"{":  # safetensors: read tensor by tensor, never the
            # file's bytes and its tensors at once
            try:
                meta, tensors, sha, size = _stream_safetensors(p, reuse)
            except KeyError:  # a dtype only safetensors itself knows
                pass
            except Exception as e:
                raise UsageError(f"{path} is a damaged safetensors file ({str(e).splitlines()[0][:120]}); "
                                 "write it again") from None
            else:
                ckpt = _from_object(_own_or_state(meta, tensors), str(path), arch, arch_kwargs)
                ckpt.model.eval()
                ckpt.path, ckpt.sha256, ckpt.file_bytes = str(path), sha, size
                return ckpt
    data = _read(path)
    ckpt = from_bytes(data, str(path), arch, arch_kwargs, unsafe_pickle)
    ckpt.path, ckpt.sha256, ckpt.file_bytes = str(path), _sha256(data), len(data)
    return ckpt


def from_bytes(data: bytes, path: str = "<saved>", arch: str | None = None, arch_kwargs: dict | None = None,
               unsafe_pickle: bool = False) -> Checkpoint:
    """:func:`load` for the bytes of a file."""
    if _is_safetensors(data):
        obj = _read_safetensors(data, path)
    else:
        if not (data.startswith(b"PK\x03\x04") or data[:1] == b"\x80"):  # neither torch's zip nor a pickle
            raise UsageError(f"{path} is not a PyTorch checkpoint (nor safetensors); pass a file written by "
                             "torch.save or safetensors")
        _check_zip(data, path)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights_only" not in str(e) and "Unsupported global" not in str(e):
                raise UsageError(f"{path} is not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
            if not unsafe_pickle:
                raise UsageError(
                    f"{path} holds pickled Python objects (a whole nn.Module?); loading it can run arbitrary code: "
                    "pass --unsafe-pickle if you trust the file, or save a state_dict and pass --arch") from None
            obj = _unpickle(data, path)
        except Exception as e:  # zip/format errors from torch.load have no common type
            raise UsageError(f"{path} is not a PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    ckpt = _from_object(obj, path, arch, arch_kwargs)
    ckpt.model.eval()
    return ckpt


def _check_zip(data: bytes, path: str) -> None:
    """torch.save's zip archives carry a CRC-32 per entry, which torch.load does not check: check it."""
    if not data.startswith(b"PK\x03\x04"):
        return
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UsageError(f"{path} is a damaged or truncated checkpoint ({str(e).splitlines()[0][:100]}); copy or save "
                         "it again") from None
    if bad is not None:
        raise UsageError(f"{path} is damaged: {bad} fails its checksum; copy or save it again")


def _unpickle(data: bytes, path: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except AttributeError as e:  # a class pickled from a script's __main__
        raise UsageError(f"{path} holds a model whose class cannot be found ({str(e).splitlines()[0][:120]}); "
                         "it was probably defined in a script: save a state_dict and pass --arch") from None
    except Exception as e:
        raise UsageError(f"{path} cannot be unpickled ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _dtypes(state: dict) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in state.items() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point}


def _from_object(obj: Any, path: str, arch: str | None, arch_kwargs: dict | None) -> Checkpoint:
    if isinstance(obj, dict) and obj.get(FORMAT_KEY):
        return _from_own(obj, path, arch, arch_kwargs)
    if isinstance(obj, nn.Module):
        return Checkpoint(layers.prepare(obj), arch or _class_path(obj), arch_kwargs or {},
                          dtypes=_dtypes(obj.state_dict()))
    if isinstance(obj, dict):
        for key in ("model", "module", "net"):
            if isinstance(obj.get(key), nn.Module):
                return Checkpoint(layers.prepare(obj[key]), arch or _class_path(obj[key]), arch_kwargs or {},
                                  dtypes=_dtypes(obj[key].state_dict()))
        state = _find_state_dict(obj)
        if state is not None:
            if not arch:
                raise UsageError(f"{path} is a state_dict without its architecture; pass --arch MODULE:CALLABLE "
                                 "(e.g. torchvision.models:resnet18)")
            model = build_arch(arch, arch_kwargs)
            _load_into(model, state, path, f"--arch {arch}", "check --arch and --arch-kwargs")
            return Checkpoint(model, arch, arch_kwargs or {}, dtypes=_dtypes(state), arch_root=arch_root(arch))
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict or model; pass a checkpoint saved "
                     "with torch.save(model.state_dict(), ...)")


def _load_into(model: nn.Module, state: dict, path: str, what: str, fix: str, assign: bool = False) -> None:
    """Load ``state`` into ``model`` in the file's dtypes; ``assign``: the model takes the loaded tensors themselves
    (no second copy of the weights; tied parameters stay tied)."""
    versions = getattr(state, "_metadata", None)
    state, prefix = _fit_keys(state, set(model.state_dict()))
    if versions and prefix:
        versions = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in versions.items()}
    for key, t in state.items():  # keep the file's dtypes (a float16 checkpoint stays float16)
        mname, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            continue
        cur = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if cur is not None and cur.shape == t.shape and cur.dtype != t.dtype and t.dtype.is_floating_point:
            cur.data = cur.data.to(t.dtype)
    problem = _describe_mismatch(model, state)
    if problem:
        raise UsageError(f"{path} does not fit {what}: {problem}; {fix}")
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    try:
        model.load_state_dict(_with_versions(state, versions), strict=False, assign=assign)
    except Exception as e:  # a layer's own checks (MNASNet's version) fail
        raise UsageError(f"{path} does not load into {what} ({str(e).splitlines()[0][:160]}); {fix}") from None
    for names in tied.values():  # assigning gave each name its own tensor: one parameter again, as built
        if assign and len(names) > 1:
            first = model.get_parameter(names[0])
            for name in names[1:]:
                mname, _, attr = name.rpartition(".")
                model.get_submodule(mname)._parameters[attr] = first


def _from_own(obj: dict, path: str, arch: str | None, arch_kwargs: dict | None) -> Checkpoint:
    version = int(obj.get(FORMAT_KEY))
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} was written by a newer prunetool (format {version}); upgrade prunetool")
    record = json.loads(obj.get("record", "{}"))
    structure = json.loads(obj.get("structure", "{}")) if version >= 2 else {}
    state = obj["state_dict"]
    digest = structure.get("sha256")
    if digest is not None and tensor_digest(state) != digest:
        raise UsageError(f"{path} is damaged: its tensors do not match the checksum it was written with; "
                         "write it again from the source model")
    given = arch is not None
    arch = arch or obj.get("arch")
    kwargs = arch_kwargs if arch_kwargs else json.loads(obj.get("arch_kwargs", "{}"))
    if not arch:
        raise UsageError(f"{path} records no architecture; pass --arch MODULE:CALLABLE")
    root = structure.get("arch_root")
    signed = not given and trust.signed(structure.get("signature"), arch, kwargs, root)
    if not given and not signed and isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
        raise UsageError(f"{path} asks to run a Hugging Face model's own code (trust_remote_code) and was not "
                         "written on this machine; reload it from its directory with --trust-remote-code if you "
                         "trust it")
    if not given and not signed and isinstance(kwargs, dict) and (fetching := trust.fetching_arguments(kwargs)):
        raise UsageError(f"{path} was not written on this machine and sets {', '.join(fetching)} for {arch}, which "
                         f"would read or fetch what the file chooses; pass --arch {arch} (and --arch-kwargs) if you "
                         "trust it")
    with _NoRandomInit():  # every parameter comes from the file: drawing them first would only fill memory
        model = build_arch(arch, kwargs, root, None if given else path, signed)
    layers.refactor(model, record.get("factored", {}))
    resize_to_state_dict(model, state)
    restore_attributes(model, structure.get("attributes", {}))
    _load_into(model, _with_versions(state, structure.get("versions")), path, f"the architecture it records ({arch})",
               "the file or that architecture's code changed since it was written", assign=True)
    return Checkpoint(model, arch, kwargs, record, dtypes=_dtypes(state), arch_root=root)


class _NoRandomInit(TorchFunctionMode):
    """Initialisation skipped (the tensors are left as allocated, their pages untouched): for a model whose
    parameters a state dict is about to replace. Random draws are skipped, and any in-place write into a tensor of
    a million elements or more (an initialiser's arithmetic after its draw, a ``copy_``): a recorded Hugging Face
    architecture builds its full-size model in float32 first, which initialised would take twice the file's
    memory. Small tensors (norms, biases, counters) and buffers computed from a formula (rotary frequencies)
    are built as usual; the reload check compares outputs, so a buffer this left unwritten could not pass."""

    LARGE = 1 << 20

    SKIPPED = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                         "xavier_uniform_", "xavier_normal_", "orthogonal_", "bernoulli_", "exponential_",
                         "log_normal_", "cauchy_", "geometric_", "random_"})
    # An initialiser that draws again until every value is in range (torch's trunc_normal_) would read the skipped
    # draw's uninitialised memory and could loop for ever: a skipped tensor compares as in range.
    COMPARED = frozenset({"lt", "gt", "le", "ge", "__lt__", "__gt__", "__le__", "__ge__"})

    def __init__(self):
        super().__init__()
        self.undrawn: set[int] = set()  # data pointers of tensors whose draw was skipped

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if isinstance(target, torch.Tensor) and (name in self.SKIPPED or (
                name.endswith("_") and not name.endswith("__") and target.numel() >= self.LARGE)):
            if name in self.SKIPPED:
                self.undrawn.add(target.data_ptr())
            return target
        if name in self.COMPARED and isinstance(target, torch.Tensor) and target.data_ptr() in self.undrawn:
            return torch.zeros((), dtype=torch.bool, device=target.device).expand(target.shape)
        return func(*args, **kwargs)


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


# --- dtypes ------------------------------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)


def upcast_half(model: nn.Module) -> bool:
    """float16/bfloat16 parameters and buffers to float32 in place (the work is done in float32; the output is
    written back in the file's dtypes). Returns whether there were any."""
    found = False
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype in HALF:
                t.data = t.data.float()
                found = True
    return found


def round_through(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Round every floating tensor the file will hold through the dtype it is saved in, so that the model in
    memory computes exactly what the saved file will. A buffer the state dict leaves out (a rotary embedding's
    ``inv_freq``) is not saved but built anew at reload, in its own dtype: it is left as it is."""
    main = main_dtype(dtypes)
    saved = set(model.state_dict())
    with torch.no_grad():
        for key, t in list(model.named_parameters()) + list(model.named_buffers()):
            if key not in saved:
                continue
            dt = dtypes.get(key, main)
            if t.dtype.is_floating_point and dt is not None and dt != t.dtype:
                t.data = t.data.to(dt).to(t.dtype)


# --- writing -----------------------------------------------------------------------------------------

def fresh_build(arch: str, kwargs: dict, factored: dict) -> nn.Module | None:
    """The architecture as a new build would give it, on the meta device (no memory, no initialisation)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_arch(arch, kwargs)
    except Exception:
        try:
            model = build_arch(arch, kwargs)
        except Exception:
            return None
    layers.refactor(model, factored)
    return model


def structure_of(model: nn.Module, arch: str | None, arch_kwargs: dict | None, factored: dict,
                 state: dict[str, torch.Tensor], root: str | None = None) -> dict:
    """What a reload needs besides the tensors (see the module docstring)."""
    arch = arch or _class_path(model)
    fresh = fresh_build(arch, arch_kwargs or {}, factored)
    return {
        "attributes": attribute_diff(model, fresh) if fresh is not None else {},
        "versions": _versions(model),
        "sha256": tensor_digest(state),
        "arch_root": root if root is not None else arch_root(arch),
    }


def _contents(model: nn.Module, arch: str | None, arch_kwargs: dict | None, record: dict | None,
              dtypes: dict[str, torch.dtype] | None, root: str | None) -> tuple[dict, dict]:
    """The tensors of prunetool's file for ``model`` and its metadata (strings)."""
    record = record or {}
    seen: set = set()
    state = {k: packed(v, seen) for k, v in model.state_dict().items()}
    state = cast_state(state, dtypes)
    structure = structure_of(model, arch, arch_kwargs, record.get("factored", {}), state, root)
    arch = arch or _class_path(model)
    structure["signature"] = trust.sign(arch, arch_kwargs or {}, structure["arch_root"])
    meta = {FORMAT_KEY: str(FORMAT_VERSION), "arch": arch, "arch_kwargs": json.dumps(arch_kwargs or {}),
            "record": json.dumps(record), "structure": json.dumps(structure)}
    return state, meta


def _pickled(state: dict, meta: dict) -> dict:
    return {**meta, FORMAT_KEY: FORMAT_VERSION, "state_dict": state}


def serialize(model: nn.Module, arch: str | None, arch_kwargs: dict | None = None, record: dict | None = None,
              dtypes: dict[str, torch.dtype] | None = None, fmt: str = ".pt", root: str | None = None) -> bytes:
    """The bytes of prunetool's file format for ``model`` (``fmt``: ``.safetensors`` or ``.pt``)."""
    state, meta = _contents(model, arch, arch_kwargs, record, dtypes, root)
    if fmt == ".safetensors":
        from safetensors.torch import save as st_save

        return st_save(state, metadata=meta)
    buf = io.BytesIO()
    torch.save(_pickled(state, meta), buf)
    return buf.getvalue()


def write_file(path: str | os.PathLike, model: nn.Module, arch: str | None, arch_kwargs: dict | None = None,
               record: dict | None = None, dtypes: dict[str, torch.dtype] | None = None,
               root: str | None = None) -> int:
    """Write prunetool's file for ``model`` at ``path`` (its format by the name) straight from the model's
    tensors, with no copy of them in memory (what :func:`serialize` holds); returns the file's size."""
    state, meta = _contents(model, arch, arch_kwargs, record, dtypes, root)
    if format_of(path) == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=meta)
    else:
        torch.save(_pickled(state, meta), str(path))
    return os.path.getsize(path)


def format_of(path: str | os.PathLike) -> str:
    """``.safetensors`` or ``.pt`` by the file name (anything else is written as ``.pt``)."""
    return ".safetensors" if str(path).endswith(".safetensors") else ".pt"


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix) and rename, so no partial file is ever
    left."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp" + p.suffix, dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the result unreadable to others
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike, arch: str | None = None, arch_kwargs: dict | None = None,
         record: dict | None = None, dtypes: dict[str, torch.dtype] | None = None) -> int:
    """Save ``model`` in prunetool's format (atomically; ``.safetensors`` or ``.pt`` by the file name, written
    straight from its tensors); returns the file size in bytes."""
    write_atomic(path, lambda tmp: write_file(tmp, model, arch, arch_kwargs, record, dtypes))
    return os.path.getsize(path)
