"""The command line's options, made from the option dataclasses of :mod:`prunetool.options`.

A command names its flags in the order ``--help`` lists them, and the dataclasses it fills (:func:`command`). Each
flag takes its default, help text and type from the first of those dataclasses with a field that bears it; a
flag that several of them bear sets all those fields (``lowrank --max-drop`` is the search's bound and the budget).
The command's function receives a :class:`Given`: ``given.make(ShrinkOptions)`` is that dataclass filled from the
flags, a value the command line writes as text (``1.5G``, ``1,32``, JSON) read as the field's :class:`Flag` says
(:data:`TEXT`); ``given["--json"]`` is one flag's value.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Callable, Optional

import typer

from .data import Preprocessing, parse_shape
from .errors import UsageError
from .load import parse_arch_kwargs
from .options import PARTS, Flag, flag_of

PART_CLASSES = {"preprocessing": Preprocessing}  # the dataclass of each options.PARTS entry
UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _size(flag: str, text: str) -> int:
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in UNITS else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a size; write it like 512M or 4G") from None
    return int(value * UNITS[unit])


def _show_size(n: int) -> str:
    unit = max((u for u in UNITS if UNITS[u] <= n), key=UNITS.get, default="")
    return f"{n / UNITS[unit]:g}{unit}"


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of integers; write it like 1,32") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} {text!r}: give positive integers, like 1,32")
    return values


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of numbers; write it like 0.485,0.456,0.406") from None


def _ratios(flag: str, text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of ratios; write it like 0.1,0.2,0.4,0.6") from None


def _names(flag: str, text: str | None) -> tuple[str, ...] | None:
    if text is None:  # an optional list not given
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _listed(values) -> str:
    return ",".join(map(str, values))


# How a Flag's ``text`` kind reads the command line's text, and writes a default as the text --help shows
TEXT: dict[str, tuple[Callable, Callable | None]] = {
    "size": (_size, _show_size),  # bytes: 512M, 1.5G
    "ints": (_ints, _listed),  # 1,32
    "floats": (_floats, None),  # 0.485,0.456,0.406
    "ratios": (_ratios, None),  # 0.1,0.2,0.4
    "names": (_names, _listed),  # shrink,lowrank
    "shape": (lambda flag, text: parse_shape(text), None),  # 1,28,28
    "json": (lambda flag, text: parse_arch_kwargs(text), None),  # {"num_classes": 10}
}


def flags_of(cls) -> typing.Iterator[tuple[type, object, Flag]]:
    """Every (dataclass, field, flag) the command line offers for ``cls``, those of its parts included."""
    part = next((PARTS[key] for key, c in PART_CLASSES.items() if c is cls), None)
    for f in fields(cls):
        if f.metadata.get("parts"):
            yield from flags_of(PART_CLASSES[f.metadata["parts"]])
        elif (flag := part.get(f.name) if part is not None else flag_of(f)) is not None:
            yield cls, f, flag


@dataclass
class Param:
    """One parameter of a command: its flag and the field that declares it (default, type)."""

    name: str  # the Python name Typer hands the value over by
    flag: Flag
    owner: type
    field: object

    @property
    def default(self):
        """The default as the command line writes it (``1.5G``, ``1,32``); MISSING for a required argument."""
        f = self.field
        if f.default is MISSING:
            return None if f.default_factory is not MISSING else MISSING
        show = TEXT[self.flag.text][1] if self.flag.text else None
        return show(f.default) if show and f.default is not None else f.default

    def annotation(self):
        """The type Typer parses the text as: the field's own for a number, a string, a yes/no or a list of
        strings, else a string (read as :data:`TEXT` says)."""
        hint = typing.get_type_hints(self.owner)[self.field.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        plain = kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, str, bool, list[str]) else str
        base = str if self.flag.text else plain
        return Optional[base] if self.default is None else base

    def parameter(self, help_text: str) -> inspect.Parameter:
        flag, default = self.flag, self.default
        if flag.name.startswith("-"):
            names = [f"{flag.name}/{flag.negative}" if flag.negative else flag.name]
            names += [flag.short] if flag.short else []
            info = typer.Option(... if default is MISSING else default, *names, help=help_text)
        else:
            info = typer.Argument(..., metavar=flag.name, help=help_text)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                 annotation=self.annotation())

    def read(self, value):
        """The value as the field holds it."""
        return TEXT[self.flag.text][0](self.flag.name, value) if self.flag.text else value


def _param(flag: str, kinds: tuple[type, ...]) -> Param:
    for cls in kinds:
        for owner, f, found in flags_of(cls):
            if found.name == flag:
                return Param(flag.strip("-.").replace("-", "_").lower(), found, owner, f)
    raise ValueError(f"no field of {', '.join(k.__name__ for k in kinds)} bears the flag {flag}")


class Given:
    """The values one run of a command was given, read back as the option dataclasses."""

    def __init__(self, params: list[Param], values: dict, session, suffix: str | None):
        self._params = {p.flag.name: p for p in params}
        self._values = {p.flag.name: values[p.name] for p in params}
        self.session = session  # what the main callback found (terminal.Session: the options file)
        self.suffix = suffix

    def __getitem__(self, flag: str):
        return self._params[flag].read(self._values[flag])

    def make(self, cls, **fixed):
        """``cls`` from this command's flags: each field from the flag that bears it, a field whose flag the command
        does not have at its default; ``fixed`` values win."""
        values = {}
        for f in fields(cls):
            if f.name in fixed:
                continue
            if f.metadata.get("parts"):
                values[f.name] = self.make(PART_CLASSES[f.metadata["parts"]])
                continue
            flag = next((flag for _, g, flag in flags_of(cls) if g is f), None)
            if flag is not None and flag.name in self._params:
                values[f.name] = self[flag.name]
        return cls(**values, **fixed)


def command(app: typer.Typer, name: str, flags: str, kinds: tuple[type, ...], *, epilog: str | None = None,
            suffix: str | None = None, helps: dict[str, str] | None = None):
    """Register the decorated function as the command ``name`` of ``app``, with ``flags`` (in --help's order),
    each declared by the first of ``kinds`` with a field that bears it. ``suffix`` fills ``{suffix}`` in help
    texts (the name of the command's output: ``<stem>.shrunk.safetensors``); ``helps`` gives a flag other help
    for this command. The function's docstring is the command's help; it is called with a :class:`Given`."""
    params = [_param(flag, kinds) for flag in flags.split()]
    texts = {p.flag.name: (helps or {}).get(p.flag.name, p.flag.help) for p in params}
    if suffix:
        texts = {flag: text.replace("{suffix}", suffix) for flag, text in texts.items()}
    signature = inspect.Signature([
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(p.parameter(texts[p.flag.name]) for p in params)])

    def register(function: Callable[[Given], None]):
        def callback(ctx: typer.Context, **values):
            return function(Given(params, values, ctx.obj, suffix))

        callback.__signature__ = signature
        callback.__doc__ = function.__doc__
        callback.params = params  # what each flag was made from (tests/test_options.py)
        app.command(name, epilog=epilog)(callback)
        return function

    return register
