"""Mixture-of-experts: whole experts dropped by their routing mass. Removing an expert must equal the dense model
routed around it (its router logit at −∞), for Hugging Face's stacked-parameter experts and a user's ModuleList."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from prunetool import experts
from prunetool.cli import main

VOCAB = 100


class MLP(nn.Module):
    def __init__(self, d=16, h=24):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class UserMoE(nn.Module):
    """A user's top-2 mixture: an nn.Linear router named gate, an nn.ModuleList of experts."""

    def __init__(self, d=16, n=6):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(MLP(d) for _ in range(n))
        self.num_experts, self.top_k = n, 2

    def forward(self, x):
        w, idx = torch.topk(F.softmax(self.gate(x), -1), self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = (idx == e)
            if chosen.any():
                out = out + (w * chosen).sum(-1, keepdim=True) * expert(x)
        return out


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(8, 16), UserMoE(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("make, x", [(mixtral, torch.randint(0, VOCAB, (4, 12))), (UserNet, torch.randn(32, 8))],
                         ids=["mixtral", "user"])
def test_removing_experts_equals_routing_around_them(make, x):
    torch.manual_seed(1)
    dense = make().eval()
    found = experts.blocks(dense)
    assert found and all(b.top_k == 2 for b in found)
    mass = {b.name: torch.rand(b.count, dtype=torch.float64) for b in found}
    keep = experts.choose(found, mass, 0.5)
    small = copy.deepcopy(dense)
    experts.drop(small, keep)
    kw = {"input_ids": x} if isinstance(dense, transformers.PreTrainedModel) else {}
    with torch.no_grad():
        got = small(**kw).logits if kw else small(x)
        with experts.routed_around(dense, keep):
            want = dense(**kw).logits if kw else dense(x)
        plain = dense(**kw).logits if kw else dense(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3)  # the experts mattered
    assert [b.count for b in experts.blocks(small)] == [len(keep[b.name]) for b in found]


def test_experts_kept_are_the_most_routed_to_and_never_below_top_k():
    found = experts.blocks(UserNet())
    mass = {found[0].name: torch.tensor([5.0, 0.0, 3.0, 9.0, 1.0, 2.0], dtype=torch.float64)}
    assert experts.choose(found, mass, 0.5)[found[0].name].tolist() == [0, 2, 3]
    assert experts.choose(found, mass, 0.9)[found[0].name].tolist() == [0, 3]  # top-2 routing needs two


def test_mixtral_drops_half_its_experts_into_a_directory_from_pretrained_reads(tmp_path, capsys):
    mixtral().save_pretrained(tmp_path / "mixtral")
    code = main(["shrink", str(tmp_path / "mixtral"), "--tokens", "12", "--calib", "16", "--ratio", "0.25",
                 "--drop-experts", "0.5", "--no-latency", "-q", "--out", str(tmp_path / "small"), "--json",
                 str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {layer["name"]: layer for layer in report["layers"]}
    block = rows["model.layers.0.mlp.experts"]
    assert (block["units_before"], block["units_after"]) == (4, 2) and block["routed_around"] < 1e-4
    assert report["verify"]["reload_from_pretrained"] == "identical"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert back.config.num_local_experts == 2 and back.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 2


def test_drop_experts_on_a_model_without_experts_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "plainnet.py").write_text("from torch import nn\n\n\ndef build():\n"
                                          "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).state_dict(), tmp_path / "m.pt")
    code = main(["shrink", "m.pt", "--arch", "plainnet:build", "--input-shape", "8", "--drop-experts", "0.5",
                 "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--drop-experts" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.shrunk.safetensors").exists()


def test_a_dry_run_does_not_pretend_to_drop_experts(tmp_path, capsys):
    mixtral().save_pretrained(tmp_path / "mixtral")
    capsys.readouterr()
    code = main(["shrink", str(tmp_path / "mixtral"), "--tokens", "12", "--drop-experts", "0.5", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--dry-run" in err and "--drop-experts" in err and len(err.splitlines()) == 1
