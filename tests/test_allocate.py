"""Allocation by measured sensitivity: a target is met by removing where the measured divergence is cheapest."""

import json

import warnings

import pytest

import torch
from torch import nn

from prunetool import allocate
from prunetool.cli import main
from prunetool.commands.shrink import shrink


def test_hull_and_allocation_take_the_cheapest_segments_first():
    flat = allocate.Curve("flat", 8, [0, 2, 4, 6], [0.0, 0.01, 0.02, 0.5], size=1.0)
    steep = allocate.Curve("steep", 8, [0, 2, 4, 6], [0.0, 0.3, 0.35, 0.4], size=1.0)
    assert steep.hull() == [(0, 0.0), (6, 0.4)]  # the dip after the first point is on the hull's chord
    assert allocate.allocation({"flat": flat, "steep": steep}, 4) == {"flat": 4, "steep": 0}
    # past the flat group's cheap part, the steep group's hull (0.067 per unit) beats its last segment (0.24)
    assert allocate.allocation({"flat": flat, "steep": steep}, 7) == {"flat": 4, "steep": 3}
    big = allocate.Curve("big", 8, [0, 4], [0.0, 0.04], size=10.0)  # same cost, ten times the size per unit
    assert allocate.allocation({"flat": flat, "big": big}, 20) == {"flat": 0, "big": 2}


