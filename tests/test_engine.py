"""The calibration engine: programs replay the model exactly or refuse; the stage-by-stage refit and means equal
the layer-by-layer ones; positions are per sample; caches past the budget go to float16; image folders stream."""

import copy
import gc
import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunetool
from prunetool.calibrate import Positions, Settings, statistics
from prunetool.replay import Program
from prunetool.store import Store
from prunetool.cut import cut, mask_hooks, select, sequential_means
from prunetool.data import Samples, as_samples, calibration, load_data
from prunetool.score import score, unit_means
from prunetool.trace import trace

import zoo
from conftest import evci_cnn


class Flatten2(nn.Module):
    """A batch size computed in forward (x.view(x.size(0), -1)) must replay at any batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 14 * 14, 5)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def test_program_replays_at_any_batch_size():
    torch.manual_seed(0)
    for model in (Flatten2().eval(), zoo.build("DepthwiseSENet"), zoo.build("ThirdPartyNet")):
        shape = (3, 16, 16)
        program = Program.record(model, torch.randn(3, *shape))
        assert program is not None
        x = torch.randn(7, *shape)
        env = program.start(model, x)
        with torch.no_grad():
            for i in range(len(program.steps)):
                program.execute(i, model, env, 7)
            assert torch.equal(env[program.outputs[0]], model(x))


class Branchy(nn.Module):
    """Data-dependent control flow: the recorded calls are not the model."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) if x.mean() > 0 else self.b(x).relu()


def test_program_refuses_data_dependent_control_flow():
    x = torch.tensor([[1.0] * 4, [1.0] * 4, [-9.0] * 4])  # mean of 2 samples > 0, of 3 samples < 0
    assert Program.record(Branchy().eval(), x) is None


def _cut_both_ways(model, data, compensate):
    samples = calibration(data, 400)  # more samples than the widest refit has inputs: a determined fit
    graph = trace(model, samples.take(2)[0])
    settings = Settings(rows=10 ** 6)  # every position: the two paths then see the same rows
    stats = statistics(model, graph, samples, settings, targets=True)
    keep = select(graph, score(model, graph, "l2", samples, means=stats.means, settings=settings).scores, 0.5)
    if compensate == "mean":
        fast = sequential_means(model, graph, keep, samples, settings=settings)
        slow = {}
        for i, g in enumerate(graph.groups):
            with mask_hooks(model, graph, keep, slow, graph.groups[:i]):
                slow.update(unit_means(model, graph, samples, groups=[g]))
        return fast, slow
    staged = cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=stats, settings=settings)
    assert stats.paths["refit"] == "stage by stage"
    with mock.patch.object(Program, "record", lambda *a, **k: None):  # as for a forward that does not replay
        streamed_stats = statistics(model, graph, samples, settings, targets=True)
        streamed = cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=streamed_stats,
                       settings=settings)
    assert streamed_stats.paths["refit"].startswith("consumer by consumer")
    return staged, streamed


def test_stage_by_stage_refit_equals_consumer_by_consumer(mnist_small):
    staged, streamed = _cut_both_ways(evci_cnn(), mnist_small, "lstsq")
    x = mnist_small.test.tensors[0][:200]
    with torch.no_grad():
        a, b = staged(x), streamed(x)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max())), float((a - b).abs().max())
    for (name, p), q in zip(staged.named_parameters(), streamed.parameters()):
        assert p.shape == q.shape, name


