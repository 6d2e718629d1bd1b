"""One speed-up statistic everywhere (the median of paired per-round ratios), bench judging noise as shrink does, and
the parameter count of a written Hugging Face directory being that of the model ``from_pretrained`` builds."""

import io
import json
import random
import time
import types

import pytest
import torch
import transformers
from rich.console import Console

import prunetool
from prunetool import measure, report as reporting
from prunetool.cli import main
from prunetool.options import Budgets


def _stats(median_ms):
    return {"median_ms": median_ms, "p10_ms": 0.9 * median_ms, "p90_ms": 1.1 * median_ms,
            "throughput": 1000.0 / median_ms, "runs": 14}


def _shrink_report():
    """A shrink report whose ratio of medians (1.0 / 0.25 = 4×) is not its paired speed-up (p50 2×)."""
    before = {"params": 100, "macs": 1000, "file_bytes": 400, "accuracy": 90.0, "loss": 0.3, "metric": "accuracy",
              "latency_ms": {"1": 1.0}}
    after = {"params": 80, "macs": 800, "file_bytes": 320, "accuracy": 89.0, "loss": 0.35, "metric": "accuracy",
             "latency_ms": {"1": 0.25}}
    latency = {"batch": 1, "before": _stats(1.0), "after": _stats(0.25), "rounds": 7, "attempts": 1,
               "speedup": {"p10": 1.5, "p50": 2.0, "p90": 2.5}, "spread": 0.25, "noisy": False}
    return {"command": "shrink", "before": before, "after": after, "latency": {"1": latency},
            "metric": {"name": "accuracy", "before": 90.0, "after": 89.0, "drop": 1.0, "unit": "pp"}}


def test_summary_line_table_markdown_json_and_gate_show_the_paired_median():
    report = _shrink_report()
    line = reporting.summary_line(report)
    assert "1.00 → 0.25 ms at batch 1 (2.00×)" in line and "4.00×" not in line
    assert reporting.speedup(report, 1) == {"p10": 1.5, "p50": 2.0, "p90": 2.5, "noisy": False}
    markdown = reporting.summary_markdown(report, [])
    assert "| latency, batch 1 | 1.000 ms | 0.250 ms | 2.00× (1.50–2.50) |" in markdown and "4.00×" not in markdown
    console = Console(file=io.StringIO(), width=200)
    console.print(reporting.metrics_table(report))
    table = console.file.getvalue()
    assert "2.00× (1.50–2.50)" in table and "4.00×" not in table
    assert json.loads(reporting.json_bytes(report))["latency"]["1"]["speedup"]["p50"] == 2.0
    missed = reporting.budget_failures(report, Budgets(min_speedup=3.0))
    assert len(missed) == 1 and missed[0].startswith("speed-up 2.00× (p10 1.50×, p90 2.50×)")
    assert reporting.budget_failures(report, Budgets(min_speedup=1.9)) == []


def test_a_noisy_speedup_is_marked_in_the_summary_and_not_gated():
    report = _shrink_report()
    report["latency"]["1"].update(speedup={"p10": 0.5, "p50": 2.0, "p90": 9.0}, noisy=True, attempts=3)
    assert "(2.00×, noisy)" in reporting.summary_line(report)
    assert "2.00× (0.50–9.00) noisy" in reporting.summary_markdown(report, [])
    assert reporting.budget_failures(report, Budgets(min_speedup=3.0)) == []
    assert "too noisy" in reporting.too_noisy(report, Budgets(min_speedup=3.0))


def test_interleaved_alternates_the_runs_round_by_round_within_max_runs():
    calls = []
    runs = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
    times = measure.interleaved(runs, rounds=4, budget_s=10.0, warmup=1, max_runs=8)
    timed = calls[2 * 3:]  # after one warm-up call and one sizing call of each
    assert timed == ["a", "a", "b", "b", "c", "c"] * 4
    assert [len(r) for t in times for r in t] == [2] * 12
    judged = measure.paired_speedup([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]])
    assert judged["speedup"] == {"p10": 1.0, "p50": 2.0, "p90": 4.0} and judged["noisy"]


def test_interleaved_with_settle_rests_and_warms_each_run_before_its_timed_calls():
    """A run that is slow after a rest (threads parked) is timed warm: the rest is followed by an untimed call."""
    last = {}

    def run(name):
        def call():
            now = time.perf_counter()
            time.sleep(0.03 if now - last.get(name, now) > 0.005 else 0.0005)  # cold after 5 ms idle
            last[name] = time.perf_counter()
        return call

    started = time.perf_counter()
    times = measure.interleaved([run("a"), run("b")], rounds=3, budget_s=10.0, warmup=1, max_runs=6, settle=0.01)
    assert time.perf_counter() - started >= 6 * (0.01 + 0.03)  # each round: a rest and a cold call per run
    assert [len(r) for t in times for r in t] == [2] * 6 and max(t for r in times for b in r for t in b) < 20