class TwoLayers(nn.Module):
    """Two hidden layers; half of the first one's units are dead (no weights in or out), the second is all used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.a.weight[16:] = 0
            self.a.bias[16:] = 0
            self.b.weight[:, 16:] = 0

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_target_is_taken_from_the_layer_whose_units_cost_nothing():
    dense = TwoLayers().eval()
    x = torch.randn(64, 10)
    want = dense(x)
    small, report = shrink(dense, input_shape=(10,), target_params=0.56, calib=256, measure=False)
    kept = {layer["name"]: layer["units_after"] for layer in report["layers"]}
    assert kept == {"a": 16, "b": 32}, kept  # the dead half went, the live layer is whole
    assert torch.allclose(small(x), want, atol=1e-5)
    curves = report["allocation"]["curves"]
    assert curves["a"]["divergence"][2][1] < 1e-6 < curves["b"]["divergence"][1][1]
    assert report["allocation"]["chosen"] == "sensitivity"
    _, uniform = shrink(dense, input_shape=(10,), target_params=0.56, calib=256, measure=False,
                        allocation="uniform")
    assert {layer["name"]: layer["units_after"] for layer in uniform["layers"]}["b"] < 32
    assert report["settings"]["allocation"] == "sensitivity" and uniform["settings"]["allocation"] == "uniform"


def test_allocation_needs_a_target_and_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(TwoLayers().state_dict(), "m.pt")
    (tmp_path / "two.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(10, 32), "
                                     "nn.ReLU(), nn.Linear(32, 4))\n")
    code = main(["shrink", "m.pt", "--arch", "two.py:build", "--input-shape", "10", "--allocation", "sensitivity",
                 "--ratio", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--target-params" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.shrunk*"))


def test_the_cli_meets_a_macs_target_by_sensitivity_and_reports_the_curves(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.py").write_text("import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
                                     "    def __init__(self):\n        super().__init__()\n"
                                     "        self.a, self.b, self.out = nn.Linear(10, 32), nn.Linear(32, 32), "
                                     "nn.Linear(32, 4)\n\n    def forward(self, x):\n"
                                     "        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))\n\n\n"
                                     "def build():\n    return Net()\n")
    torch.save(TwoLayers().state_dict(), "m.pt")
    code = main(["shrink", "m.pt", "--arch", "two.py:build", "--input-shape", "10", "--target-macs", "0.6",
                 "--no-latency", "-q", "--out", "small.safetensors", "--json", "r.json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["macs"] <= 0.6 * report["before"]["macs"]
    assert set(report["allocation"]["curves"]) == {"a", "b"} and report["verify"]["reload"] == "identical"


def test_groups_tied_to_one_width_share_one_curve():
    a = allocate.Curve("a", 8, [0, 2, 4], [0.0, 0.1, 0.2], size=1.0)
    b = allocate.Curve("b", 8, [0, 2, 4], [0.0, 0.0, 0.4], size=2.0)
    c = allocate.Curve("c", 8, [0, 2, 4], [0.0, 0.01, 0.02], size=1.0)
    merged = allocate.tied({"a": a, "b": b, "c": c}, [["a", "b"]], whole=["c"])
    assert set(merged) == {"a"} and merged["a"].members == ["a", "b"]
    assert merged["a"].cost == pytest.approx([0.0, 0.1, 0.6]) and merged["a"].size == 3.0


class ThreeLive(nn.Module):
    """Three hidden layers, every unit used: no allocation is free."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c, self.out = nn.Linear(12, 48), nn.Linear(48, 24), nn.Linear(24, 40), nn.Linear(40, 6)

    def forward(self, x):
        return self.out(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_the_allocation_is_the_candidate_whose_joint_cut_measures_best():
    dense = ThreeLive().eval()
    small, report = shrink(dense, input_shape=(12,), target_params=0.6, calib=256, measure=False)
    allocation = report["allocation"]
    measured = allocation["candidates"]
    # linear layers only: no kernel blocks their outputs by 8, so one set of candidates
    assert set(measured) == {"sensitivity", "uniform", *(f"blend {w:g}" for w in allocate.BLENDS)}
    assert allocation["chosen"] == min(measured, key=lambda n: measured[n]["divergence"])
    assert all(0 < m["removed"] < 1 for m in measured.values())
    assert report["after"]["params"] <= 0.6 * report["before"]["params"]
    kept = {layer["name"]: layer["units_after"] for layer in report["layers"]}
    assert {n: c["units"] - c["removed"] for n, c in allocation["curves"].items()} == kept


class Convs(nn.Module):
    """Two convolutions and a linear layer: the convolutions' channels are what ONNX Runtime blocks by 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 32, 3, padding=1)
        self.c, self.out = nn.Linear(32, 40), nn.Linear(40, 5)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
        return self.out(torch.relu(self.c(x)))


def test_convolutions_cut_to_widths_off_their_kernel_block_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"1 convolution\(s\) keep widths off the multiples of 8 .* \(e.g. a: 12\);"
                                         r" .* give --round-to 8"):
        shrink(Convs().eval(), input_shape=(3, 8, 8), ratio=0.5, calib=64, measure=False)  # a: 24 -> 12, b: 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # at multiples of 8, or with the multiple asked for: nothing
        warnings.filterwarnings("ignore", message="no --data")
        shrink(Convs().eval(), input_shape=(3, 8, 8), ratio=0.5, round_to=8, calib=64, measure=False)
        shrink(Convs().eval(), input_shape=(3, 8, 8), ratio=0.5, round_to=1, calib=64, measure=False)


def test_a_size_target_measures_widths_of_8_where_convolutions_block_by_them():
    dense = Convs().eval()
    small, report = shrink(dense, input_shape=(3, 8, 8), target_macs=0.5, calib=256, measure=False)
    allocation = report["allocation"]
    measured = allocation["candidates"]
    names = {"sensitivity", "uniform", *(f"blend {w:g}" for w in allocate.BLENDS)}
    assert set(measured) == names | {f"{n}, widths ×8" for n in names}
    assert {n: c["round_to"] for n, c in measured.items()} == {n: 8 if n.endswith("×8") else 1 for n in measured}
    # the groups hold 24 + 32 + 40 = 96 units: every ×8 candidate keeps a multiple of 8 of them, not every ×1 one
    kept = {n: round((1 - c["removed"]) * 96) for n, c in measured.items()}
    assert all(k % 8 == 0 for n, k in kept.items() if n.endswith("×8"))
    assert any(k % 8 for n, k in kept.items() if not n.endswith("×8"))
    assert allocation["chosen"] == min(measured, key=lambda n: measured[n]["divergence"])
    multiple = report["settings"]["round_to"]
    assert multiple == measured[allocation["chosen"]]["round_to"]
    assert all(getattr(small, n).out_channels % multiple == 0 for n in "ab")
    assert report["after"]["macs"] <= 0.5 * report["before"]["macs"]

    _, given = shrink(dense, input_shape=(3, 8, 8), target_macs=0.5, round_to=1, calib=256, measure=False)
    assert set(given["allocation"]["candidates"]) == names  # a multiple asked for is the only one measured


def test_a_latency_target_is_met_through_the_macs_its_measured_steps_found(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # wide enough that ONNX Runtime's time follows the MACs (a 12-wide net's runs are all overhead: none is faster)
    (tmp_path / "wide.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                      "nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), "
                                      "nn.Linear(2048, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import wide

    torch.manual_seed(0)
    torch.save(wide.build().state_dict(), "m.pt")
    code = main(["shrink", "m.pt", "--arch", "wide.py:build", "--input-shape", "64", "--target-latency", "0.7",
                 "--criterion", "mrs", "--calib", "128", "--no-latency", "-q", "--out", "small.safetensors",
                 "--json", "r.json"])
    assert code in (0, 1), capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    target = report["latency_target"]
    assert target["runtime"] == "onnxruntime" and target["goal"] == 0.7
    # the result timed again beyond the noise of the steps' readings is a missed budget, and the only one
    assert report["budgets"]["failures"] == ([target["missed"]] if code else []) and bool(target["missed"]) == code
    # (a multiple whose steps a noisy machine refused is left out: either may be, not both)
    assert target["steps"] and all(len([st for st in target["steps"] if st["round_to"] == r]) <= 4 for r in (1, 8))
    # without --round-to, widths at multiples of 8 are measured too, and kept only where one of their steps met it
    eights = [step for step in target["steps"] if step["round_to"] == 8]
    assert len(eights) <= 4 and (not eights or min(step["latency"] for step in eights) <= 0.7)
    assert target["macs_goal"] in [step["macs"] for step in target["steps"]
                                   if step["round_to"] == report["settings"]["round_to"]]
    assert report["settings"]["target_macs"] == target["macs_goal"] and report["settings"]["target_latency"] == 0.7
    assert report["after"]["macs"] <= target["macs_goal"] * report["before"]["macs"]
    assert report["verify"]["reload"] == "identical"


@pytest.mark.parametrize("flags", [["--target-macs", "0.5", "--target-latency", "0.5"],
                                   ["--target-latency", "1.5"], ["--allocation", "uniform"]])
def test_targets_are_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    torch.save(TwoLayers().state_dict(), "m.pt")
    code = main(["shrink", "m.pt", "--arch", "nowhere.py:build", "--input-shape", "10", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and ("target" in err or "--allocation" in err), err


def test_no_candidate_takes_more_of_a_layer_than_max_layer_ratio(monkeypatch):
    seen = {}
    real = allocate.choose

    def recording(trials, options, bars=None):
        seen.update(options)
        return real(trials, options)

    monkeypatch.setattr(allocate, "choose", recording)
    dense = ThreeLive().eval()
    small, report = shrink(dense, input_shape=(12,), target_params=0.45, max_layer_ratio=0.7, calib=256,
                           measure=False)
    units = {"a": 48, "b": 24, "c": 40}
    assert "uniform" in seen and len(seen) > 2
    for name, keep in seen.items():
        for group, kept in keep.items():
            assert len(kept) >= 0.3 * units[group] - 1e-9, (name, group, len(kept))
    assert report["after"]["params"] <= 0.45 * report["before"]["params"]


def odd_widths(small: nn.Module) -> bool:
    """Whether a hidden layer of ``small`` (a :class:`ThreeLive` cut: every linear layer but the 6 outputs) has a
    width off a multiple of 8."""
    return any(m.out_features % 8 for m in small.modules() if isinstance(m, nn.Linear) and m.out_features != 6)


class OddWidthsAreSlow:
    """A deployment runtime stand-in: time in proportion to the MACs, 1.6 times that when a hidden layer's width is
    not a multiple of 8 (as ONNX Runtime's CPU convolutions outside their blocked layout)."""

    runtime, batch, noisy = "stand-in", 1, False

    def __init__(self, dense, example, batch=1, output_key=None, device="cpu"):
        from prunetool.measure import macs

        self.example, self.macs = example, macs
        self.dense = macs(dense, example)

    def speedup(self, small):
        odd = odd_widths(small)
        latency = self.macs(small, self.example) / self.dense * (1.6 if odd else 1.0)
        return {"speedup": {"p50": 1 / latency}, "noisy": False}

    def close(self):
        pass


def test_a_latency_target_measures_widths_the_kernels_like_and_keeps_them_when_they_diverge_least(monkeypatch):
    from prunetool.commands import shrink as command

    monkeypatch.setattr(command, "DeployedSpeed", OddWidthsAreSlow)
    dense = ThreeLive().eval()
    small, report = shrink(dense, input_shape=(12,), target_latency=0.6, calib=256, measure=False)
    allocation, target = report["allocation"], report["latency_target"]
    assert {st["round_to"] for st in target["steps"]} == {1, 8}
    assert {c["round_to"] for c in allocation["candidates"].values()} == {1, 8}
    # at one latency, widths of multiples of 8 keep more MACs (0.6 against 0.6 / 1.6): they diverge least
    assert allocation["chosen"].endswith("widths ×8") and report["settings"]["round_to"] == 8
    assert all(getattr(small, name).out_features % 8 == 0 for name in "abc")
    assert target["latency"] <= 0.6 + 1e-9 and report["settings"]["target_macs"] == target["macs_goal"]

    _, given = shrink(dense, input_shape=(12,), target_latency=0.6, round_to=1, calib=256, measure=False)
    assert {c["round_to"] for c in given["allocation"]["candidates"].values()} == {1}
    assert {st["round_to"] for st in given["latency_target"]["steps"]} == {1}


class EightsNeverFaster(OddWidthsAreSlow):
    """A runtime stand-in in which widths at multiples of 8 never run faster than the dense model."""

    def speedup(self, small):
        odd = odd_widths(small)
        latency = self.macs(small, self.example) / self.dense if odd else 1.0
        return {"speedup": {"p50": 1 / latency}, "noisy": False}


def test_widths_of_8_that_never_meet_the_latency_are_not_candidates(monkeypatch):
    from prunetool.commands import shrink as command

    monkeypatch.setattr(command, "DeployedSpeed", EightsNeverFaster)
    _, report = shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.6, calib=256, measure=False)
    assert {c["round_to"] for c in report["allocation"]["candidates"].values()} == {1}
    assert report["settings"]["round_to"] == 1 and {st["round_to"] for st in report["latency_target"]["steps"]} == {1}


class NeverMuchFaster(OddWidthsAreSlow):
    """A runtime stand-in with a floor: no cut runs in less than 0.9 of the dense model's time."""

    def speedup(self, small):
        return {"speedup": {"p50": 1 / max(0.9, self.macs(small, self.example) / self.dense)}, "noisy": False}


def test_a_latency_target_no_cut_comes_near_is_refused_with_what_was_measured(monkeypatch):
    from prunetool.commands import shrink as command
    from prunetool.errors import UsageError

    monkeypatch.setattr(command, "DeployedSpeed", NeverMuchFaster)
    with pytest.raises(UsageError, match=r"--target-latency 0.6 cannot be reached in stand-in: .* runs in 0.900 of"):
        shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.6, calib=256, measure=False)
    _, report = shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.92, calib=256, measure=False)
    assert report["latency_target"]["latency"] <= 0.92 + 1e-9


