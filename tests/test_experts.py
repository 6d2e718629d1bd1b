"""Mixture-of-experts: whole experts dropped by their routing mass, and the units inside stacked experts cut per
expert. Removing an expert must equal the dense model routed around it (its router logit at −∞), for Hugging Face's
stacked-parameter experts and a user's ModuleList; removing units inside the experts must equal zeroing them."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from prunetool import expert_units, experts
from prunetool.cli import main
from prunetool.data import Samples

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


def moe_family(family: str):
    """A tiny Hugging Face MoE with stacked experts (random weights, biases too where the family has them)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))
    elif family == "qwen2_moe":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=40, **common))
    else:  # gpt-oss: transposed experts, gate and up interleaved, biases on both projections
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(num_local_experts=4, head_dim=8, **common))
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                nn.init.normal_(p, std=0.2)
    model.config.use_cache = False
    return model.eval()


class UserStackedMoE(nn.Module):
    """A user's mixture with its experts stacked by hand: separate gate and up stacks, a loop over the experts."""

    def __init__(self, d=16, units=24, n=4):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.Module()
        for attr, shape in (("w1", (n, units, d)), ("w3", (n, units, d)), ("w2", (n, d, units))):
            self.experts.register_parameter(attr, nn.Parameter(torch.randn(shape) / shape[-1] ** 0.5))
        self.top_k = 2

    def forward(self, x):
        w, idx = torch.topk(F.softmax(self.gate(x), -1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        ex = self.experts
        for e in range(ex.w1.shape[0]):
            rows, slot = torch.where(idx == e)
            h = F.silu(F.linear(x[rows], ex.w1[e])) * F.linear(x[rows], ex.w3[e])
            out = out.index_add(0, rows, F.linear(h, ex.w2[e]) * w[rows, slot, None])
        return out


class UserStackedNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.moe, self.out = nn.Linear(8, 16), UserStackedMoE(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits if isinstance(model, transformers.PreTrainedModel) else model(x)


def _cut_units(dense, x, kept):
    found, left = expert_units.find(dense, x[:2])
    assert found and not left
    stats = expert_units.statistics(dense, found, Samples(x))
    keep = expert_units.choose(found, expert_units.scores(found, stats), {u.name: kept for u in found})
    small = copy.deepcopy(dense)
    expert_units.cut(small, found, keep)
    return found, stats, keep, small


def _masked(dense, found, keep):
    """The dense model with every expert's removed units zeroed in place of removed."""
    masked = copy.deepcopy(dense)
    modules = dict(masked.named_modules())
    for u in found:
        removed = torch.ones(u.experts, u.units, dtype=torch.bool).scatter_(1, keep[u.name], False)
        for attr, t in expert_units._zeroed(u, removed, outputs=True).items():
            setattr(modules[u.name], attr, nn.Parameter(t))
    return masked


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "user"])
def test_units_cut_inside_experts_equal_the_dense_model_with_them_zeroed(family):
    dense = UserStackedNet().eval() if family == "user" else moe_family(family)
    x = torch.randn(64, 8) if family == "user" else torch.randint(0, VOCAB, (6, 12))
    found, stats, keep, small = _cut_units(dense, x, 16)
    assert all(u.interleaved == (family == "gpt_oss") for u in found)
    assert [len(u.inputs) for u in found] == [2 if family == "user" else 1] * len(found)
    assert all(k.shape == (u.experts, 16) and any(len(set(r.tolist()) ^ set(k[0].tolist())) for r in k)
               for u in found for k in [keep[u.name]])  # each expert keeps its own units
    assert expert_units.check(small, found, keep, stats) < 1e-5
    got, want = _logits(small, x), _logits(_masked(dense, found, keep), x)  # the family's own (grouped) forward
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _logits(dense, x), atol=1e-4)  # the units mattered
    if family == "gpt_oss":  # the other layout would read other units' rows: the check catches it
        found[0].interleaved = False
        wrong = copy.deepcopy(dense)
        expert_units.cut(wrong, found, keep)
        assert expert_units.check(wrong, found, keep, stats) > 1e-3


def test_constant_units_removed_inside_gpt_oss_experts_with_mean_compensation_leave_outputs_equal():
    dense = moe_family("gpt_oss")
    with torch.no_grad():  # units 0-7 of layer 0's experts: biases only, so one activation on every token
        dense.model.layers[0].mlp.experts.gate_up_proj[:, :, :16] = 0
    x = torch.randint(0, VOCAB, (6, 12))
    found = [u for u in expert_units.find(dense, x[:2])[0] if u.name == "model.layers.0.mlp.experts"]
    stats = expert_units.statistics(dense, found, Samples(x))
    keep = {found[0].name: torch.arange(8, 48).expand(found[0].experts, -1)}
    for how, tol in (("mean", 1e-5), ("lstsq", 1e-4)):  # least squares fits the output bias as well
        small = copy.deepcopy(dense)
        expert_units.cut(small, found, keep)
        assert expert_units.compensate(small, found, keep, stats, how) == []
        assert torch.allclose(_logits(small, x), _logits(dense, x), atol=tol, rtol=0), how
    assert not torch.allclose(_logits(small, x) * 0, _logits(dense, x), atol=1e-3)