class Odd(nn.Module):
    """A batch-size branch: its recordings at 2 and 3 samples differ, so its forward does not replay."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if x.shape[0] % 2:
            h = h * 1.0
        return self.fc2(h)


class Even(Odd):
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_forward_that_does_not_replay_is_refit_consumer_by_consumer_with_the_same_result():
    torch.manual_seed(0)
    odd = Odd().eval()
    even = Even().eval()
    even.load_state_dict(odd.state_dict())
    x = torch.randn(300, 12)
    samples = as_samples(x)
    assert Program.record(odd, x[:3]) is None and Program.record(even, x[:3]) is not None
    graph = trace(odd, x[:2])
    keep = {g.name: torch.arange(0, g.units, 2) for g in graph.groups}
    results = []
    for model in (odd, even):
        settings = Settings()
        stats = statistics(model, graph, samples, settings, targets=True)
        small = cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=stats, settings=settings)
        results.append((small, stats.paths["refit"]))
    (a, how_a), (b, how_b) = results
    assert how_a.startswith("consumer by consumer") and how_b == "stage by stage"
    with torch.no_grad():
        assert torch.allclose(a.fc2.weight, b.fc2.weight, rtol=1e-4, atol=1e-6)
        assert torch.allclose(a.fc2.bias, b.fc2.bias, rtol=1e-4, atol=1e-6)


def test_stage_by_stage_means_on_a_chain_equal_group_by_group(mnist_small):
    """On a chain every earlier group is upstream: both definitions of 'behind earlier cuts' agree."""
    fast, slow = _cut_both_ways(evci_cnn(), mnist_small, "mean")
    assert set(fast) == set(slow)
    for g in fast:
        for key in fast[g]:
            assert torch.allclose(fast[g][key], slow[g][key], rtol=1e-4, atol=1e-6), (g, key)


def test_positions_are_per_sample_whatever_the_batches():
    pos = Positions(rows=5, samples=10, seed=3)
    ids = torch.arange(10)
    whole = pos.pick("layer", 100, ids, fan_in=10)  # 5 rows per input × 10 inputs / 10 samples: 5 per sample
    again = Positions(rows=5, samples=10, seed=3)
    parts = torch.cat([again.pick("layer", 100, ids[:4], fan_in=10), again.pick("layer", 100, ids[4:], fan_in=10)])
    assert torch.equal(whole, parts) and whole.shape == (10, 5)
    assert len({tuple(r.tolist()) for r in whole}) > 1, "positions differ between samples"
    assert torch.equal(pos.pick("small", 3, ids, fan_in=10), torch.arange(3).expand(10, 3))  # fewer: all
    assert Positions(rows=16, samples=1000).count("wide", 4608) == 74  # rows in proportion to the inputs


def test_store_on_the_cpu_spills_exactly_to_a_file_past_the_budget():
    store = Store(Settings(memory=1000))
    small = store.keep(torch.ones(10))
    big = store.keep(torch.full((20, 50), 1 / 3))
    assert small.path is None and store.used == 40
    assert big.path is not None and os.path.getsize(big.path) == 4000 and store.spilled == 4000
    assert torch.equal(store.get(big), torch.full((20, 50), 1 / 3)) and store.get(big).dtype == torch.float32
    folder = os.path.dirname(big.path)
    store.release(big)
    assert os.listdir(folder) == []
    store.release(small)
    assert store.used == 0
    del store, small, big
    gc.collect()
    assert not os.path.exists(folder)


def test_a_spill_that_cannot_be_written_is_a_usage_error(monkeypatch, tmp_path):
    from prunetool.errors import UsageError

    monkeypatch.setattr("tempfile.mkdtemp", lambda **k: str(tmp_path / "gone"))  # a directory that is not there
    store = Store(Settings(memory=1000))
    with pytest.raises(UsageError, match="--calib-memory.*TMPDIR"):
        store.keep(torch.ones(1000))


def test_cold_tensors_leave_the_budget_first():
    store = Store(Settings(memory=4000))
    assert store.capacity == 3000  # a quarter of the budget is left for the batches
    cold = store.keep(torch.arange(450.0), cold=True)  # 1800 bytes
    hot = store.keep(torch.ones(300))  # 1200 bytes: fits beside it
    assert cold.path is None and hot.path is None and store.used == 3000
    hot2 = store.keep(torch.full((300,), 2.0))  # no room: the cold one goes to the file, the hot one stays
    assert cold.path is not None and hot2.path is None and store.used == 2400
    assert torch.equal(store.get(cold), torch.arange(450.0))
    late = store.keep(torch.zeros(300), cold=True)  # a cold tensor never pushes a hot one out
    assert late.path is not None and hot.path is None and hot2.path is None


def test_batches_are_sized_to_what_the_kept_tensors_leave():
    from types import SimpleNamespace

    from prunetool.calibrate import batch_size

    trace_ = SimpleNamespace(activation_bytes=100)  # a forward keeps about half of it alive
    settings = Settings(memory=1000)
    assert batch_size(trace_, settings) == 20
    assert batch_size(trace_, settings, reserve=600) == 8  # targets the pass will keep
    assert batch_size(trace_, settings, reserve=10 ** 6) == 5  # never less than the last quarter
    assert batch_size(trace_, settings, backward=True) == 10
    settings.cache().keep(torch.ones(150))  # 600 bytes kept
    assert batch_size(trace_, settings) == 8


def test_store_on_an_accelerator_spills_to_host_float16():
    store = Store(Settings(memory=1000))
    store.disk = False  # what a CUDA device sets; the CPU stands in for it here
    big = store.keep(torch.full((1000,), 1 / 3))
    assert big.path is None and big.tensor.dtype == torch.float16 and store.used == 0
    assert store.get(big).dtype == torch.float32
    assert torch.allclose(store.get(big), torch.full((1000,), 1 / 3), rtol=1e-3)


@pytest.mark.parametrize("module, x_shape, out_shape", [
    (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 8, 8), (2, 4, 8, 8)),
    (nn.Conv1d(3, 4, 3), (2, 3, 9), (2, 4, 7)),
    (nn.Linear(5, 4), (2, 7, 5), (2, 7, 4)),
])
def test_sampled_rows_and_targets_are_read_where_the_layer_runs(module, x_shape, out_shape):
    """The engine draws the sampled positions on the CPU; a layer on a GPU reads its rows and targets there. The
    meta device stands in for the GPU: mixing it with the CPU fails as mixing cuda and cpu does."""
    from prunetool import layers
    op, weight = layers.op_of(module), module.weight.to("meta")
    picks = torch.tensor([[0, 2, 6], [1, 3, 4]])  # n × P positions, on the CPU
    rows = op.rows({}, weight, torch.empty(x_shape, device="meta"), picks)
    targets = op.targets(torch.empty(out_shape, device="meta"), picks)
    assert rows.device.type == targets.device.type == "meta"
    assert tuple(rows.shape) == (6, weight[0].numel()) and tuple(targets.shape) == (6, 4)


def test_a_tight_budget_gives_the_same_cut(mnist_small, monkeypatch):
    """The budget changes where kept tensors live, never the result (with the batches held the same)."""
    import prunetool.calibrate as calibrate_module
    import prunetool.cut as cut_module

    monkeypatch.setattr(calibrate_module, "batch_size", lambda *a, **k: 32)
    monkeypatch.setattr(cut_module, "batch_size", lambda *a, **k: 32)
    model = evci_cnn()
    samples = calibration(mnist_small, 96)
    graph = trace(model, samples.take(2)[0])
    results, spilled = [], []
    for memory in (2 ** 30, 2 ** 16):
        settings = Settings(memory=memory)
        stats = statistics(model, graph, samples, settings, targets=True)
        keep = select(graph, score(model, graph, "l2", samples, means=stats.means, settings=settings).scores, 0.5)
        results.append(cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=stats,
                           settings=settings))
        spilled.append(settings.cache().spilled)
    assert spilled[0] == 0 and spilled[1] > 2 ** 19  # the tight budget wrote to the file, exactly
    x = mnist_small.test.tensors[0][:200]
    with torch.no_grad():
        a, b = results[0](x), results[1](x)
    assert torch.equal(a, b)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            d = tmp_path / split / label
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path


def test_image_folders_stream_with_preprocessing(image_folder):
    from prunetool.data import Preprocessing

    data = load_data(str(image_folder), pre=Preprocessing(resize=36, crop=32, mean=(0.5, 0.5, 0.5),
                                                          std=(0.25, 0.25, 0.25)))
    samples = calibration(data, 10)
    assert samples.x is None and len(samples) == 10  # read from disk batch by batch, never held
    batches = list(samples.batches(4))
    assert [len(b[2]) for b in batches] == [4, 4, 2] and batches[0][0].shape == (4, 3, 32, 32)
    assert float(batches[0][0].min()) < -1.0  # normalised
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2)).eval()
    small, report = prunetool.shrink(model, data, ratio=0.5, calib=10, measure=False)
    assert small[2].in_channels == 4 and report["settings"]["engine"]["refit"] == "stage by stage"


def test_unknown_preset_and_half_normalisation_are_refused(tmp_path):
    from prunetool.data import Preprocessing
    from prunetool.errors import UsageError

    with pytest.raises(UsageError, match="unknown --preset"):
        Preprocessing(preset="cifar").check()
    with pytest.raises(UsageError, match="--mean and --std together"):
        Preprocessing(mean=(0.5, 0.5, 0.5)).check()


def test_streamed_and_in_memory_samples_give_the_same_statistics(mnist_small):
    model = evci_cnn()
    memory = calibration(mnist_small, 50)
    x, y = memory.all()
    streamed = Samples(dataset=torch.utils.data.TensorDataset(x, y), indices=list(range(50)))
    graph = trace(model, x[:2])
    a = statistics(model, graph, memory, Settings()).means
    b = statistics(model, graph, streamed, Settings(memory=2 ** 20)).means
    for g in a:
        for key in a[g]:
            assert torch.allclose(a[g][key], b[g][key], atol=1e-6)


def test_an_underdetermined_refit_keeps_the_weights_it_cannot_determine():
    """Fewer calibration rows than inputs (a flattened conv into a wide Linear, few samples): the directions the
    samples do not reach keep the layer's weights instead of blowing up through float32 rounding."""
    from prunetool.cut import Fit
    from prunetool.trace import Consumer

    torch.manual_seed(0)
    layer = nn.Linear(600, 8)
    original = layer.weight.detach().clone()
    fit = Fit(layer, Consumer("fc", layer, bias="bias"), None)
    x = torch.randn(40, 1) @ torch.randn(1, 600) + 1e-3 * torch.randn(40, 600)  # 40 rows, nearly rank one
    fit.add(x, layer(x).detach())
    fit.solve()
    assert torch.isfinite(layer.weight).all()
    assert float((layer.weight - original).norm()) < 0.1 * float(original.norm())
    probe = torch.randn(5, 600)
    with torch.no_grad():
        assert torch.allclose(layer(probe), probe @ original.T + layer.bias, atol=0.5)


