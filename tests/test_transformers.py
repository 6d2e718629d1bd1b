"""Transformers: heads and MLP units of the Hugging Face families, torchvision's ViT and nn.MultiheadAttention;
token data, structured outputs, perplexity, and Hugging Face directories in and out. Tiny random models built
from configs (no download)."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers  # a core dependency: a missing one must fail the suite, not skip it
from torch import nn

import prunetool
from prunetool import layers, task, verify
from prunetool import report as reporting
from prunetool.cli import main
from prunetool.calibrate import Settings, statistics
from prunetool.cut import cut, select
from prunetool.data import as_samples
from prunetool.errors import UsageError
from prunetool.trace import trace

VOCAB = 100


class Logits(nn.Module):
    """A Hugging Face model called with token ids, returning its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def hf_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    T = transformers
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if family == "bert":
        m = T.BertForSequenceClassification(T.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                                                         **small))
    elif family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64,
                                             **small))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64,
                                             **small))
    elif family == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=1, num_labels=10,
                                                    **small))
    m.config.use_cache = False
    return m.eval()


def family_case(family: str):
    """(model, input, expected head-group units, MLP units) of one family."""
    if family == "tv-vit":
        import torchvision

        v = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
        nn.init.normal_(v.heads.head.weight)
        return layers.prepare(v).eval(), torch.randn(8, 3, 32, 32), 4, 64
    if family == "encoder":
        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
                self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = nn.Linear(32, 5)

            def forward(self, x):
                return self.head(self.enc(x).mean(1))

        return layers.prepare(Encoder()).eval(), torch.randn(8, 10, 32), 4, 64
    m = Logits(hf_model(family)).eval()
    if family == "vit":
        return m, torch.randn(8, 1, 16, 16), 4, 64
    heads = 2 if family in ("llama", "qwen2") else 4  # grouped-query attention: a unit is a key/value group
    return m, torch.randint(0, VOCAB, (8, 12)), heads, 128 if family == "gpt2" else 64


