"""All-or-nothing outputs: every file a command writes is staged beside its destination and moved into place
with the others only when the command commits; an error or an interrupt leaves no new file and no temporary
one. Outputs that collide with each other or with an input are refused before any work."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


DIRECTORY_OUTPUTS = ("--plots",)
# What each output flag writes, by suffix. A path without a suffix is accepted for the reports (a CI runner's
# $GITHUB_STEP_SUMMARY has none); a model file needs one (a Hugging Face directory output is checked as a folder).
SUFFIXES = {"--out": (".safetensors", ".pt", ".pth"), "--onnx": (".onnx",), "--pt2": (".pt2",),
            "--json": (".json",), "--summary-md": (".md", ".markdown"), "--html": (".html", ".htm")}
BARE = ("--json", "--summary-md", "--html")


def check_outputs(outputs: dict[str, str], inputs: dict[str, str] | None = None,
                  directories: tuple[str, ...] = DIRECTORY_OUTPUTS) -> None:
    """Refuse outputs that collide with each other or with an input, or cannot be written; one line each.
    ``inputs``: what it is ("the input checkpoint (CKPT)") → a file or folder the run reads (nothing may be written
    over it or inside it);
    ``directories``: flags whose output is a directory; an existing one is replaced only when empty or written
    by prunetool before (it holds ``prunetool.json``)."""
    inputs = {flag: Path(path).resolve() for flag, path in (inputs or {}).items() if path}
    folders = {Path(path).resolve(): flag for flag, path in outputs.items() if flag in directories}
    for flag, path in outputs.items():  # a directory output is replaced whole: nothing else may be written in it
        for folder, dflag in folders.items():
            if flag != dflag and Path(path).resolve().is_relative_to(folder):
                raise UsageError(f"{flag} {path} lies inside {dflag} {outputs[dflag]}, which is written as a whole; "
                                 f"put {flag} elsewhere")
        for iflag, source in inputs.items():
            if flag in directories and source != Path(path).resolve() and source.is_relative_to(Path(path).resolve()):
                raise UsageError(f"{flag} {path} holds {iflag} {source}, and is written as a whole; give {flag} "
                                 "a new path")
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        p = Path(path)
        resolved = p.resolve()
        for iflag, source in inputs.items():
            if resolved == source or (p.exists() and source.exists() and os.path.samefile(p, source)):
                raise UsageError(f"{flag} {path} would overwrite {iflag}; give each output its own path")
            if source.is_dir() and resolved.is_relative_to(source):
                raise UsageError(f"{flag} {path} lies inside {iflag} {source}; write it elsewhere (an input is never "
                                 "modified)")
        if resolved in seen:
            raise UsageError(f"{flag} {path} is the path of {seen[resolved]}; give each output its own path")
        seen[resolved] = flag
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir() and flag not in directories:
            raise UsageError(f"{flag} {path} is a directory; give a file path")
        _check_suffix(flag, str(path), flag in directories)
        if p.exists() and not p.is_dir() and not p.is_file():
            raise UsageError(f"{flag} {path} is not a regular file (a device or a pipe); give a file path")
        if p.is_dir() and any(p.iterdir()) and not _written_by_us(p, flag):
            raise UsageError(f"{flag} {path} is a directory prunetool did not write; give a new path (it would be "
                             "replaced)")
        if not parent.is_dir():
            raise UsageError(f"cannot write {path}: directory {parent} does not exist; create it or choose another "
                             f"{flag}")
        if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise UsageError(f"cannot write {path}: permission denied; choose another {flag}")


def _check_suffix(flag: str, path: str, directory: bool) -> None:
    """A file output's name must say what is written in it."""
    if directory:
        return
    if path.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {path} names a folder; give a file path, e.g. {path}{_example(flag)}")
    allowed = SUFFIXES.get(flag)
    if allowed is None:
        return
    suffix = Path(path).suffix.lower()
    if suffix in allowed or (not suffix and flag in BARE):
        return
    what = f"a {allowed[0]} file" if len(allowed) == 1 else f"{' or '.join(allowed)}"
    raise UsageError(f"{flag} {path}: {flag} writes {what}, not {suffix or 'a file without suffix'}; name it like "
                     f"{Path(path).with_suffix('').name}{allowed[0]}")


def _example(flag: str) -> str:
    return {"--out": "model.safetensors", "--onnx": "model.onnx", "--pt2": "model.pt2", "--json": "report.json",
            "--summary-md": "summary.md", "--html": "report.html"}.get(flag, "file")


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
        """Move every staged file into place (mode as a plain write would give it); returns the paths. All or
        nothing: should one move fail, the files already moved are taken back and what they replaced restored."""
        mode = 0o666 & ~_umask()
        done: list[tuple[str, str | None]] = []  # destination, and the old file or folder moved aside for it
        with _signals_held():
            return self._commit(mode, done)

    def _commit(self, mode: int, done: list[tuple[str, str | None]]) -> list[str]:
        try:
            for dest, tmp in list(self.files.items()):
                if os.path.isdir(tmp):
                    os.chmod(tmp, 0o777 & ~_umask())
                    for root, _, names in os.walk(tmp):
                        for name in names:
                            os.chmod(os.path.join(root, name), mode)
                else:
                    os.chmod(tmp, mode)
                old = _aside(dest) if os.path.lexists(dest) else None
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    if old is not None:
                        os.replace(old, dest)
                    raise
                del self.files[dest]
                done.append((dest, old))
        except BaseException:
            hidden = []
            for dest, old in reversed(done):  # every one is tried, whatever the others do
                try:
                    _remove(dest)
                    if old is not None:
                        os.replace(old, dest)
                except OSError:
                    hidden.append(f"{dest} (kept as {old})")
            if hidden:
                raise UsageError(f"writing the outputs failed and could not be taken back: {', '.join(hidden)}; "
                                 "move them back by hand") from None
            raise
        for _, old in done:
            if old is not None:
                _remove(old)
        self.committed = True
        return [dest for dest, _ in done]

    def discard(self) -> None:
        for tmp in self.files.values():
            _remove(tmp)
        self.files.clear()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after a commit there is nothing left to discard


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the moves are done or taken back (held on the main thread only)."""
    held = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if held else None
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _aside(dest: str) -> str:
    """Move ``dest`` to a fresh hidden name beside it (kept until the commit is complete); returns that name."""
    p = Path(dest)
    parent = p.parent if str(p.parent) else Path(".")
    aside = tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".old", dir=parent)
    os.rmdir(aside)  # a free name on the same file system, so the move is a rename
    os.replace(dest, aside)
    return aside


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)