def test_least_squares_refit_of_the_experts_brings_outputs_closer_than_no_compensation():
    dense = moe_family("mixtral")
    x = torch.randint(0, VOCAB, (16, 12))  # one calibration batch: the fit's own tokens
    found, stats, keep, small = _cut_units(dense, x, 16)
    first, s = found[0], stats[found[0].name]

    def block_error(model):  # layer 0's block on the calibration tokens, against the dense block
        with torch.no_grad(), experts.eager(model):
            got = expert_units._output(dict(model.named_modules())[first.block](*s.args, **s.kwargs))
            want = expert_units._output(dict(dense.named_modules())[first.block](*s.args, **s.kwargs))
        return float((got - want).norm() / want.norm())

    plain, plain_logits = block_error(small), _logits(small, x)
    assert expert_units.compensate(small, found, keep, stats, "lstsq") == []
    want = _logits(dense, x)
    assert block_error(small) < 0.85 * plain
    assert (_logits(small, x) - want).norm() < (plain_logits - want).norm()
    assert expert_units.compensate(copy.deepcopy(small), found, keep, stats, "mean") == [u.name for u in found]


def test_mixtral_expert_units_cut_into_a_directory_from_pretrained_reads(tmp_path, capsys):
    mixtral().save_pretrained(tmp_path / "mixtral")
    code = main(["shrink", str(tmp_path / "mixtral"), "--tokens", "12", "--calib", "16", "--ratio", "0.5",
                 "--no-latency", "-q", "--out", str(tmp_path / "small"), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {layer["name"]: layer for layer in report["layers"]}
    assert (rows["model.layers.1.mlp.experts.units"]["units_before"],
            rows["model.layers.1.mlp.experts.units"]["units_after"]) == (4 * 48, 4 * 24)
    assert report["verify"]["expert_units"] < 1e-5 and report["verify"]["reload_from_pretrained"] == "identical"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert back.config.intermediate_size == 24 and back.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 24)
    assert report["after"]["params"] == sum(p.numel() for p in back.parameters())


def test_a_target_and_a_dry_run_count_the_units_inside_experts(tmp_path, capsys):
    mixtral().save_pretrained(tmp_path / "mixtral")
    code = main(["shrink", str(tmp_path / "mixtral"), "--tokens", "12", "--dry-run", "--json",
                 str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {g["name"]: g["units"] for g in plan["groups"]}["model.layers.0.mlp.experts.units"] == 4 * 48
    half = next(r for r in plan["ratios"] if r["ratio"] == 0.5)
    assert half["params_fraction"] < 0.6 and half["macs_fraction"] < 0.6  # the experts hold most of both
    code = main(["shrink", str(tmp_path / "mixtral"), "--tokens", "12", "--calib", "16", "--target-params", "0.5",
                 "--no-latency", "-q", "--json", str(tmp_path / "t.json"), "--out", str(tmp_path / "t")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["after"]["params"] <= 0.5 * report["before"]["params"]


USER_MOE_FILE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self, never=None):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.moe = nn.Module()
        self.moe.gate = nn.Linear(16, 6, bias=False)
        self.moe.experts = nn.ModuleList(Expert() for _ in range(6))
        self.never = never

    def forward(self, x):
        h = self.inp(x)
        logits = self.moe.gate(h)
        if self.never is not None:  # a router that sends nothing to one expert
            logits = logits.index_fill(-1, torch.tensor([self.never]), float("-inf"))
        w, idx = torch.topk(F.softmax(logits, -1), 2, dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.moe.experts):
            rows, slot = torch.where(idx == e)
            if len(rows):
                out = out.index_add(0, rows, expert(h[rows]) * w[rows, slot, None])
        return self.out(h + out)


def build(never=None):
    return Net(never)
'''


@pytest.mark.parametrize("never", [None, 5])
def test_every_listed_expert_is_traced_and_cut_through_the_cli(tmp_path, capsys, monkeypatch, never):
    (tmp_path / "usermoe.py").write_text(USER_MOE_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib
    import usermoe
    importlib.reload(usermoe)
    torch.manual_seed(0)
    torch.save(usermoe.build(never).state_dict(), tmp_path / "m.pt")
    kwargs = json.dumps({"never": never})
    code = main(["shrink", "m.pt", "--arch", "usermoe.py:build", "--arch-kwargs", kwargs, "--input-shape", "8",
                 "--ratio", "0.5", "--no-latency", "-q", "--out", "small.safetensors", "--json", "r.json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    cut = {layer["name"]: (layer["units_before"], layer["units_after"]) for layer in report["layers"]}
    reached = [e for e in range(6) if e != never]
    assert all(cut[f"moe.experts.{e}.up"] == (24, 12) for e in reached)  # two probe samples reach only some
    protected = {p["name"]: p["reason"] for p in report["protected"]}
    if never is not None:
        assert f"moe.experts.{never}.up" not in cut and "no probe sample" in protected[f"moe.experts.{never}"]
    assert report["verify"]["reload"] == "identical"


def test_expert_unit_counts_are_multiples_of_eight_and_never_cut_at_ratio_zero():
    assert expert_units.kept_count(20, 0.0) == 20 and expert_units.kept_count(2880, 0.0, 128) == 2880
    assert expert_units.kept_count(48, 0.5) == 24 and expert_units.kept_count(48, 0.25) % 8 == 0
