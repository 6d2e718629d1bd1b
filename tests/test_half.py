"""Half precision end to end (issue 22, first part): bf16 and fp16 checkpoints of Llama-, Qwen2- and GPT-2-style
models and of a CNN prune, verify and reload; the written file keeps the input dtype; the reload check compares
like with like (the saved weights computed in float32 on both sides), so it stays exact."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import prunetool
import zoo

FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)),
    "gpt2": (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
}


def _dtypes_of_dir(d: Path) -> set:
    from safetensors import safe_open

    found = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            found |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return found


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_half_precision_hugging_face_model_prunes_and_reloads(family, dtype, tmp_path):
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    cls(config()).to(dtype).save_pretrained(tmp_path / "src")
    x = {"input_ids": torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(1))}
    for ratio in (0.25, 0.5):
        out = tmp_path / f"out{ratio}"
        small, report = prunetool.shrink(str(tmp_path / "src"), None, ratio=ratio, tokens=8, calib=8, measure=False,
                                         out=str(out))
        written = Path(report["settings"]["out"])
        assert report["verify"]["reload"] == "identical"
        assert str(dtype).replace("torch.", "") in report["verify"]["reload_compared"]
        assert report["after"]["params"] < report["before"]["params"]
        if written.is_dir():  # a directory from_pretrained reads, in the input's dtype
            assert _dtypes_of_dir(written) == {str(dtype).replace("torch.", "").replace("bfloat16", "BF16")
                                               .replace("float16", "F16")}
            back = cls.from_pretrained(written)
        else:
            back = prunetool.load(written).model
        assert {p.dtype for p in back.parameters()} == {p.dtype for p in small.parameters()} == {dtype}
        with torch.no_grad():
            want = small.float().eval()(**x).logits
            got = back.float().eval()(**x).logits
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_cnn_prunes_and_reloads_in_its_dtype(dtype, tmp_path):
    src = tmp_path / "cnn.pt"
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in zoo.build("DepthwiseSENet").state_dict()
                .items()}, src)
    small, report = prunetool.shrink(str(src), None, arch="zoo:DepthwiseSENet", input_shape=(3, 16, 16), ratio=0.5,
                                     calib=16, measure=False, out=str(tmp_path / "o.safetensors"))
    back = prunetool.load(tmp_path / "o.safetensors").model
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert report["settings"]["dtype"] == {"file": str(dtype).replace("torch.", ""), "computed": "float32"}
    assert {p.dtype for p in small.parameters()} == {dtype}  # returned as it is saved
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.float().eval()(x), small.float().eval()(x))
    assert json.loads(json.dumps(report["verify"]))["reload"] == "identical"
