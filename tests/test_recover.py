"""Recovery: BatchNorm recalibration, fine-tuning and distillation, step-by-step schedules."""

import pytest
import torch
import torch.nn.functional as F

import prunetool
from prunetool.cli import main
from prunetool.recover import distillation_loss, finetune, recalibrate_bn

from conftest import ROOT, SAMPLES, conv2_bn, evci_cnn


def test_recalibrated_batchnorm_holds_the_calibration_statistics(mnist_small):
    model = conv2_bn()
    x = mnist_small.train.tensors[0][:300]
    seen = {}
    handle = model.features[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    recalibrate_bn(model, x, batch=100)
    bn = model.features[1]
    assert torch.allclose(bn.running_mean, seen["x"].mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, seen["x"].var((0, 2, 3), unbiased=True), rtol=1e-3)
    assert not bn.training


def test_distillation_loss_reduces_to_cross_entropy_when_logits_agree():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert distillation_loss(logits, logits, y, alpha=0.3) == pytest.approx(0.7 * F.cross_entropy(logits, y).item(),
                                                                             rel=1e-5)
    assert distillation_loss(logits, -logits, y) > distillation_loss(logits, logits, y)


@pytest.mark.parametrize("teacher", [False, True])
def test_finetuning_lowers_the_training_loss(mnist_small, teacher):
    small, _ = prunetool.shrink(evci_cnn(), mnist_small, "l2", 0.7, "none", calib=128, measure=False)
    losses = finetune(small, mnist_small, 3, lr=2e-3, batch_size=64, teacher=evci_cnn() if teacher else None)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_schedule_reaches_the_one_shot_size_and_records_steps(mnist_small):
    small, report = prunetool.shrink(evci_cnn(), mnist_small, "mrs", schedule=[0.1, 0.2, 0.4, 0.6], calib=128,
                                     finetune_epochs=1, eval=200)
    assert sum(p.numel() for p in small.parameters()) == 4019
    assert [s["ratio"] for s in report["steps"]] == [0.1, 0.2, 0.4, 0.6]
    assert all("accuracy_after_finetune" in s and "accuracy_after_cut" in s for s in report["steps"])
    assert [layer["units_after"] for layer in report["layers"]] == [4, 7, 26]


@pytest.mark.parametrize("args,needle", [
    (["--finetune-epochs", "1", "--input-shape", "1,28,28"], "--data"),
    (["--distill", "--input-shape", "1,28,28"], "--finetune-epochs"),
    (["--schedule", "0.4,0.2", "--input-shape", "1,28,28"], "--schedule"),
    (["--schedule", "0.1,x", "--input-shape", "1,28,28"], "--schedule"),
])
def test_recovery_bad_input(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    src = tmp_path / "m.pt"
    src.write_bytes((SAMPLES / "evci_cnn.pt").read_bytes())
    assert main(["shrink", str(src), "--arch", "samples.nets:EvciCNN", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_recalibration_that_overflows_float32_is_undone():
    bn = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.fill_(3e38)  # finite while the stored variance is huge; inf once it is re-estimated near 1
        bn.running_var.fill_(1e30)
    model = torch.nn.Sequential(bn).eval()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="non-finite"):
        assert recalibrate_bn(model, x, probe=x[:8]) is False
    assert torch.equal(bn.running_var, torch.full((4,), 1e30)) and torch.isfinite(model(x)).all()
    assert recalibrate_bn(model, x) is True and bn.running_var.max() < 10  # no probe: nothing is checked


def test_clone_copies_a_model_holding_a_cache_filled_with_gradients():
    from prunetool import layers

    class Cached(torch.nn.Module):  # timm's LeViT: an eval-mode forward caches a tensor derived from a parameter
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(3))
            self.bias_cache = {}

        def forward(self, x):
            if "cpu" not in self.bias_cache:
                self.bias_cache["cpu"] = self.bias * 2
            return x + self.bias_cache["cpu"]

    model = Cached().eval()
    model(torch.zeros(1, 3)).sum().backward()
    with pytest.raises(RuntimeError):
        import copy

        copy.deepcopy(model)
    model(torch.zeros(1, 3))
    twin = layers.clone(model)
    with torch.no_grad():
        twin.bias.zero_()
    assert torch.equal(twin(torch.zeros(1, 3)), torch.zeros(1, 3))  # the copy refilled its cache from its own bias


def test_label_free_recovery_of_an_uncut_model_changes_nothing_and_closes_the_gap_of_a_cut_one(mnist_small):
    from prunetool.data import Samples
    from prunetool.recover import distill, output_divergence

    teacher = evci_cnn().eval()
    x = mnist_small.train.tensors[0][:256]
    twin = evci_cnn().eval()
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    report = distill(twin, teacher, Samples(x, None), seconds=1.0)
    # Adam moves it on rounding noise, the held-out inputs see it worse, and the weights are put back
    assert report["divergence_before"] == 0 and report["steps"] > 0 and not report["kept"]
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())
    small, _ = prunetool.shrink(teacher, mnist_small, ratio=0.6, compensate="none", calib=128, measure=False)
    report = distill(small, teacher, Samples(x, None), seconds=3.0)
    assert report["kept"] and report["held_out_after"] < report["held_out_before"]
    # the weights returned are those of the pass whose held-out divergence (the last 26 samples) was the lowest
    assert report["held_out"] == 26 and 1 <= report["pass_kept"] <= report["passes"]
    with torch.no_grad():
        held = float(output_divergence(small(x[-26:]), teacher(x[-26:])))
    assert held == pytest.approx(report["held_out_after"], abs=2e-6)
    assert report["divergence_after"] < 0.5 * report["divergence_before"]
    with torch.no_grad():
        test = mnist_small.test.tensors[0][:256]
        assert float(output_divergence(small(test), teacher(test))) < report["divergence_before"]


def test_mixup_mixes_floating_inputs_in_pairs_and_leaves_token_ids_alone():
    from prunetool.recover import mixed

    gen = torch.Generator().manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1).expand(8, 3, 2).contiguous()  # sample i is i everywhere
    m = mixed(x, gen)
    assert m.shape == x.shape and not torch.equal(m, x)
    # each mixture is one value per sample, between the batch's smallest and largest
    assert torch.equal(m.amax((1, 2)), m.amin((1, 2))) and m.min() >= 0 and m.max() <= 7
    named = {"a": x[:, 0, :1].clone(), "b": 10 * x[:, :2, :2].clone()}  # N × 1 and N × 2 × 2 inputs
    both = mixed(named, gen)
    assert torch.allclose(both["b"], 10 * both["a"].view(8, 1, 1).expand(8, 2, 2))  # one λ and one pairing
    ids = torch.randint(0, 50, (8, 5))
    with_mask = {"input_values": torch.rand(4, 3), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    assert mixed(ids, gen) is ids and mixed(with_mask, gen) is with_mask
    assert torch.equal(mixed(x[:1], gen), x[:1])


def test_shuffled_samples_keep_each_sample_with_its_id():
    from prunetool.data import Samples

    x = torch.arange(10.0).view(10, 1) * 3
    shuffled = Samples(x, None).shuffled(torch.Generator().manual_seed(1))
    got = torch.cat([xb for xb, _, _ in shuffled.batches(4)])
    ids = torch.cat([i for _, _, i in shuffled.batches(4)])
    assert not torch.equal(got, x) and torch.equal(got, x[ids]) and sorted(ids.tolist()) == list(range(10))
    read = Samples(dataset=torch.utils.data.TensorDataset(x, torch.zeros(10)), indices=list(range(10)))
    shuffled = read.shuffled(torch.Generator().manual_seed(1))
    got, ids = (torch.cat(t) for t in zip(*[(xb, i) for xb, _, i in shuffled.batches(4)]))
    assert not torch.equal(got, x) and torch.equal(got, x[ids])


def test_the_cli_recovers_without_labels_and_reports_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(evci_cnn().state_dict(), "m.pt")
    code = main(["shrink", "m.pt", "--arch", "samples.nets:EvciCNN", "--input-shape", "1,28,28", "--ratio", "0.5",
                 "--compensate", "none", "--calib", "64", "--recover", "2", "--no-latency", "-q", "--json", "r.json",
                 "--out", "small.safetensors"])
    assert code == 0, capsys.readouterr().err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    step = report["steps"][0]["recover"]
    assert report["settings"]["recover"] == 2 and step["divergence_after"] < step["divergence_before"]
    assert report["verify"]["reload"] == "identical"


def test_ratio_zero_with_recovery_changes_nothing_even_with_few_samples():
    dense = evci_cnn().eval()
    small, report = prunetool.shrink(dense, input_shape=(1, 28, 28), ratio=0.0, calib=32, recover=1.0,
                                     measure=False)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(small(x), dense(x))
    assert report["steps"][0]["recover"]["kept"] is False and report["steps"][0]["recover"]["held_out"] == 0


def test_label_free_recovery_runs_under_progress_bars(mnist_small):
    from prunetool.data import Samples
    from prunetool.progress import Bars
    from prunetool.recover import distill

    report = distill(evci_cnn().eval(), evci_cnn().eval(), Samples(mnist_small.train.tensors[0][:96], None),
                     seconds=0.5, bars=Bars(True))
    assert report["steps"] > 0 and report["held_out"] == 16


def test_the_divergence_reads_outputs_as_the_fidelity_metric_does():
    """Logits (N × C, per token with token inputs, per pixel) are compared by KL, which a constant shift of the
    logits leaves at 0; a detector's raw N × 84 × A head, or what --fidelity error names, by the relative error."""
    from prunetool.recover import output_divergence

    torch.manual_seed(0)
    logits, tokens, pixels, head = (torch.randn(4, 10), torch.randn(2, 5, 30), torch.randn(2, 6, 4, 4),
                                    torch.randn(2, 84, 50))
    assert float(output_divergence(logits + 3.0, logits)) < 1e-6
    assert float(output_divergence(tokens + 3.0, tokens, tokens=True)) < 1e-6
    assert float(output_divergence(pixels + 3.0, pixels)) < 1e-6
    relative = float((3.0 ** 2 * head.numel()) / head.pow(2).sum())
    assert float(output_divergence(head + 3.0, head)) == pytest.approx(relative, rel=1e-4)
    assert float(output_divergence(tokens + 3.0, tokens)) > 1.0  # the same 3-D shape without token inputs
    assert float(output_divergence(logits + 3.0, logits, metric="output error")) > 1.0


def test_a_temperature_softens_the_softmax_as_distillation_does_and_leaves_an_error_alone():
    """Label-free recovery trains at a temperature: T²·KL of the softened softmaxes, the labelled distillation's
    term; the relative error of other outputs is scale-free, so T leaves it as it is."""
    from prunetool.recover import distillation_loss, output_divergence

    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert float(output_divergence(s, t, temperature=4.0)) == pytest.approx(
        float(distillation_loss(s, t, y, temperature=4.0, alpha=1.0)), rel=1e-5)
    assert float(output_divergence(s, t, temperature=4.0)) != pytest.approx(float(output_divergence(s, t)), rel=1e-2)
    head_s, head_t = torch.randn(2, 84, 50), torch.randn(2, 84, 50)
    assert float(output_divergence(head_s, head_t, temperature=4.0)) == pytest.approx(
        float(output_divergence(head_s, head_t)), rel=1e-6)


def test_label_free_recovery_trains_at_its_temperature_and_checks_at_one(mnist_small, monkeypatch):
    """Every training step's loss is taken at RECOVER_TEMPERATURE; every keep-or-undo check at T = 1."""
    from prunetool import recover
    from prunetool.data import Samples

    seen = []
    real = recover.output_divergence

    def recording(*args, **kwargs):
        seen.append((torch.is_grad_enabled(), args[4] if len(args) > 4 else kwargs.get("temperature", 1.0)))
        return real(*args, **kwargs)

    monkeypatch.setattr(recover, "output_divergence", recording)
    recover.distill(evci_cnn().eval(), evci_cnn().eval(), Samples(mnist_small.train.tensors[0][:96], None), 1.0)
    assert {t for grad, t in seen if grad} == {recover.RECOVER_TEMPERATURE} == {4.0}
    assert {t for grad, t in seen if not grad} == {1.0}


def test_one_output_column_is_compared_by_error_even_when_called_logits():
    from prunetool.recover import output_divergence

    scores = torch.randn(8, 1)
    assert float(output_divergence(scores + 1.0, scores, metric="agreement")) > 0.5