class Timed(OddWidthsAreSlow):
    """A runtime stand-in reading back, cut after cut, the latencies the MobileNet sample's widths of 8 measured
    under --target-latency 0.5 on a loaded 2-core machine: ONNX Runtime keeps about 0.6 of the dense time with no
    MACs, and a lucky session placement reads 0.504 at a tenth of the MACs."""

    latencies = [0.80, 0.631, 1.047, 0.504]
    timed = 0  # cuts timed so far

    def speedup(self, small):
        Timed.timed += 1
        return {"speedup": {"p50": 1 / Timed.latencies[Timed.timed - 1]}, "noisy": False}


def test_a_latency_met_only_where_the_runtime_keeps_its_fixed_cost_is_refused(monkeypatch):
    from prunetool.commands import shrink as command
    from prunetool.errors import UsageError

    monkeypatch.setattr(command, "DeployedSpeed", Timed)
    monkeypatch.setattr(Timed, "timed", 0)
    # the fourth cut reads 0.504 (within the 0.03 of noise a result may miss by), at 0.118 of the MACs: the line
    # through the four keeps 0.60 of the time with no MACs, so that reading was luck, and the cut would be useless
    with pytest.raises(UsageError, match=r"--target-latency 0.5 cannot be reached in stand-in with the accuracy kept: "
                                         r"its time per call keeps about 0.6\d of the dense model's .* reaches 0.5 "
                                         r"never"):
        shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.5, round_to=1, calib=256, measure=False)


