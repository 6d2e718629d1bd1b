"""Options from ``prunetool.toml`` or ``[tool.prunetool]`` in ``pyproject.toml``; flags override them.

Top-level keys apply to every command that has the option; a table named after a command (``[shrink]``,
``[tool.prunetool.lowrank]``) applies to that command only. Keys are option names, with or without dashes
(``target-params`` or ``target_params``).
"""

from __future__ import annotations

import sys
from pathlib import Path

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
        if not path.is_file():
            raise UsageError(f"--config {explicit}: no such file")
    elif (cwd / "prunetool.toml").is_file():
        path = cwd / "prunetool.toml"
    elif (cwd / "pyproject.toml").is_file():
        path = cwd / "pyproject.toml"
    else:
        return {}, None
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML ({e}); fix the file or pass another --config") from None
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("prunetool", {})
    return data, str(path)


def default_map(table: dict, commands: dict, source: str) -> dict:
    """Click's ``default_map`` for every command from the config table."""
    names = {cmd: _option_names(command) for cmd, command in commands.items()}
    out: dict[str, dict] = {cmd: {} for cmd in commands}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in commands:
                raise UsageError(f"{source}: [{key}] is not a prunetool command; use one of {', '.join(commands)}")
            for option, v in value.items():
                param = names[key].get(option.replace("_", "-"))
                if param is None:
                    raise UsageError(f"{source}: [{key}] has unknown option {option!r}; see prunetool {key} --help")
                out[key][param] = v
            continue
        hits = [cmd for cmd in commands if key.replace("_", "-") in names[cmd]]
        if not hits:
            raise UsageError(f"{source}: unknown option {key!r}; options are the long flags without dashes")
        for cmd in hits:
            out[cmd].setdefault(names[cmd][key.replace("_", "-")], value)
    return out


def _option_names(command) -> dict[str, str]:
    found = {}
    for param in command.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                found[opt[2:]] = param.name
    return found
