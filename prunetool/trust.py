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
a one-line error whose fix is ``--arch`` (the user then vouches for it). ``trust_remote_code`` recorded for a
Hugging Face model counts only in a signed file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
import typing
from pathlib import Path

from torch import nn

KEY_ENV = "PRUNETOOL_KEY"


def key_path() -> Path:
    """Where this machine's signing key lives."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "prunetool" / "key"


def _key(create: bool) -> bytes | None:
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError):
        return None
    try:  # O_EXCL: two runs starting together agree on one key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _message(arch: str, arch_kwargs: dict, root: str | None) -> bytes:
    return json.dumps({"arch": arch, "arch_kwargs": arch_kwargs, "arch_root": root}, sort_keys=True).encode()


def sign(arch: str, arch_kwargs: dict, root: str | None) -> str | None:
    """The signature a file records for its architecture; None when no key can be kept on this machine."""
    key = _key(create=True)
    return hmac.new(key, _message(arch, arch_kwargs, root), hashlib.sha256).hexdigest() if key else None


def signed(signature: str | None, arch: str, arch_kwargs: dict, root: str | None) -> bool:
    """Whether ``signature`` was made by this machine's key for exactly this architecture and arguments."""
    key = _key(create=False) if signature else None
    if key is None:
        return False
    want = hmac.new(key, _message(arch, arch_kwargs, root), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, str(signature))


def builds_module(obj) -> bool:
    """An ``nn.Module`` class, or a function annotated to return one: safe to call with any arguments."""
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    try:
        ret = typing.get_type_hints(obj).get("return")
    except Exception:
        ret = getattr(obj, "__annotations__", {}).get("return")
    return isinstance(ret, type) and issubclass(ret, nn.Module)


def standard_library(obj) -> bool:
    """A callable defined by Python itself (``os.system``, ``builtins.exec``, ``subprocess.run`` ...)."""
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".", 1)[0]
    return top in sys.stdlib_module_names or top in ("builtins", "")