def test_statistics_whose_targets_a_refit_used_up_are_refused_not_silently_degraded():
    torch.manual_seed(0)
    model, samples = Even().eval(), as_samples(torch.randn(64, 12))
    graph = trace(model, samples.take(2)[0])
    keep = {g.name: torch.arange(0, g.units, 2) for g in graph.groups}
    stats = statistics(model, graph, samples, Settings(), targets=True)
    cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=stats)
    with pytest.raises(ValueError, match="used up by an earlier refit"):
        cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=stats)


class SeqFirst(nn.Module):
    """Tokens first, as ``nn.Transformer(batch_first=False)`` code has them: no call's rows are the samples'."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 6), nn.Linear(6, 3)

    def forward(self, x):  # x: batch, tokens, features
        h = x.transpose(0, 1)  # tokens, batch, features
        h = self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.transpose(0, 1).mean(1))


class BatchFirst(SeqFirst):
    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))).mean(1))


def test_a_seq_first_consumer_is_refit_on_every_row_as_its_batch_first_twin():
    torch.manual_seed(0)
    seq, bat = SeqFirst().eval(), BatchFirst().eval()
    bat.load_state_dict(seq.state_dict())
    samples = as_samples(torch.randn(200, 5, 6))
    graph = trace(seq, samples.take(2)[0])
    keep = {g.name: torch.arange(0, g.units, 2) for g in graph.groups}
    results = []
    for model in (seq, bat):
        settings = Settings(rows=10 ** 6)  # every position of the batch-first twin: the same rows as every row
        stats = statistics(model, graph, samples, settings, targets=True)
        small = cut(copy.deepcopy(model), graph, keep, "lstsq", samples=samples, stats=stats, settings=settings)
        results.append((small, stats.paths["refit"]))
    (a, how_a), (b, how_b) = results
    assert how_a == "consumer by consumer (every row of fc2)" and how_b == "stage by stage"
    assert torch.allclose(a.fc2.weight, b.fc2.weight, rtol=1e-4, atol=1e-5)