FAMILIES = ["bert", "gpt2", "llama", "qwen2", "vit", "tv-vit", "encoder"]


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_mlp_units_are_groups_and_cut_exactly(family):
    model, x, heads, hidden = family_case(family)
    graph = trace(model, x[:2])
    units = sorted({g.units for g in graph.groups if "pooler" not in g.name})
    assert units == sorted({heads, hidden}), [(g.name, g.units) for g in graph.groups]
    assert sum(g.units == heads for g in graph.groups) == 2  # one head group per layer
    verify.check_identity(model, graph, x)
    gen = torch.Generator().manual_seed(1)
    keep = {g.name: torch.sort(torch.randperm(g.units, generator=gen)[: max(1, g.units // 2)]).values
            for g in graph.groups}
    assert verify.check_removal(model, graph, keep, x) < 1e-5  # the cut model equals the masked dense model
    const = verify.check_constant_unit(model, graph, x)
    assert const is not None and const < 1e-5
    small = cut(copy.deepcopy(model), graph, keep, "none")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["tv-vit", "encoder", "gpt2"])
def test_backward_passes_differentiate_activations_only_and_match_a_full_backward(family, monkeypatch):
    """MRS, Taylor, the output sensitivities of data-aware lowrank and inspect's gradients at producer outputs
    freeze the parameters for their backward pass (no weight gradients): their figures equal those of a plain
    backward bit for bit, the first layers still see a gradient, and requires_grad comes back as it was."""
    import contextlib

    from prunetool import calls
    from prunetool.calibrate import Settings, output_sensitivity
    from prunetool.data import as_samples
    from prunetool.redundancy import unit_report
    from prunetool.score import score

    model, x, _, _ = family_case(family)
    y = torch.randint(0, model(x).shape[-1], model(x).shape[:-1], generator=torch.Generator().manual_seed(0))
    graph = trace(model, x[:2])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def figures():
        out = {c: score(model, graph, c, x, y).scores for c in ("mrs", "taylor")}
        out["sensitivity"] = output_sensitivity(model, linears, as_samples(x, y), Settings(), graph)
        out["producer gradients"] = {r["name"]: torch.tensor(r["mean_abs_grad"])
                                     for r in unit_report(model, graph, as_samples(x, y), Settings())}
        return out

    first = next(model.parameters())
    first.requires_grad_(False)  # a parameter the user froze stays frozen
    frozen = figures()
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [p is not first for p in model.parameters()]
    monkeypatch.setattr(calls, "activation_gradients", lambda m: contextlib.nullcontext())
    plain = figures()
    assert set(plain["sensitivity"]) == set(linears)
    for kind in plain:
        for name in plain[kind]:
            assert plain[kind][name].abs().min() > 0, (kind, name)
            assert torch.equal(frozen[kind][name], plain[kind][name]), (kind, name)


def test_grouped_query_attention_removes_whole_key_value_groups():
    model, x, _, _ = family_case("llama")
    graph = trace(model, x[:2])
    g = next(g for g in graph.groups if g.units == 2)
    keep = {other.name: torch.arange(other.units) for other in graph.groups}
    keep[g.name] = torch.tensor([1])
    small = cut(copy.deepcopy(model), graph, keep, "none")
    attn = small.model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 8 and attn.q_proj.out_features == 16  # 1 kv head of 8, its 2 query heads
    assert small.model.config.num_attention_heads == 4  # the config is the family's, widths live on the modules
    with torch.no_grad():
        assert small(x).shape == model(x).shape


def test_structured_outputs_reduce_to_logits_by_the_documented_rule():
    t = torch.randn(2, 3)
    out = transformers.modeling_outputs.SequenceClassifierOutput(loss=torch.tensor(1.0), logits=t)
    assert task.logits(out) is t
    assert task.logits({"hidden": torch.randn(2), "logits": t}) is t
    assert task.logits({"scores": t, "other": torch.randn(2)}) is t  # no "logits": the first tensor
    assert task.logits((t, torch.randn(2))) is t
    assert task.logits((torch.randn(2), t), "1") is t
    with pytest.raises(task.OutputError, match="--output-key"):
        task.logits({"logits": t}, "nope")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer of a small vocabulary, saved the way Hugging Face directories hold one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ("in the beginning god created heaven and earth was without form void darkness upon face of deep "
             "spirit moved waters said let there be light saw that it good divided from").split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    text = " ".join(words[i % len(words)] for i in range(0, 7 * 1200, 7))
    return d, text


def hf_dir(tmp_path, family: str, tokenizer=None):
    d = tmp_path / family
    hf_model(family).save_pretrained(d)
    if tokenizer is not None:
        transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(d)
    return d


def test_llama_directory_in_and_out_reads_back_with_from_pretrained(tmp_path):
    src = hf_dir(tmp_path, "llama")
    out = tmp_path / "llama.small"
    small, report = prunetool.shrink(str(src), ratio=0.5, tokens=16, calib=16, out=str(out), latency_batches=())
    assert report["settings"]["out_format"] == "huggingface"
    assert report["verify"]["reload_from_pretrained"] == "identical"
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 32 and config["num_key_value_heads"] == 1
    assert config["num_attention_heads"] == 2
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(input_ids=x).logits)
    assert json.loads((out / "prunetool.json").read_text())["command"] == "shrink"
    assert prunetool.load(out).record["command"] == "shrink"


def test_drop_heads_removes_the_key_value_group_that_carries_nothing_from_every_layer(tmp_path):
    """Each layer's second key/value group reads values that are zero: its heads add nothing, the criterion ranks
    it last, and removing it from every layer (no compensation) leaves the outputs as they were; the MLP keeps its
    units at ratio 0 and the directory reads back with one group of two heads."""
    model = hf_model("llama")  # 4 heads sharing 2 key/value groups of 8 channels
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[8:] = 0
    model.save_pretrained(tmp_path / "llama")
    graph = trace(Logits(model), torch.randint(0, VOCAB, (2, 12)))
    assert {g.name for g in graph.groups if g.heads} == {f"model.model.layers.{i}.self_attn.q_proj" for i in range(2)}
    out = tmp_path / "llama.small"
    small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, drop_heads=1, compensate="none",
                                     tokens=12, calib=16, out=str(out), latency_batches=())
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["intermediate_size"]) == (1, 2, 64)
    rows = {r["name"]: (r["units_before"], r["units_after"]) for r in report["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"] == rows["model.layers.1.self_attn.q_proj"] == (2, 1)
    assert rows["model.layers.0.mlp.gate_proj"] == (64, 64) and report["settings"]["drop_heads"] == 1
    kept = small.model.layers[0].self_attn.v_proj.weight
    assert torch.equal(kept, model.model.layers[0].self_attn.v_proj.weight[:8])  # the group that carries the values
    x = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        assert torch.allclose(small(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=0)
    assert report["verify"]["reload_from_pretrained"] == "identical"


def test_a_plan_over_heads_removes_the_group_that_carries_nothing_and_units_fill_the_target(tmp_path):
    model = hf_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[8:] = 0  # the second key/value group's heads add nothing
    model.save_pretrained(tmp_path / "llama")
    ids = np.random.default_rng(0).integers(0, VOCAB, (96, 16))
    np.savez(tmp_path / "tok.npz", input_ids=ids)
    small, report = prunetool.shrink(str(tmp_path / "llama"), str(tmp_path / "tok.npz"), axes="units,heads",
                                     target_params=0.8, calib=96, measure=False)
    plan = report["plan"]
    assert [c["heads"] for c in plan["heads"]][:2] == [0, 1] and plan["heads_chosen"] == 1
    assert plan["heads"][1]["divergence"] < plan["heads"][0]["divergence"]
    assert report["settings"]["drop_heads"] == 1 and small.model.layers[0].self_attn.k_proj.out_features == 8
    assert report["after"]["params"] <= 0.8 * report["before"]["params"]
    assert "heads per layer tried 0 (divergence" in reporting.plan_line(plan)


def test_drop_heads_then_a_schedule_counts_its_ratios_from_the_heads_left():
    """8 key/value groups, 2 dropped: the schedule's 0.1 then 0.3 remove floor(0.3·6) = 1 more, leaving 5."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=8, intermediate_size=64, max_position_embeddings=64)
    model = Logits(transformers.LlamaForCausalLM(config).eval())
    _, report = prunetool.shrink(model, drop_heads=2, schedule=[0.1, 0.3], tokens=12, calib=16,
                                 measure=False)
    rows = {r["name"]: (r["units_before"], r["units_after"]) for r in report["layers"]}
    assert rows["model.model.layers.0.self_attn.q_proj"] == rows["model.model.layers.1.self_attn.q_proj"] == (8, 5)
    assert rows["model.model.layers.0.mlp.gate_proj"] == (64, 64 - 19)  # floor(0.3 · 64)


def test_a_head_count_the_config_refuses_is_out_of_reach_for_the_plan_and_refused_when_asked(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")  # 6 heads: 32 is no multiple of 6
    with pytest.raises(UsageError, match="--drop-heads 1: .*refuses num_attention_heads 8 → 6.*--free-widths"):
        prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, drop_heads=1, tokens=12, calib=8, measure=False)
    _, report = prunetool.shrink(str(tmp_path / "llama"), axes="units,heads", target_params=0.8, tokens=12,
                                 calib=32, measure=False)
    tried = report["plan"]["heads"]
    assert "refuses" in tried[1]["error"] and "divergence" not in tried[1]
    assert "divergence" in tried[0] and "divergence" in tried[2]  # the plan went on past the refused count
    assert report["plan"]["heads_chosen"] != 1


def test_drop_heads_refuses_a_count_that_leaves_no_head_and_a_model_without_attention(tmp_path, capsys):
    hf_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(UsageError, match="has 2 heads .* keeps at least one; ask for fewer"):
        prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, drop_heads=2, tokens=12, calib=8, measure=False)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(UsageError, match="no attention heads to remove"):
        prunetool.shrink(mlp, ratio=0.2, drop_heads=1, input_shape=(8,), calib=8, measure=False)
    assert main(["shrink", str(tmp_path / "llama"), "--drop-heads", "-1", "--tokens", "12"]) == 2
    assert "--drop-heads -1 must be 0 or more" in capsys.readouterr().err


def test_ratio_zero_on_a_language_model_changes_nothing(tmp_path):
    src = hf_dir(tmp_path, "qwen2")
    dense = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    small, _ = prunetool.shrink(str(src), ratio=0.0, tokens=12, calib=8, measure=False)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.allclose(small(input_ids=x).logits, dense(input_ids=x).logits, atol=1e-6, rtol=0)


def test_compensation_brings_a_language_model_closer_to_the_dense_one(tmp_path):
    src = hf_dir(tmp_path, "llama")
    dense = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.randint(0, VOCAB, (8, 16))
    ids = np.random.default_rng(0).integers(0, VOCAB, (64, 16))
    np.savez(tmp_path / "tok.npz", input_ids=ids)
    errors = {}
    for how in ("none", "mean", "lstsq"):
        small, _ = prunetool.shrink(str(src), str(tmp_path / "tok.npz"), ratio=0.5, compensate=how, calib=48,
                                    measure=False)
        with torch.no_grad():
            errors[how] = (small(input_ids=x).logits - dense(input_ids=x).logits).pow(2).mean().item()
    assert errors["lstsq"] < min(errors["mean"], errors["none"]), errors


def test_text_data_gives_perplexity_and_a_drop_in_percent(tmp_path, tokenizer_dir):
    tok, text = tokenizer_dir
    src = hf_dir(tmp_path, "gpt2", tokenizer=tok)
    (tmp_path / "text.txt").write_text(text)
    _, report = prunetool.shrink(str(src), str(tmp_path / "text.txt"), ratio=0.25, seq_len=32, calib=20,
                                 latency_batches=())
    m = report["metric"]
    assert m["name"] == "perplexity" and m["unit"] == "%"
    assert m["before"] > 1 and m["after"] > 1
    assert m["drop"] == pytest.approx(100 * (m["after"] / m["before"] - 1))
    assert report["accuracy_drop"] is None  # accuracy here is next-token accuracy, not the metric


def test_token_classifier_data_gives_accuracy(tmp_path):
    src = hf_dir(tmp_path, "bert")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cls.npz", input_ids=rng.integers(0, VOCAB, (60, 12)), attention_mask=np.ones((60, 12)),
             labels=rng.integers(0, 3, 60))
    _, report = prunetool.shrink(str(src), str(tmp_path / "cls.npz"), ratio=0.25, calib=32, latency_batches=())
    assert report["metric"]["name"] == "accuracy" and report["metric"]["unit"] == "pp"
    assert report["accuracy_drop"] == report["metric"]["drop"]


def test_bert_keeps_its_heads_to_stay_a_directory_and_free_widths_falls_back_with_a_note(tmp_path, capsys):
    """BERT derives the head size from the width: no config says "fewer heads", so by default its heads stay whole
    (stated), its MLPs are cut, and the result is a directory; --free-widths cuts the heads too and writes
    prunetool's own file, saying why."""
    src = hf_dir(tmp_path, "bert")
    code = main(["shrink", str(src), "--tokens", "12", "--calib", "16", "--ratio", "0.5", "--no-latency",
                 "--json", str(tmp_path / "r.json"), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["out_format"] == "huggingface" and (tmp_path / "bert.shrunk" / "config.json").exists()
    kept = {layer["name"]: layer["units_after"] for layer in report["layers"]}
    assert kept["bert.encoder.layer.0.attention.self.query"] == 4  # heads: as before the cut
    assert kept["bert.encoder.layer.0.intermediate.dense"] == 32
    assert any("no BertForSequenceClassification config entry sets their width" in r["text"]
               for r in report["rounded"])
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert.shrunk")
    assert back.config.num_attention_heads == 4 and back.config.intermediate_size == 32
    code = main(["shrink", str(src), "--tokens", "12", "--calib", "16", "--ratio", "0.5", "--no-latency",
                 "--free-widths", "--json", str(tmp_path / "f.json"), "-q", "--out", str(tmp_path / "mine")])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "mine.safetensors").exists() and not (tmp_path / "mine").exists()
    assert f"wrote {tmp_path / 'mine.safetensors'}" in out
    report = json.loads((tmp_path / "f.json").read_text())
    assert any("from_pretrained cannot" in n for n in report["notes"])
    again = prunetool.load(tmp_path / "mine.safetensors").model.eval()
    assert again.bert.encoder.layer[0].attention.self.query.out_features == 16
    x = torch.randint(0, VOCAB, (2, 12))
    assert again(input_ids=x).logits.shape == (2, 3)


def test_cli_writes_a_directory_beside_a_directory_and_records_tokens(tmp_path, capsys):
    src = hf_dir(tmp_path, "llama")
    capsys.readouterr()
    code = main(["shrink", str(src), "--tokens", "12", "--calib", "16", "--ratio", "0.25", "--no-latency", "-q"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "llama.shrunk"
    assert (out / "config.json").exists()
    # the output records token inputs: bench and export need no --tokens
    code = main(["bench", str(src), str(out), "--batch-sizes", "1", "--runs", "2", "--warmup", "0", "--no-onnx",
                 "--json", str(tmp_path / "b.json")])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert rows[1]["params"] < rows[0]["params"]


@pytest.mark.parametrize("argv, message", [
    (["--input-shape", "3,8,8"], "token"),
    (["--output-key", "nope"], "--output-key"),
    (["--tokens", "0"], "--tokens 0"),
    (["--arch", "torchvision.models:resnet18"], "--arch"),
])
def test_bad_token_model_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    src = hf_dir(tmp_path, "gpt2")
    capsys.readouterr()
    code = main(["shrink", str(src), "--calib", "8", "--no-latency", *(["--tokens", "8"] if "--tokens" not in argv and
                                                                        "--input-shape" not in argv else []), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "gpt2.shrunk").exists() and not (tmp_path / "gpt2.shrunk.safetensors").exists()


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    src = hf_dir(tmp_path, "gpt2")
    np.savez(tmp_path / "big.npz", input_ids=np.full((10, 8), VOCAB + 5))
    capsys.readouterr()
    code = main(["shrink", str(src), "--data", str(tmp_path / "big.npz"), "--no-latency"])
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary has 100" in err


def test_multihead_attention_keeps_its_interface_after_prepare():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    swapped = layers.prepare(copy.deepcopy(mha))
    assert type(swapped) is not nn.MultiheadAttention and isinstance(swapped, nn.MultiheadAttention)
    q, k = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.rand(5, 7) > 0.8
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": mask}, {"key_padding_mask": torch.zeros(2, 7, dtype=torch.bool)}):
            a, wa = mha(q, k, k, **kwargs)
            b, wb = swapped(q, k, k, **kwargs)
            assert torch.allclose(a, b, atol=1e-5) and torch.allclose(wa, wb, atol=1e-5)


@pytest.mark.parametrize("free", [False, True])
def test_head_counts_the_family_config_refuses_are_rounded_or_fall_back_with_the_reason(tmp_path, capsys, free):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    capsys.readouterr()
    # a quarter of 4 key/value groups: 6 query heads, and Llama's config wants the width a multiple of the heads
    code = main(["shrink", str(tmp_path / "llama"), "--tokens", "12", "--calib", "16", "--ratio", "0.25",
                 "--no-latency", "--json", str(tmp_path / "r.json"), *(["--free-widths"] if free else [])])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    kept = {layer["name"]: layer["units_after"] for layer in report["layers"]}
    if free:  # cut as asked, and written as prunetool's own file with the reason
        assert kept["model.layers.0.self_attn.q_proj"] == 3
        assert any("num_attention_heads 8 → 6" in n for n in report["notes"]), report["notes"]
        assert "note: written as prunetool's own file" in printed
        assert (tmp_path / "llama.shrunk.safetensors").exists()
        return
    # the default: the nearest count the config holds (3 refused; 4 and 2 are as near: the one removing less)
    assert kept["model.layers.0.self_attn.q_proj"] == kept["model.layers.1.self_attn.q_proj"] == 4
    assert kept["model.layers.0.mlp.gate_proj"] == 48
    (rounded,) = report["rounded"]
    assert rounded["asked"] == [3, 3] and rounded["kept"] == 4 and "num_attention_heads 8 → 6" in rounded["text"]
    assert "rounded for a Hugging Face directory" in printed
    out = tmp_path / "llama.shrunk"
    assert report["settings"]["out_format"] == "huggingface" and report["verify"]["reload_from_pretrained"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.config.intermediate_size == 48 and back.config.num_attention_heads == 8
    assert report["after"]["params"] == sum(p.numel() for p in back.parameters())


def test_global_scope_gives_every_layer_one_count_and_a_family_without_mlp_bias_stays_a_directory(tmp_path):
    """Qwen3's config has no MLP bias flag: the refit fits down_proj without one (said in the report), and the
    counts --scope global spreads unevenly are made one per kind of layer."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                      max_position_embeddings=64)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    out = tmp_path / "q.small"
    small, report = prunetool.shrink(str(tmp_path / "qwen3"), ratio=0.4, scope="global", tokens=12, calib=16,
                                     out=str(out), latency_batches=())
    assert report["settings"]["out_format"] == "huggingface"
    kept = {layer["name"]: layer["units_after"] for layer in report["layers"]}
    assert kept["model.layers.0.mlp.gate_proj"] == kept["model.layers.1.mlp.gate_proj"] < 64
    assert small.model.layers[0].mlp.down_proj.bias is None
    assert any("refit without a bias" in r["text"] for r in report["rounded"])
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(input_ids=x).logits)


def test_outputs_inside_an_output_directory_are_refused_before_any_work(tmp_path, capsys):
    src = hf_dir(tmp_path, "llama")
    capsys.readouterr()
    code = main(["shrink", str(src), "--tokens", "8", "--no-latency", "--out", str(tmp_path / "small"),
                 "--json", str(tmp_path / "small" / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "lies inside --out" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not prunetool's")
    code = main(["shrink", str(src), "--tokens", "8", "--no-latency", "--out", str(tmp_path / "mine")])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_sparsify_api_takes_text_data_with_the_tokenizer_named(tmp_path, tokenizer_dir):
    """sparsify() has the CLI's token options: text cut by a tokenizer that lives outside the model directory."""
    tok, text = tokenizer_dir
    src = hf_dir(tmp_path, "gpt2")
    (tmp_path / "text.txt").write_text(text)
    small, report = prunetool.sparsify(str(src), str(tmp_path / "text.txt"), imp=0.3, rounds=1, finetune_epochs=1,
                                       seq_len=16, tokenizer=str(tok), calib=16, batch_size=16, latency_batches=())
    assert report["metric"]["name"] == "perplexity"
    masked = {row["name"] for row in report["sparsity"]}
    assert {"lm_head", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"} <= masked  # GPT-2's Conv1D too
    assert all(row["sparsity"] == pytest.approx(0.3, abs=0.01) for row in report["sparsity"])


def test_bench_exports_the_output_key_it_is_given_and_refuses_a_missing_one(tmp_path, capsys, monkeypatch):
    src = hf_dir(tmp_path, "gpt2")
    common = ["bench", str(src), "--tokens", "8", "--batch-sizes", "1", "--runs", "1", "--warmup", "0"]
    capsys.readouterr()
    from prunetool.commands import bench as bench_command

    keys, real = [], bench_command.export_onnx

    def export(*args, **kwargs):
        keys.append(kwargs.get("output_key"))
        return real(*args, **kwargs)
    monkeypatch.setattr(bench_command, "export_onnx", export)
    code = main([*common, "--output-key", "logits", "--json", str(tmp_path / "b.json")])
    assert code == 0, capsys.readouterr().err
    assert keys == ["logits"]
    assert [r["runtime"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == ["torch", "onnxruntime"]
    code = main([*common, "--output-key", "nope", "--json", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--output-key" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c.json").exists()


def test_only_torch_fused_layers_count_as_fused_and_gpt2_refits_stage_by_stage():
    """A fused fast path (recorded with autograd on, at a forward's memory times several) is torch's own
    transformer layers' alone; GPT-2's Conv1D reads the batch's tokens as rows, checked, so it refits stage by stage
    on sampled positions like any other model."""
    for family in ("gpt2", "llama", "bert", "vit"):
        assert not layers.fused(hf_model(family)), family
    assert layers.fused(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 1, enable_nested_tensor=False))
    model = Logits(hf_model("gpt2")).eval()
    samples = as_samples(torch.randint(0, VOCAB, (48, 12)))
    graph = trace(model, samples.take(2)[0])
    stats = statistics(model, graph, samples, Settings(), targets=True)
    assert {c.name for g in graph.groups for c in g.consumers} <= stats.flattened | set(stats.targets)
    keep = select(graph, {g.name: torch.arange(g.units, dtype=torch.float) for g in graph.groups}, 0.5)
    cut(model, graph, keep, "lstsq", samples=samples, stats=stats)
    assert stats.paths["refit"] == "stage by stage"


def test_opt_heads_follow_the_cut_and_stay_whole_for_a_directory(tmp_path):
    """OPT's attention reshapes with ``view(bsz, -1, self.num_heads, head_dim)``: the attribute must follow the cut
    or the sequence dimension absorbs the missing heads (removal was not zeroing there, and the whole run used to
    be refused). With --free-widths its heads are cut and verified; by default they stay whole (OPT derives the head
    size from the width) and the result is a directory."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    transformers.OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    small, report = prunetool.shrink(str(tmp_path / "opt"), None, ratio=0.5, tokens=32, calib=16, measure=False,
                                     free_widths=True, out=str(tmp_path / "opt.safetensors"))
    units = {g["name"]: (g["units_before"], g["units_after"]) for g in report["layers"]}
    assert units["model.decoder.layers.0.self_attn.q_proj"] == (4, 2)
    assert small.model.decoder.layers[0].self_attn.num_heads == 2
    assert not any("misread" in p["reason"] for p in report["protected"])
    assert report["verify"]["removal_rel_diff"] < 1e-4 and report["verify"]["reload"] == "identical"
    _, report = prunetool.shrink(str(tmp_path / "opt"), None, ratio=0.5, tokens=32, calib=16, measure=False,
                                 out=str(tmp_path / "opt.small"))
    units = {g["name"]: (g["units_before"], g["units_after"]) for g in report["layers"]}
    assert units["model.decoder.layers.0.self_attn.q_proj"] == (4, 4)
    assert units["model.decoder.layers.0.fc1"] == (64, 32)
    assert report["verify"]["reload_from_pretrained"] == "identical"


def _t5(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


def test_an_encoder_decoder_reads_its_targets_by_teacher_forcing_and_is_written_as_a_directory(tmp_path, capsys):
    """T5 needs decoder inputs: from labels of another length in the npz (teacher forcing: the targets shifted
    right), its loss and perplexity on those targets; both stacks' MLPs, self- and cross-attention heads cut (the
    relative-position bias with them), written as a directory that from_pretrained reads back. Random tokens
    (--tokens) work too (the decoder reproduces the input)."""
    src = _t5(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s2s.npz", input_ids=rng.integers(2, VOCAB, (40, 12)), labels=rng.integers(2, VOCAB, (40, 7)))
    code = main(["shrink", str(src), "--data", str(tmp_path / "s2s.npz"), "--ratio", "0.5", "--no-latency", "-q",
                 "--out", str(tmp_path / "t5.small"), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"]["name"] == "perplexity" and report["before"]["perplexity"] > 1
    kept = {layer["name"]: layer["units_after"] for layer in report["layers"]}
    assert kept["encoder.block.0.layer.1.DenseReluDense.wi"] == kept["decoder.block.1.layer.2.DenseReluDense.wi"] == 32
    # self-attention heads (each stack's layers share its relative-position bias: one group) and cross-attention
    assert kept["encoder.block.1.layer.0.SelfAttention.q"] == kept["decoder.block.1.layer.0.SelfAttention.q"] == 2
    assert kept["decoder.block.0.layer.1.EncDecAttention.q"] == 2
    assert report["verify"]["reload_from_pretrained"] == "identical"
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5.small").eval()
    assert back.config.d_ff == 32 and back.config.num_heads == 2
    assert back.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 2
    code = main(["shrink", str(src), "--tokens", "10", "--calib", "16", "--ratio", "0.25", "--no-latency", "-q",
                 "--out", str(tmp_path / "t5.tok")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "t5.tok" / "config.json").exists()


def test_targets_of_another_length_are_refused_for_a_decoder_only_model(tmp_path, capsys):
    src = hf_dir(tmp_path, "llama")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bad.npz", input_ids=rng.integers(0, VOCAB, (20, 12)), labels=rng.integers(0, VOCAB, (20, 7)))
    capsys.readouterr()
    code = main(["shrink", str(src), "--data", str(tmp_path / "bad.npz"), "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "per-token labels need one per token" in err and len(err.splitlines()) == 1


def test_gemma3_heads_pass_through_its_query_and_key_norms():
    """Gemma3's q/k RMSNorm ends in ``type_as(x)``: the second tensor gives only the dtype, so heads stay units."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                        max_position_embeddings=64, sliding_window=16)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    model.config.use_cache = False
    graph = trace(Logits(model), torch.randint(0, VOCAB, (2, 8)))
    heads = next(g for g in graph.groups if g.name.endswith("q_proj"))
    assert heads.units == 2 and {p.name.rsplit(".", 1)[-1] for p in heads.producers} == {"q_proj", "k_proj", "v_proj"}
    assert {m.name.rsplit(".", 1)[-1] for m in heads.members} <= {"q_norm", "k_norm"}


class MaskedAttention(nn.Module):
    """Attention given a float mask as a model input, broadcast over the heads."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.o = heads, nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), \
            nn.Linear(d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def test_a_mask_broadcast_over_the_heads_leaves_them_prunable():
    model = MaskedAttention().eval()
    graph = trace(model, {"x": torch.randn(2, 5, 16), "mask": torch.zeros(2, 1, 5, 5)})
    assert [g.name for g in graph.groups] == ["q"] and graph.groups[0].units == 4


def test_encoder_decoder_labels_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    src = _t5(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", input_ids=rng.integers(2, VOCAB, (20, 8)), labels=np.full((20, 5), VOCAB + 3))
    capsys.readouterr()
    code = main(["shrink", str(src), "--data", str(tmp_path / "big.npz"), "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "labels go up to" in err and len(err.splitlines()) == 1


def test_a_size_target_counts_the_zero_biases_a_config_flag_adds_to_the_written_directory(tmp_path, capsys):
    """The refit gives down_proj a bias; Llama holds it only with mlp_bias, which gives gate_proj and up_proj zero
    biases too: the directory written must still meet --target-params (it missed by those biases before)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    dense = transformers.LlamaForCausalLM(config)
    dense.save_pretrained(tmp_path / "llama")
    out = tmp_path / "small"
    code = main(["shrink", str(tmp_path / "llama"), "--tokens", "12", "--calib", "16", "--target-params", "0.9",
                 "--allocation", "uniform", "--no-latency", "-q", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.config.mlp_bias and not back.model.layers[0].mlp.gate_proj.bias.any()
    assert sum(p.numel() for p in back.parameters()) <= 0.9 * sum(p.numel() for p in dense.parameters())
