"""Options from ``prunetool.toml`` or ``[tool.prunetool]`` in ``pyproject.toml``; flags override them.

Top-level keys apply to every command that has the option; a table named after a command (``[shrink]``,
``[tool.prunetool.lowrank]``) applies to that command only. Keys are option names, with or without dashes
(``target-params`` or ``target_params``). Every value is checked against its option's type when the file is
read, and an error names the file and the key. ``--no-config`` reads no file; ``--help`` never reads one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typing

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read(explicit: str | None, cwd: Path | None = None) -> tuple[dict, str | None]:
    """The option table and where it came from: ``--config FILE``, else ./prunetool.toml, else ./pyproject.toml."""
    cwd = cwd or Path.cwd()
    if explicit:
        path = Path(explicit)
        if not path.exists() or path.is_dir():
            raise UsageError(f"--config {explicit}: no such file")
    elif (cwd / "prunetool.toml").is_file():
        path = cwd / "prunetool.toml"
    elif (cwd / "pyproject.toml").is_file():
        path = cwd / "pyproject.toml"
    else:
        return {}, None
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid TOML ({e}); fix the file, pass another --config, or --no-config") \
            from None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); pass another --config or --no-config") from None
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("prunetool", {})
    return data, str(path)


def default_map(table: dict, commands: dict, source: str) -> dict:
    """Click's ``default_map`` for every command from the config table, each value checked."""
    params = {cmd: _options(command) for cmd, command in commands.items()}
    out: dict[str, dict] = {cmd: {} for cmd in commands}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in commands:
                raise UsageError(f"{source}: [{key}] is not a prunetool command; use one of {', '.join(commands)}")
            for option, v in value.items():
                param = params[key].get(option.replace("_", "-"))
                if param is None:
                    raise UsageError(f"{source}: [{key}] has unknown option {option!r}; see prunetool {key} --help")
                out[key][param.name] = _checked(param, v, f"{source}: [{key}] {option}")
            continue
        hits = [cmd for cmd in commands if key.replace("_", "-") in params[cmd]]
        if not hits:
            raise UsageError(f"{source}: unknown option {key!r}; options are the long flags without dashes")
        for cmd in hits:
            param = params[cmd][key.replace("_", "-")]
            out[cmd].setdefault(param.name, _checked(param, value, f"{source}: {key}"))
    return out


def _annotation(param):
    """The Python type of an option (Typer records it; ``Optional[float]`` is ``float``)."""
    descriptor = getattr(param, "type_descriptor", None)
    ann = getattr(descriptor, "annotation", None)
    for arg in typing.get_args(ann) or (ann,):
        if arg in (int, float, str, bool):
            return arg
    return None


def _checked(param, value, where: str):
    want = _annotation(param)
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), bool: isinstance(value, bool)}.get(want, not isinstance(value, (list, dict)))
    if not ok:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(want, "one value")
        raise UsageError(f"{where} = {value!r} is not {name}; fix the file or pass --no-config")
    return value


def _options(command) -> dict:
    found = {}
    for param in command.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                found[opt[2:]] = param
        for opt in getattr(param, "secondary_opts", []):
            if opt.startswith("--"):
                found[opt[2:]] = param
    return found
