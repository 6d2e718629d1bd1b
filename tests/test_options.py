"""Options written once: the option dataclasses (prunetool.options) are the one source of every flag, help text and
default; the CLI's commands are made from them and the Python API's keywords default to them."""

import dataclasses
import inspect
import re

import pytest
import typer.main

import prunetool
from prunetool import cli, flags, options
from prunetool.commands import export as export_command
from prunetool.commands import shrink as shrink_command
from prunetool.commands.common import Keywords
from prunetool.options import (BenchOptions, CompressOptions, DataOptions, InspectOptions, LowrankOptions,
                               Measurement, Outputs, Recovery, ShrinkOptions, Source, SparsifyOptions)

GROUP = typer.main.get_command(cli.app)
COMMANDS = {info.name: info.callback for info in cli.app.registered_commands}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_cli_default_is_the_fields_default(name):
    """Each flag's default is its field's, written as the command line writes it (1.5G, 1,32) and read back."""
    params = {p.name: p for p in GROUP.commands[name].params}
    made = COMMANDS[name].params
    assert [p.name for p in made] == list(params)
    for p in made:
        f = p.field
        if f.default is dataclasses.MISSING:  # a required argument, or a factory (arch_kwargs: none given is {})
            assert params[p.name].required == (f.default_factory is dataclasses.MISSING)
            continue
        assert params[p.name].default == p.default
        value = p.read(params[p.name].default)
        assert value == f.default, (name, p.flag.name, value, f.default)


def test_sizes_and_lists_show_as_typed():
    assert flags._show_size(options.DEFAULT_CALIB_MEMORY) == "1.5G"
    assert flags._size("--calib-memory", "1.5G") == options.DEFAULT_CALIB_MEMORY
    assert flags._show_size(512 * 2 ** 20) == "512M" and flags._show_size(100) == "100"
    assert flags._listed(options.LATENCY_BATCHES) == "1,32"


# Each API function, and the dataclasses its keywords stand for (the first that has a field of the keyword's name
# or api name decides)
API = {
    prunetool.shrink: (Source, DataOptions, ShrinkOptions, Recovery, Measurement, Outputs),
    prunetool.plan: (Source, DataOptions, ShrinkOptions),
    prunetool.lowrank: (Source, DataOptions, LowrankOptions, Recovery, Measurement, Outputs),
    prunetool.compress: (Source, DataOptions, CompressOptions, Measurement, Outputs),
    prunetool.sparsify: (Source, DataOptions, SparsifyOptions, Recovery, Measurement, Outputs),
    prunetool.inspect: (Source, DataOptions, InspectOptions),
    prunetool.export: (export_command.ExportOptions, Source, DataOptions, Outputs),
    prunetool.bench: (BenchOptions, Source, DataOptions, Measurement),
}
# Keywords whose default is not a field's, and why
OWN = {
    (prunetool.plan, "criterion"): shrink_command.DRY_RUN_CRITERION,  # plan() runs without data
    (prunetool.plan, "calib"): shrink_command.DRY_RUN_CALIB,
    (prunetool.plan, "ratios"): shrink_command.DRY_RUN_RATIOS,
    (prunetool.compress, "plans"): None,  # None: every plan
}
API_ONLY = {"progress", "scores"}  # keywords of the API alone (the CLI's --no-progress / -q; shrink's scores)


def _field(kinds, keyword):
    for cls in kinds:
        for f in dataclasses.fields(cls):
            if (f.metadata.get("api") or f.name) == keyword:
                return f
    return None


@pytest.mark.parametrize("function", list(API), ids=lambda f: f.__name__)
def test_every_api_default_is_the_fields_default(function):
    for p in inspect.signature(function).parameters.values():
        if p.default is inspect.Parameter.empty:
            continue
        if (function, p.name) in OWN:
            assert p.default == OWN[function, p.name]
            continue
        f = _field(API[function], p.name)
        if f is None:
            assert p.name in API_ONLY and p.default in (None, False), (function.__name__, p.name)
        elif f.default is dataclasses.MISSING:  # a factory: arch_kwargs=None is {}
            assert p.default is None and f.default_factory is not dataclasses.MISSING
        else:
            assert p.default == f.default, (function.__name__, p.name, p.default, f.default)


def test_keywords_build_the_dataclasses():
    given = Keywords({"model": "m.pt", "arch": "a:B", "arch_kwargs": None, "unsafe_pickle": False,
                      "trust_remote_code": True, "data": "d.npz", "calib": 7, "input_shape": [1, 28, 28],
                      "measure": False, "latency_batches": (1, 32), "device": "cpu", "recalibrate": True,
                      "finetune_epochs": 2})
    assert given.source() == Source("m.pt", "a:B", {}, False, True)
    assert given.data() == DataOptions("d.npz", 7, input_shape=(1, 28, 28))
    assert given.measurement() == Measurement(False, (), "cpu")
    assert given.make(Recovery) == Recovery(finetune_epochs=2, recalibrate_bn=True)


def test_no_module_state_in_the_cli():
    source = inspect.getsource(cli)
    assert not re.search(r"^\s*global\s", source, re.M) and len(source.splitlines()) < 300


def test_defaults_that_depend_on_another_option():
    """The criterion follows the compensation (obs ranks what the least-squares refit repairs; mrs otherwise) and
    the learning rate the kind of training, unless given."""
    assert ShrinkOptions().criterion == "obs" and ShrinkOptions(compensate="mean").criterion == "mrs"
    assert ShrinkOptions(compensate="none", criterion="obs").criterion == "obs"
    assert (Recovery().finetune_lr, Recovery().recover_lr) == (1e-3, 1e-4)
    assert (Recovery(lr=3e-4).finetune_lr, Recovery(lr=3e-4).recover_lr) == (3e-4, 3e-4)