def test_the_step_a_latency_target_takes_is_timed_again_and_a_lucky_reading_gives_way(monkeypatch):
    from prunetool.commands import shrink as command

    monkeypatch.setattr(command, "DeployedSpeed", Timed)
    monkeypatch.setattr(Timed, "timed", 0)
    # three steps (the second meets 0.7 below its window, the third within it), then the third again: 0.95, a lucky
    # first reading; then the second again: 0.66, it holds (and the result, timed: 0.66)
    monkeypatch.setattr(Timed, "latencies", [0.9, 0.65, 0.69, 0.95, 0.66, 0.66])
    _, report = shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.7, round_to=1, calib=256,
                       allocation="uniform", measure=False)
    steps = report["latency_target"]["steps"]
    assert [st.get("timings") for st in steps] == [None, [0.65, 0.66], [0.69, 0.95]], steps
    assert steps[2]["latency"] == 0.95 and steps[1]["macs"] < steps[2]["macs"]
    assert report["latency_target"]["macs_goal"] == steps[1]["macs"] and Timed.timed == 6


def test_a_latency_target_the_result_misses_beyond_the_noise_is_a_missed_budget(monkeypatch):
    from prunetool.commands import shrink as command
    from prunetool.options import Budgets
    from prunetool.report import budget_failures

    monkeypatch.setattr(command, "DeployedSpeed", Timed)
    monkeypatch.setattr(Timed, "timed", 0)
    monkeypatch.setattr(Timed, "latencies", [0.69, 0.69, 0.9])  # a step within the window, again, then the result
    _, report = shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.7, round_to=1, calib=256,
                       allocation="uniform", measure=False)
    missed = report["latency_target"]["missed"]
    assert missed.startswith("--target-latency 0.7: the result runs in 0.900 of the dense model's time in stand-in")
    assert budget_failures(report, Budgets()) == [missed]  # the CLI exits 1 with it, as on any missed budget


