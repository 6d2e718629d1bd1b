"""The hidden size: residual-stream channels removed from a pre-norm decoder (prunetool.width, shrink --hidden)."""

import json
import warnings

import pytest
import torch
import transformers

import prunetool
from prunetool import layers, width
from prunetool.cli import main

from conftest import evci_cnn

QUIET_CHANNELS = [3, 10, 17, 30]  # of 32: no write ever reaches them


def _llama(tmp_path, quiet=(), tied: bool = False, echo: float = 0.0):
    """A small Llama whose stream channels ``quiet`` no write reaches (zero in the embedding, in every attention and
    MLP output projection): the stream holds 0 there for every token; with ``echo``, ``echo`` × channels 0, 1, 2
    and 4 instead."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for norm in [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]:
            norm.weight.uniform_(0.5, 1.5)  # a weight to fold, not ones
        c, source = torch.tensor(quiet, dtype=torch.long), torch.tensor([0, 1, 2, 4][:len(quiet)], dtype=torch.long)
        model.model.embed_tokens.weight[:, c] = echo * model.model.embed_tokens.weight[:, source]
        for layer in model.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight[c] = echo * writer.weight[source]
    model.save_pretrained(tmp_path / "llama")
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("rotate", [True, False])
def test_channels_no_write_reaches_are_removed_with_the_outputs_unchanged(tmp_path, rotate):
    dense = _llama(tmp_path, QUIET_CHANNELS)
    small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, hidden=0.125, rotate=rotate,
                                     compensate="none", tokens=16, calib=16, measure=False)
    row = next(r for r in report["layers"] if r.get("stream"))
    assert (row["units_before"], row["units_after"], row["rotated"]) == (32, 28, rotate)
    assert row["energy_kept"] == pytest.approx(1.0, abs=1e-9) and row["readers_refit"] == 0
    assert small.config.hidden_size == 28 and small.model.embed_tokens.weight.shape == (40, 28)
    x = torch.randint(0, 40, (3, 12))
    assert torch.allclose(_logits(small, x), _logits(dense, x), atol=1e-4)
    if not rotate:  # the channels left are the others, in their order
        kept = [c for c in range(32) if c not in QUIET_CHANNELS]
        assert torch.equal(small.model.embed_tokens.weight, dense.model.embed_tokens.weight[:, kept])


def test_a_narrower_stream_is_written_as_a_directory_from_pretrained_reads_back(tmp_path, capsys, monkeypatch):
    _llama(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["shrink", "llama", "--ratio", "0.25", "--hidden", "0.25", "--tokens", "16", "--calib", "16",
                 "--no-latency", "-q", "--out", "small", "--json", "r.json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["reload_from_pretrained"] == "identical"
    row = next(r for r in report["layers"] if r.get("stream"))
    assert row["units_after"] == 24 and row["readers_refit"] == 2 * 5 + 1  # q, k, v, gate, up per layer; the head
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["hidden_size"] == 24 and config["head_dim"] == 8 and back.model.norm.weight.shape == (24,)
    assert back.config.intermediate_size < 64  # the units went after the stream narrowed
    assert report["after"]["params"] < 0.75 * report["before"]["params"]


def test_the_refit_restores_what_removed_channels_echoed_of_kept_ones(tmp_path):
    """Channels that always hold 0.3 × four others carry the least energy and go (without rotation); what the
    readers read from them, the least-squares refit moves onto the channels they echoed (up to the per-token share of the norm each
    token lost)."""
    dense = _llama(tmp_path, QUIET_CHANNELS, echo=0.3)
    x = torch.randint(0, 40, (4, 16))
    errors = {}
    for compensate in ("none", "lstsq"):
        small, _ = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, hidden=0.125, rotate=False,
                                    compensate=compensate, tokens=16, calib=32, measure=False)
        errors[compensate] = float((_logits(small, x) - _logits(dense, x)).norm() / _logits(dense, x).norm())
    assert errors["none"] > 1e-3 and errors["lstsq"] < 0.05 * errors["none"]


def test_the_refit_reads_outputs_chunk_by_chunk_with_the_same_result(tmp_path, monkeypatch):
    """The readers' dense outputs are computed from their inputs a few token rows at a time (a head over a large
    vocabulary never whole): the fits do not depend on the chunk."""
    _llama(tmp_path, QUIET_CHANNELS, echo=0.3)
    weights = []
    for chunk in (width.HEAD_CHUNK, 7 * 40):  # 7 tokens of the 40-word head at a time
        monkeypatch.setattr(width, "HEAD_CHUNK", chunk)
        small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, hidden=0.125, rotate=False,
                                         tokens=16, calib=16, measure=False)
        assert next(r for r in report["layers"] if r.get("stream"))["readers_refit"] == 11
        weights.append(small.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5, rtol=1e-4) for k in weights[0])


@pytest.mark.parametrize("rotate", [True, False])
def test_a_head_tied_to_the_embedding_is_untied_only_when_the_stream_turns(tmp_path, rotate):
    dense = _llama(tmp_path, tied=True)
    x = torch.randint(0, 40, (2, 9))
    stream = width.find(dense, x)
    assert stream.tied and len(stream.writers) == 4 and stream.norms["model.norm"] == ["lm_head"]
    directions, _ = width.basis(dense, stream, torch.randint(0, 40, (8, 16)), rotate=rotate)
    turned = layers.clone(dense)
    width.slice_stream(turned, stream, directions, 32, rotated=rotate)  # every channel kept: the same model
    assert torch.allclose(_logits(turned, x), _logits(dense, x), atol=1e-4)
    assert (turned.lm_head.weight is turned.model.embed_tokens.weight) == (not rotate)
    assert turned.config.tie_word_embeddings == (not rotate)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_other_families_narrow_and_read_back_with_from_pretrained(tmp_path, family):
    """Qwen2 (biases on q/k/v, the head tied to the embedding: untied by the turn) and Phi-3 (q/k/v and gate/up
    fused in one projection each)."""
    shape = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "qwen2":
        dense = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
    else:
        dense = transformers.Phi3ForCausalLM(transformers.Phi3Config(**shape, pad_token_id=0))
    dense.eval().save_pretrained(tmp_path / family)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _, report = prunetool.shrink(str(tmp_path / family), ratio=0.0, hidden=0.25, tokens=16, calib=16,
                                     out=str(tmp_path / "small"), latency_batches=())
    untied = [str(w.message) for w in said if "unties the head" in str(w.message)]
    assert untied == (["--hidden: turning the stream unties the head from the embedding (40 × 24 more parameters); "
                       "--no-rotate keeps the tie"] if family == "qwen2" else [])
    assert report["verify"]["reload_from_pretrained"] == "identical"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert back.config.hidden_size == 24 and back.config.tie_word_embeddings is False
    row = next(r for r in report["layers"] if r.get("stream"))
    assert row["untied_head"] == (family == "qwen2") and row["readers_refit"] == (11 if family == "qwen2" else 5)


def test_a_bfloat16_model_turns_within_its_rounding_and_reads_back(tmp_path):
    dense = _llama(tmp_path).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "llama")
    small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, hidden=0.25, tokens=16, calib=16,
                                     out=str(tmp_path / "small"), latency_batches=())
    assert report["verify"]["reload_from_pretrained"] == "identical" and small.dtype == torch.bfloat16
    assert transformers.AutoConfig.from_pretrained(tmp_path / "small").hidden_size == 24


def test_a_tied_head_with_channels_as_they_are_stays_tied_through_the_refit(tmp_path):
    _llama(tmp_path, tied=True)
    small, report = prunetool.shrink(str(tmp_path / "llama"), ratio=0.0, hidden=0.25, rotate=False, tokens=16,
                                     calib=16, out=str(tmp_path / "small"), latency_batches=())
    row = next(r for r in report["layers"] if r.get("stream"))
    assert small.lm_head.weight is small.model.embed_tokens.weight and not row["untied_head"]
    assert row["readers_refit"] == 2 * 5  # the head is the embedding's tensor: not refit
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert back.config.tie_word_embeddings and report["verify"]["reload_from_pretrained"] == "identical"


def test_the_hidden_size_kept_is_one_the_family_config_accepts():
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=8, head_dim=16)
    assert width.kept_width(config, 0.25) == 96
    assert width.kept_width(config, 0.3) == 88  # 90 asked: Llama wants a multiple of its 8 heads
    assert width.kept_width(config, 0.3, multiple=16) == 80
    with pytest.raises(width.NotAStream, match="at most 4 channels"):
        width.kept_width(config, 0.97)


def test_hidden_is_refused_in_one_line_where_it_cannot_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(evci_cnn().state_dict(), "cnn.pt")
    _llama(tmp_path)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    for args, needle in [
        (["cnn.pt", "--arch", "samples.nets:EvciCNN", "--input-shape", "1,28,28", "--hidden", "0.1"],
         "Hugging Face decoders"),
        (["gpt2", "--tokens", "8", "--hidden", "0.1"], "an RMSNorm (LayerNorm's mean"),
        (["llama", "--tokens", "8", "--hidden", "1"], "outside [0, 1)"),
        (["llama", "--tokens", "8", "--hidden", "0.1", "--dry-run"], "--hidden"),
        (["llama", "--tokens", "8", "--hidden", "0.1", "--target-params", "0.8", "--axes", "units,blocks"],
         "add hidden to --axes"),
    ]:
        code = main(["shrink", *args, *([] if "--axes" in args else ["--ratio", "0"]), "--calib", "8", "--no-latency", "-q", "--out", "o.safetensors" if args[0] == "cnn.pt" else "o"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()
