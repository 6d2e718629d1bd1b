"""Which recorded architectures a file may make :func:`prunetool.load` call.

prunetool's own file names the callable that builds its model (``mynet:build``) and its arguments. A file from
elsewhere must never make ``load`` call an arbitrary callable with arguments from the file, so a recorded
callable is called only when one of these holds:

- it is an ``nn.Module`` class, or a function annotated to return one (``def build() -> nn.Module``);
- the file is **signed by this machine's key**: prunetool signs the architecture, its arguments and the folder it
  was imported from with an HMAC-SHA256 key kept in ``$PRUNETOOL_KEY`` (a file path) or
  ``~/.config/prunetool/key`` (created on first use, readable by its owner only). The user named that callable
  with ``--arch`` when the file was written, so every file written here reloads with no flags, from any folder,
  whatever builder it names. A team that writes files on one machine (CI) and loads them on another shares the
  key file through ``PRUNETOOL_KEY``.

Anything else (a plain function in a file from elsewhere, a callable of Python's standard library) is refused with
a one-line error whose fix is ``--arch`` (the user then vouches for it). An unsigned file is refused before any of
its code runs when it names a ``.py`` file, and imports only modules Python already finds (never from the working
directory or the folder the file records); its arguments may not make the builder fetch or read anything
(:func:`fetching_arguments`), and a recorded ``trust_remote_code`` counts only in a signed file.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
import sysconfig
import tempfile
import typing
from pathlib import Path

from torch import nn

KEY_ENV = "PRUNETOOL_KEY"
KEY_BYTES = 32


def key_path() -> Path:
    """Where this machine's signing key lives."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "prunetool" / "key"


def _read_key(path: Path) -> bytes | None:
    """The key in ``path``; None when it is missing, unreadable or too short to be one (an empty file or
    /dev/null never signs, nor accepts a signature)."""
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return key if len(key) >= KEY_BYTES else None


def _key(create: bool) -> bytes | None:
    path = key_path()
    key = _read_key(path)
    if key is not None or not create or path.exists():
        return key
    try:  # written whole under a temporary name, then linked into place: no run ever reads half a key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".key.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            os.link(tmp, path)  # fails if another run made the key first: theirs is kept
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError:
        return None
    return _read_key(path)


def _message(arch: str, arch_kwargs: dict, root: str | None) -> bytes:
    return json.dumps({"arch": arch, "arch_kwargs": arch_kwargs, "arch_root": root}, sort_keys=True).encode()


def sign(arch: str, arch_kwargs: dict, root: str | None) -> str | None:
    """The signature a file records for its architecture; None when no key can be kept on this machine."""
    key = _key(create=True)
    return hmac.new(key, _message(arch, arch_kwargs, root), hashlib.sha256).hexdigest() if key else None


def signed(signature: str | None, arch: str, arch_kwargs: dict, root: str | None) -> bool:
    """Whether ``signature`` was made by this machine's key for exactly this architecture and arguments."""
    key = _key(create=False) if signature else None
    if not key:
        return False
    want = hmac.new(key, _message(arch, arch_kwargs, root), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, str(signature))


def builds_module(obj) -> bool:
    """An ``nn.Module`` class, or a function annotated to return one: what an unsigned file may name (with
    arguments that fetch nothing, :func:`fetching_arguments`)."""
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    try:
        ret = typing.get_type_hints(obj).get("return")
    except Exception:
        ret = getattr(obj, "__annotations__", {}).get("return")
    return isinstance(ret, type) and issubclass(ret, nn.Module)


def standard_library(obj) -> bool:
    """A callable of Python itself (``os.system``, ``builtins.exec``, ``subprocess.run``, a ``functools.partial``
    of one, anything written in C), judged by the file its code comes from, not by its module's name (a user's
    ``nets/signal.py`` is not the standard library)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    code = getattr(getattr(obj, "__func__", obj), "__code__", None)
    if code is None:
        return True
    file = Path(code.co_filename).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return file.is_relative_to(stdlib) and not {"site-packages", "dist-packages"} & set(file.parts)


FETCHING = {"pretrained", "weights", "checkpoint", "url", "hub", "download"}  # anywhere in an argument's name
LOCATING = {"path", "paths", "file", "files", "dir", "url", "uri"}  # at its end (drop_path_rate is no path)


def fetching_arguments(kwargs: dict) -> list[str]:
    """Arguments of a recorded architecture that would make its builder read or fetch something of the file's
    choosing (``pretrained=True``, ``checkpoint_path=...``, ``pretrained_cfg_overlay={"url": ...}``, ``cache_dir``):
    an unsigned file may not set them."""
    def fetches(name: str) -> bool:
        words = name.lower().split("_")
        return bool(FETCHING & set(words)) or words[-1] in LOCATING
    return [k for k, v in kwargs.items() if v and fetches(k)]