def test_latency_steps_never_ask_for_less_than_a_tenth_of_the_macs(monkeypatch):
    from prunetool.commands import shrink as command
    from prunetool.errors import UsageError

    monkeypatch.setattr(command, "DeployedSpeed", Timed)
    monkeypatch.setattr(Timed, "timed", 0)
    # at 0.3 of the MACs the cut reads 3x the dense time: proportionally the next step would ask for 0.03 of them
    monkeypatch.setattr(Timed, "latencies", [3.0, 2.0])
    with pytest.raises(UsageError, match=r"the fastest cut measured \(one ratio, 0.100 of the MACs\) runs in 2.000"):
        shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.3, round_to=1, calib=256, measure=False)
    assert Timed.timed == 2  # the floor's cut once: asked for again, it is not timed again


class OddWidthsNeverFast(OddWidthsAreSlow):
    """A runtime stand-in in which any width off a multiple of 8 keeps 0.95 of the dense time or more."""

    def speedup(self, small):
        odd = odd_widths(small)
        latency = self.macs(small, self.example) / self.dense
        return {"speedup": {"p50": 1 / (max(0.95, latency) if odd else latency)}, "noisy": False}


def test_a_latency_only_widths_of_8_come_near_is_met_at_those_widths(monkeypatch):
    from prunetool.commands import shrink as command

    monkeypatch.setattr(command, "DeployedSpeed", OddWidthsNeverFast)
    small, report = shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.6, calib=256, measure=False)
    assert report["settings"]["round_to"] == 8 and {st["round_to"] for st in report["latency_target"]["steps"]} == {8}
    assert all(getattr(small, name).out_features % 8 == 0 for name in "abc")
    assert report["latency_target"]["latency"] <= 0.6 + 1e-9


