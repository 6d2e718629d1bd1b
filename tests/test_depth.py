"""Depth: whole residual blocks removed, and a removed block that did nothing leaves the outputs as they were."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

import prunetool
from prunetool import depth
from prunetool.layers import clone
from prunetool.cli import main

NET = '''import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(width) for _ in range(4)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build(width=8):
    return Net(width)
'''


def _net(tmp_path, dead: int):
    """A residual CNN whose block ``dead`` adds nothing (its last BatchNorm outputs 0), saved as a state dict."""
    (tmp_path / "resnet_user.py").write_text(NET)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        import resnet_user
        importlib.reload(resnet_user)
        model = resnet_user.build().eval()
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.bn1.running_var.uniform_(0.5, 2)
            block.bn2.running_var.uniform_(0.5, 2)
        model.blocks[dead].bn2.weight.zero_()
        model.blocks[dead].bn2.bias.zero_()
    torch.save(model.state_dict(), tmp_path / "net.pt")
    return model


def test_a_block_that_adds_nothing_is_removed_first_and_the_outputs_stay_equal(tmp_path, capsys, monkeypatch):
    dense = _net(tmp_path, dead=2)
    monkeypatch.chdir(tmp_path)
    code = main(["shrink", "net.pt", "--arch", "resnet_user.py:build", "--input-shape", "1,12,12", "--ratio", "0",
                 "--drop-blocks", "1", "--no-recalibrate-bn", "--no-latency", "-q", "--out", "small.safetensors",
                 "--json", "r.json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["name"]: r for r in report["layers"] if r.get("block")}
    assert set(rows) == {f"blocks.{i}" for i in range(4)}
    assert [n for n, r in rows.items() if r["units_after"] == 0] == ["blocks.2"]
    assert rows["blocks.2"]["divergence_alone"] < 1e-9 < min(r["divergence_alone"] for n, r in rows.items()
                                                              if n != "blocks.2")
    assert report["verify"]["reload"] == "identical"
    # read back in a fresh process from another directory: the block is gone and the outputs are the dense model's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    x = torch.randn(3, 1, 12, 12)
    torch.save(x, elsewhere / "x.pt")
    with torch.no_grad():
        torch.save(dense(x), elsewhere / "want.pt")
    script = ("import torch, prunetool; m = prunetool.load('../small.safetensors').model.eval(); "
              "assert type(m.blocks[2]).__name__ == 'Skip', m.blocks[2]; "
              "assert sum(p.numel() for p in m.blocks[2].parameters()) == 0; "
              "out = m(torch.load('x.pt')); assert torch.allclose(out, torch.load('want.pt'), atol=1e-5), "
              "(out - torch.load('want.pt')).abs().max()")
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_more_blocks_than_the_model_has_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    _net(tmp_path, dead=0)
    monkeypatch.chdir(tmp_path)
    code = main(["shrink", "net.pt", "--arch", "resnet_user.py:build", "--input-shape", "1,12,12", "--ratio", "0",
                 "--drop-blocks", "5", "-q"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "--drop-blocks 5" in errors[0] and "4 removable" in errors[0]
    assert not list(tmp_path.glob("*.shrunk*"))


def test_only_residual_shaped_blocks_called_once_are_found():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
            self.b = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
            self.widen = nn.ModuleList([nn.Sequential(nn.Linear(6, 9)), nn.Sequential(nn.Linear(9, 6))])

        def forward(self, x):
            x = self.b(self.a(self.a(x)))  # a is called twice: removing it is not one removal
            return self.widen[1](self.widen[0](x))  # not of their input's shape

    found = depth.find(Twice(), torch.randn(4, 6))
    assert found == []


def _llama(tmp_path, dead: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[dead].self_attn.o_proj.weight.zero_()
        model.model.layers[dead].mlp.down_proj.weight.zero_()
    model.save_pretrained(tmp_path / "llama")
    return model


def test_a_language_model_loses_a_layer_that_adds_nothing_and_reads_back_with_from_pretrained(tmp_path):
    dense = _llama(tmp_path, dead=1)
    out = tmp_path / "llama.small"
    small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, drop_blocks=1, tokens=16, calib=16,
                                     out=str(out), latency_batches=())
    removed = [r for r in report["layers"] if r.get("block") and r["units_after"] == 0]
    assert [r["name"] for r in removed] == ["model.layers.1"]
    refits = removed[0]["compensation"]  # the block before it first, then each later one, then the stream's readers
    assert [r["refit"] for r in refits] == [f"model.layers.{i}.{w}" for i in (0, 2, 3)
                                            for w in ("self_attn.o_proj", "mlp.down_proj")] + \
        ["the stream's 11 readers after them"]  # q, k, v, gate, up of layers 2 and 3, and the head
    assert report["verify"]["reload_from_pretrained"] == "identical"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and len(config.get("layer_types") or [0] * 3) == 3
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert [layer.self_attn.layer_idx for layer in back.model.layers] == [0, 1, 2]
    x = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, dense(x).logits, atol=1e-5)
        # the dense model is untouched: its config still has four layers
        assert dense.config.num_hidden_layers == 4 and len(dense.model.layers) == 4



def test_a_decoder_layer_removed_refits_both_writers_before_and_after_it_then_only_the_readers_after_it(tmp_path):
    dense = _llama(tmp_path, dead=3)
    torch.manual_seed(1)
    tokens = torch.randint(0, 40, (96, 16))
    found = depth.find(dense, tokens[:4])
    small = clone(dense)
    refit = depth.Refit(dense, found, tokens, "lstsq")
    with depth.skipped(small, ["model.layers.1"]):
        before = refit.divergence(small)
        records = refit.apply(small, ["model.layers.1"])
        after = refit.divergence(small)
    assert [r["refit"] for r in records[:-1]] == [f"model.layers.{i}.{w}" for i in (0, 2, 3)
                                                  for w in ("self_attn.o_proj", "mlp.down_proj")]
    assert records[-1]["refit"] == "the stream's 11 readers after them"
    assert all(r["divergence_after"] < r["divergence_before"] for r in records if r["kept"])
    assert any(r["kept"] for r in records) and after < before
    layer0, layer2 = small.model.layers[0], small.model.layers[2]
    assert torch.equal(layer0.self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(layer0.mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(layer2.self_attn.q_proj.weight, dense.model.layers[2].self_attn.q_proj.weight) or \
        not records[-1]["kept"]


def test_where_the_greedy_choice_misses_a_block_that_adds_nothing_shortgpts_choice_compensated_in_full_wins(
        tmp_path, monkeypatch):
    _llama(tmp_path, dead=1)  # layer 1 adds nothing: block influence 0, and removing it changes no output

    def greedy_missed(model, blocks, inputs, count, *args, **kwargs):  # a greedy order that starts elsewhere
        order = ["model.layers.2", "model.layers.1", "model.layers.0", "model.layers.3"][:count]
        return order, [{b.name: 0.1 for b in blocks}] * count

    monkeypatch.setattr(depth, "choose", greedy_missed)
    _, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, drop_blocks=1, tokens=16, calib=16,
                                 latency_batches=())
    removed = [r for r in report["layers"] if r.get("block") and r["units_after"] == 0]
    assert [r["name"] for r in removed] == ["model.layers.1"]
    assert removed[0]["chosen_by"].startswith("block influence (ShortGPT)")
    assert report["metric"]["drop"] == pytest.approx(0, abs=1e-4)

class Res(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))

    def forward(self, x):
        return x + self.f(x)


def test_blocks_within_blocks_count_once_and_choosing_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(Res(), Res()), nn.Sequential(Res(), Res()), nn.Linear(6, 3)).eval()
    x = torch.randn(16, 6)
    want = model(x)
    found = depth.find(model, x)
    assert sorted(b.name for b in found) == ["0.0", "0.1", "1.0", "1.1"]  # the stages hold blocks: not blocks
    names, rounds = depth.choose(model, found, x, 3)
    assert len(set(names)) == 3 and len(rounds) == 3
    assert all(type(m).__name__ == "Res" for m in (model[0][0], model[0][1], model[1][0], model[1][1]))
    assert torch.equal(model(x), want)


def test_a_language_model_without_a_layer_written_as_prunetools_own_file_reloads(tmp_path):
    _llama(tmp_path, dead=2)
    out = tmp_path / "small.safetensors"
    _, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, drop_blocks=1, tokens=16, calib=16,
                                 out=str(out), latency_batches=(), measure=False)
    assert report["verify"]["reload"] == "identical"
    back = prunetool.load(out).model
    assert back.config.num_hidden_layers == 3 and len(back.model.layers) == 3


def test_the_block_before_a_removed_one_learns_to_write_what_it_wrote():
    """Block 0 writes nothing, block 1 reads the same hidden units as block 0 and writes through its own output
    layer: removing block 1, the least-squares refit of block 0's output layer restores the outputs exactly, where
    removing it alone does not; the refit is kept and named."""
    from prunetool.data import Samples

    torch.manual_seed(0)
    model = nn.Sequential(Res(), Res(), Res(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].f[2].weight.zero_()
        model[0].f[2].bias.zero_()
        model[1].f[0].load_state_dict(model[0].f[0].state_dict())
    x = torch.randn(400, 6)
    want = model(x)
    found = depth.find(model, x[:8])
    small = prunetool.layers.clone(model)
    with depth.skipped(small, ["1"]):
        removed_only = small(x)
        records = depth.absorb(small, model, found, ["1"], Samples(x, None), "lstsq")
        got = small(x)
    assert (removed_only - want).abs().max() > 0.1
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    first = records[0]
    assert first["refit"] == "0.f.2" and first["kept"] and first["blocks"] == ["1"]
    assert first["divergence_after"] < 1e-4 * first["divergence_before"]
    assert all(r["blocks"] == ["1"] for r in records[1:])  # block 2 may take up what is left, block 1 only
    assert torch.equal(model(x), want)  # the dense model is untouched


def _block_1_refit(x: torch.Tensor, compensate: str):
    """Three residual blocks and a head, and a copy with block 1 skipped and the rest refit by ``compensate`` on
    ``x``: (model, copy, the refits' records)."""
    from prunetool.data import Samples

    torch.manual_seed(0)
    model = nn.Sequential(Res(), Res(), Res(), nn.Linear(6, 3)).eval()
    small = prunetool.layers.clone(model)
    with depth.skipped(small, ["1"]):
        records = depth.absorb(small, model, depth.find(model, x[:8]), ["1"], Samples(x, None), compensate)
    return model, small, records


def test_without_compensation_no_block_is_refit():
    model, small, records = _block_1_refit(torch.randn(64, 6), "none")
    assert records == [] and torch.equal(small[0].f[2].weight, model[0].f[2].weight)


def test_the_choice_compares_blocks_after_their_compensation():
    """With a refit, each block is judged by the held-out divergence once the block before it has refit (never
    worse than without: a refit that does not help is undone), and the least is removed; the model is untouched."""
    from prunetool.data import Samples

    torch.manual_seed(0)
    model = nn.Sequential(Res(), Res(), Res(), Res(), nn.Linear(6, 3)).eval()
    x = torch.randn(400, 6)
    want = model(x)
    found = depth.find(model, x[:8])
    refit = depth.Refit(model, found, Samples(x, None), "lstsq")
    names, rounds = depth.choose(model, found, x[:64], 1, refit=refit)
    bare = {}
    for b in found:
        with depth.skipped(model, [b.name]):
            bare[b.name] = refit.divergence(model)
    assert set(rounds[0]) == set(bare) and all(rounds[0][n] <= bare[n] for n in bare)
    assert any(rounds[0][n] < 0.9 * bare[n] for n in bare)  # the refit helps somewhere
    assert names == [min(rounds[0], key=rounds[0].get)]
    assert torch.equal(model(x), want)


def test_lowrank_then_a_layer_removed_keeps_each_factorisation_on_its_renumbered_layer(tmp_path):
    """A Hugging Face model factored by lowrank (prunetool's file), then a decoder layer removed: the layers after
    it are renumbered, and the structural record follows them, so the file reloads identical."""
    _llama(tmp_path, dead=1)
    factored = tmp_path / "lr.safetensors"
    prunetool.lowrank(str(tmp_path / "llama"), rank=4, tokens=16, calib=16, out=str(factored), latency_batches=(),
                      measure=False)
    out = tmp_path / "small.safetensors"
    small, report = prunetool.shrink(str(factored), ratio=0.0, drop_blocks=1, tokens=16, calib=16, out=str(out),
                                     latency_batches=(), measure=False)
    assert [r["name"] for r in report["layers"] if r.get("block") and r["units_after"] == 0] == ["model.layers.1"]
    assert report["verify"]["reload"] == "identical"
    back = prunetool.load(out).model.eval()
    assert len(back.model.layers) == 3
    for i in range(3):  # every remaining layer still factored (a Sequential of two), layers 2 and 3 now 1 and 2
        assert isinstance(back.model.layers[i].mlp.down_proj, nn.Sequential)
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(x).logits)


def test_a_refit_with_a_single_calibration_sample_changes_nothing_and_does_not_fail():
    model, small, records = _block_1_refit(torch.randn(1, 6), "lstsq")
    assert records and not any(r["kept"] for r in records)
    assert torch.equal(small[0].f[2].weight, model[0].f[2].weight)