def test_sessions_of_one_model_take_the_rounds_in_turn_and_the_best_one_is_read():
    """Fresh ONNX Runtime sessions of one model keep the thread placement they started with, fast or slow: each
    round times the next session, every session is warmed up, and the speed-up reads each model's best session."""
    calls = []
    runs = [[lambda i=i, m=m: calls.append(f"{m}{i}") for i in range(3)] for m in "ab"]
    times = measure.interleaved(runs, rounds=5, budget_s=10.0, warmup=1, max_runs=5)
    assert calls[:6] == ["a0", "a1", "a2", "b0", "b1", "b2"]  # one warm-up call of each session
    assert calls[6:8] == ["a0", "b0"]  # the sizing calls: the first sessions
    assert calls[8:] == ["a0", "b0", "a1", "b1", "a2", "b2", "a0", "b0", "a1", "b1"]  # one call a round
    assert [len(t) for t in times] == [5, 5]
    dense = [[1.0], [1.2], [1.2], [1.0], [1.2]]  # sessions 0, 1, 2, 0, 1: session 0 placed well
    cut = [[0.9], [0.5], [0.9], [0.9], [0.5]]  # session 1 placed well
    assert measure.best_session(dense, 3) == 1.0 and measure.best_session(cut, 3) == 0.5
    judged = measure.paired_speedup(dense, cut, sessions=3)
    # best against best (the median per-round ratio is 1.2 / 0.9); the spread from the second best sessions
    assert judged["speedup"] == {"p10": pytest.approx(1.2 / 0.9), "p50": 2.0, "p90": 2.0} and not judged["noisy"]
    assert measure.paired_speedup(dense, cut)["speedup"]["p50"] == pytest.approx(1.2 / 0.9)


@pytest.fixture
def linear_pair(tmp_path, monkeypatch):
    """Two Linear checkpoints in prunetool's format that record their input shape, in the working directory."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for name, width in (("big", 64), ("small", 8)):
        prunetool.save(torch.nn.Linear(16, width), tmp_path / f"{name}.safetensors", arch="torch.nn:Linear",
                       arch_kwargs={"in_features": 16, "out_features": width}, record={"input_shape": [16]})
    return tmp_path


def _clock(monkeypatch, step):
    """measure's clock advanced by ``step()`` seconds on each reading."""
    now = [0.0]

    def perf_counter():
        now[0] += step()
        return now[0]

    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=perf_counter, sleep=lambda s: None))


def test_bench_judges_a_noisy_machine_as_shrink_does(linear_pair, monkeypatch, capsys):
    rng = random.Random(0)
    _clock(monkeypatch, lambda: 10 ** rng.uniform(-5, -1))  # 10 µs to 100 ms a call: too busy to time anything
    assert main(["bench", "big.safetensors", "small.safetensors", "--batch-sizes", "1,4", "--runs", "7",
                 "--warmup", "0", "--json", "b.json"]) == 0
    captured = capsys.readouterr()
    report = json.loads((linear_pair / "b.json").read_text())
    assert report["rounds"] == 7
    for r in report["results"]:
        for st in r["batches"].values():
            s = st["speedup"]
            assert st["speedup_vs_first"] == s["p50"] and s["p10"] <= s["p50"] <= s["p90"]
            assert st["noisy"] == (st["spread"] > measure.NOISE) and st["runs"] == 7
            assert st["noisy"] == (r["checkpoint"] == "small.safetensors")  # the first, against itself, is exact
    assert {r["runtime"] for r in report["results"]} == {"torch", "onnxruntime"}
    warned = [line for line in captured.err.splitlines() if "too noisy" in line]
    assert len(warned) == 1 and warned[0].startswith("prunetool: warning: the machine was too noisy to judge the "
                                                     "speed-up of small.safetensors (torch, batch 1: ")
    assert warned[0].count("small.safetensors") == 4 and "big.safetensors" not in warned[0]
    assert "noisy" in captured.out


def test_bench_on_a_steady_machine_warns_of_nothing(linear_pair, monkeypatch, capsys):
    _clock(monkeypatch, lambda: 1e-3)
    assert main(["bench", "big.safetensors", "small.safetensors", "--batch-sizes", "1", "--runs", "3", "--no-onnx",
                 "--json", "b.json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads((linear_pair / "b.json").read_text())["results"]
    assert [r["batches"]["1"]["speedup_vs_first"] for r in rows] == [1.0, 1.0]
    assert not any(r["batches"]["1"]["noisy"] for r in rows) and rows[1]["batches"]["1"]["runs"] == 3
    assert "too noisy" not in captured.err and "noisy" not in captured.out


def test_a_hugging_face_directory_reports_the_parameters_from_pretrained_builds(tmp_path):
    """The reported parameter count is the one from_pretrained builds from the written directory."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama.small"
    small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.5, tokens=16, calib=8, out=str(out),
                                     latency_batches=())
    assert report["settings"]["out_format"] == "huggingface"
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    written = sum(p.numel() for p in back.parameters())
    assert written > measure.params(small)  # the bias flags added zero biases the model in memory lacks
    assert report["after"]["params"] == written