def test_one_ratio_under_a_latency_takes_the_multiple_that_keeps_the_most_macs_at_it(monkeypatch):
    from prunetool.commands import shrink as command

    monkeypatch.setattr(command, "DeployedSpeed", OddWidthsAreSlow)
    dense = ThreeLive().eval()
    small, report = shrink(dense, input_shape=(12,), target_latency=0.6, allocation="uniform", calib=256,
                           measure=False)
    target = report["latency_target"]
    assert {st["round_to"] for st in target["steps"]} == {1, 8}
    # odd widths run 1.6 times slower here: at multiples of 8 the same latency keeps more MACs, and one ratio takes it
    met = {r: max(st["macs"] for st in target["steps"] if st["round_to"] == r and st["latency"] <= 0.6) for r in (1, 8)}
    assert met[8] > met[1] and report["settings"]["round_to"] == 8 and target["macs_goal"] == met[8]
    assert all(getattr(small, name).out_features % 8 == 0 for name in "abc") and target["latency"] <= 0.6 + 1e-9

    _, given = shrink(dense, input_shape=(12,), target_latency=0.6, allocation="uniform", round_to=1, calib=256,
                      measure=False)
    assert {st["round_to"] for st in given["latency_target"]["steps"]} == {1} and given["settings"]["round_to"] == 1


class EightsAreSlow(OddWidthsAreSlow):
    """A runtime stand-in in which widths all at multiples of 8 run 1.6 times slower than their MACs say."""

    def speedup(self, small):
        odd = odd_widths(small)
        latency = self.macs(small, self.example) / self.dense * (1.0 if odd else 1.6)
        return {"speedup": {"p50": 1 / latency}, "noisy": False}


def test_one_ratio_under_a_latency_keeps_any_width_where_widths_of_8_keep_fewer_macs(monkeypatch):
    from prunetool.commands import shrink as command

    monkeypatch.setattr(command, "DeployedSpeed", EightsAreSlow)
    _, report = shrink(ThreeLive().eval(), input_shape=(12,), target_latency=0.6, allocation="uniform", calib=256,
                       measure=False)
    target = report["latency_target"]
    met = {r: [st["macs"] for st in target["steps"] if st["round_to"] == r and st["latency"] <= 0.6] for r in (1, 8)}
    assert met[1] and met[8] and max(met[1]) > max(met[8])  # both met it: the larger multiple is not taken for itself
    assert report["settings"]["round_to"] == 1 and target["macs_goal"] == max(met[1])
