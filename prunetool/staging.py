"""All-or-nothing outputs: every file a command writes is staged beside its destination and moved into place
with the others only when the command commits; an error or an interrupt leaves no new file and no temporary
one. Outputs that collide with each other or with an input are refused before any work."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


DIRECTORY_OUTPUTS = ("--plots",)


def check_outputs(outputs: dict[str, str], inputs: dict[str, str] | None = None,
                  directories: tuple[str, ...] = DIRECTORY_OUTPUTS) -> None:
    """Refuse outputs that collide with each other or with an input, or cannot be written; one line each.
    ``directories``: flags whose output is a directory; an existing one is replaced only when empty or written
    by prunetool before (it holds ``prunetool.json``)."""
    folders = {Path(path).resolve(): flag for flag, path in outputs.items() if flag in directories}
    for flag, path in outputs.items():  # a directory output is replaced whole: nothing else may be written in it
        for folder, dflag in folders.items():
            if flag != dflag and Path(path).resolve().is_relative_to(folder):
                raise UsageError(f"{flag} {path} lies inside {dflag} {outputs[dflag]}, which is written as a whole; "
                                 f"put {flag} elsewhere")
    seen: dict[Path, str] = {}
    for flag, path in (inputs or {}).items():
        seen[Path(path).resolve()] = flag
    for flag, path in outputs.items():
        p = Path(path)
        resolved = p.resolve()
        if resolved in seen:
            other = seen[resolved]
            what = "the input" if other in (inputs or {}) else "the path of " + other
            raise UsageError(f"{flag} {path} is {what}; give each output its own path")
        seen[resolved] = flag
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir() and flag not in directories:
            raise UsageError(f"{flag} {path} is a directory; give a file path")
        if p.is_dir() and any(p.iterdir()) and not _written_by_us(p, flag):
            raise UsageError(f"{flag} {path} is a directory prunetool did not write; give a new path (it would be "
                             "replaced)")
        if not parent.is_dir():
            raise UsageError(f"cannot write {path}: directory {parent} does not exist; create it or choose another "
                             f"{flag}")
        if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise UsageError(f"cannot write {path}: permission denied; choose another {flag}")


def _written_by_us(folder: Path, flag: str) -> bool:
    """A folder an earlier run wrote: a model directory holds prunetool.json, a --plots folder only pictures."""
    if flag == "--plots":
        return all(f.is_file() and f.suffix == ".png" for f in folder.iterdir())
    return (folder / "prunetool.json").is_file()


class Staging:
    """Files staged for one command. Use as a context manager: leaving it by an exception discards them."""

    def __init__(self):
        self.files: dict[str, str] = {}  # destination → temporary file (or directory)
        self.committed = False

    def path(self, dest: str | os.PathLike, directory: bool = False) -> str:
        """A temporary path beside ``dest`` to write to; it becomes ``dest`` at :meth:`commit`."""
        dest = str(dest)
        self.discard_one(dest)
        p = Path(dest)
        parent = p.parent if str(p.parent) else Path(".")
        if directory:
            tmp = tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp" + p.suffix, dir=parent)
            os.close(fd)
        self.files[dest] = tmp
        return tmp

    def write(self, dest: str | os.PathLike, data: bytes) -> None:
        with open(self.path(dest), "wb") as f:
            f.write(data)

    def discard_one(self, dest: str) -> None:
        tmp = self.files.pop(dest, None)
        if tmp is not None:
            _remove(tmp)

    def commit(self) -> list[str]:
        """Move every staged file into place (mode as a plain write would give it); returns the paths."""
        mode = 0o666 & ~_umask()
        done = []
        for dest, tmp in list(self.files.items()):
            if os.path.isdir(tmp):
                os.chmod(tmp, 0o777 & ~_umask())
                for root, _, names in os.walk(tmp):
                    for name in names:
                        os.chmod(os.path.join(root, name), mode)
                if os.path.isdir(dest):
                    shutil.rmtree(dest)
            else:
                os.chmod(tmp, mode)
            os.replace(tmp, dest)
            done.append(dest)
            del self.files[dest]
        self.committed = True
        return done

    def discard(self) -> None:
        for tmp in self.files.values():
            _remove(tmp)
        self.files.clear()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after a commit there is nothing left to discard


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)
