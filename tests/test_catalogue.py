"""Issue 12's catalogue through the CLI, in process: every bad or odd input exits with its code, one line on stderr
naming the problem, no traceback, no file left and none changed; then the same promises fuzzed (hypothesis) over
option values and over data files."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunetool.cli import main

from catalogue import CASES, EVCI, ROOT, SAMPLES, _ckpt


def files(d: Path) -> dict[str, str]:
    """Every file under ``d`` and its hash (Python's own bytecode caches aside)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def run_case(args, d: Path, capsys):
    before = files(d)
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err, before, files(d)


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynet", raising=False)  # a user module of an earlier case's folder
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_catalogue(case, work, capsys):
    if case.setup:
        case.setup(work)
    code, out, err, before, after = run_case(case.args, work, capsys)
    assert code == case.code, err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prunetool: error: "), err
        for needle in case.needles:
            assert needle in lines[0], lines[0]
    assert after == before, "no file may be written, left behind or changed"


def test_catalogue_has_every_kind_of_case():
    assert len(CASES) >= 90 and len({c.name for c in CASES}) == len(CASES)


def test_interrupt_leaves_nothing(work, capsys, monkeypatch):
    """Ctrl-C during the evaluation (after the cut, with the model and ONNX staged): exit 130, nothing written."""
    import prunetool.commands.common as common

    _ckpt(work)
    np.savez(work / "d.npz", **{k: v[:40] for k, v in np.load(SAMPLES / "mnist_subset.npz").items()})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "evaluate", interrupted)
    code, _, err, before, after = run_case(["shrink", "m.pt", *EVCI, "--data", "d.npz", "--calib", "32",
                                            "--onnx", "m.onnx", "--json", "r.json"], work, capsys)
    assert code == 130 and "nothing was written" in err
    assert after == before


def test_internal_error_has_its_own_code_and_one_line(work, capsys, monkeypatch):
    import prunetool.commands.shrink as shrink

    _ckpt(work)

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(shrink, "select", bug)
    code, _, err, before, after = run_case(["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--calib", "8"],
                                           work, capsys)
    assert code == 3
    lines = err.strip().splitlines()
    assert lines[-1].startswith("prunetool: internal error: ZeroDivisionError") and "--debug" in lines[-1]
    assert after == before


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
NUMBERS = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from(["", "abc", "1e309", "-0", "0x10"]))


@FUZZ
@given(option=st.sampled_from(["--ratio", "--calib", "--eval", "--round-to", "--target-params", "--max-drop",
                                "--max-params", "--max-layer-ratio", "--lr", "--calib-rows", "--speedup-batch"]),
       value=NUMBERS)
def test_fuzzed_option_values_never_crash(option, value, tmp_path_factory, capsys):
    """Any value of a numeric option: done (0), a missed budget (1) or one line naming it (2); never a crash."""
    d = tmp_path_factory.mktemp("fuzz")
    _ckpt(d)
    args = ["shrink", str(d / "m.pt"), *EVCI, "--input-shape", "1,28,28", "--calib", "8", "--no-latency",
            "--criterion", "l1", "--compensate", "none", "--out", str(d / "o.safetensors"), option, str(value)]
    before = files(d)
    code = main(args)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2) and "Traceback" not in out + err, (option, value, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prunetool: error: "), err
        assert files(d) == before


@FUZZ
@given(n_train=st.integers(0, 12), n_test=st.integers(0, 6),
       shape=st.sampled_from([(28, 28), (1, 28, 28), (3, 28, 28), (1, 14, 14), (784,), (28,)]),
       dtype=st.sampled_from(["uint8", "float32", "float64", "int16", "bool"]),
       labels=st.sampled_from(["ok", "big", "negative", "float", "onehot", "short"]), scale=st.sampled_from([1, 255]))
def test_fuzzed_data_files_never_crash(n_train, n_test, shape, dtype, labels, scale, tmp_path_factory, capsys):
    """Any .npz of odd shapes, dtypes, label values and sizes: it works, or one line says what is wrong."""
    d = tmp_path_factory.mktemp("fuzzdata")
    _ckpt(d)
    rng = np.random.default_rng(n_train * 31 + n_test)

    def images(n):
        return (rng.random((n, *shape)) * scale).astype(dtype)

    def y(n):
        base = rng.integers(0, 10, n)
        return {"ok": base, "big": base + 10, "negative": base - 11, "float": base + 0.5,
                "onehot": np.eye(10)[base], "short": base[: max(0, n - 1)]}[labels]

    np.savez(d / "d.npz", x_train=images(n_train), y_train=y(n_train), x_test=images(n_test), y_test=y(n_test))
    before = files(d)
    code = main(["shrink", str(d / "m.pt"), *EVCI, "--data", str(d / "d.npz"), "--calib", "8", "--no-latency",
                 "--criterion", "l1", "--compensate", "none", "--out", str(d / "o.safetensors")])
    out, err = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in out + err, err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prunetool: error: "), err
        assert files(d) == before
    else:
        assert (d / "o.safetensors").exists()
