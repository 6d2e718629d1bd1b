"""Models larger than memory (issue 22, parts 2 and 3): half-precision weights stay in their dtype and are computed
in float32 at the point of use, exactly as a float32 copy would compute them; the cut shares what it does not change
with the dense model and never writes into it; peak memory is estimated before loading and a run that cannot fit
is refused in one line naming the flags that help."""

import copy

import pytest
import torch
import transformers
from torch import nn

import prunetool
import zoo
from prunetool import layers, memory, precision
from prunetool.cli import main


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_weights_compute_exactly_as_their_float32_copy(dtype):
    model = _llama().to(dtype)
    wide = copy.deepcopy(model).float()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), precision.Compute():
        got = model(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, wide(input_ids=ids).logits)
    assert {p.dtype for p in model.parameters()} == {dtype}  # nothing was converted in place


def test_a_backward_pass_through_half_weights_matches_float32_and_keeps_no_float32_copy(monkeypatch):
    model = zoo.build("DepthwiseSENet").eval().to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    wide = copy.deepcopy(model).float()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wide(xa).square().sum().backward()
    kept, original = [], precision.Compute._pack
    monkeypatch.setattr(precision.Compute, "_pack", lambda self, t: kept.append(original(self, t)) or kept[-1])
    with precision.Compute():
        model(xb).square().sum().backward()
    assert torch.equal(xb.grad, xa.grad)
    sources = [k[0] for k in kept if isinstance(k, tuple)]  # what autograd kept of the weights: the bf16 originals
    assert sources and all(s.dtype == torch.bfloat16 for s in sources)


def test_shrink_leaves_a_callers_module_untouched_and_returns_tensors_of_its_own():
    model = zoo.build("DepthwiseSENet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, _ = prunetool.shrink(model, None, ratio=0.5, calib=16, input_shape=(3, 16, 16), measure=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN recalibrated on its own copy
    mine = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not any(t.data_ptr() in mine for t in list(small.parameters()) + list(small.buffers()))


def test_a_shared_clone_costs_no_copy_and_unshare_gives_one():
    model = zoo.build("DepthwiseSENet")
    twin = layers.clone(model, share=True)
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert twin is not model and all(a is not b for a, b in zip(model.modules(), twin.modules()))
    layers.unshare(twin, model)
    assert not any(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_the_report_gives_the_estimate_and_the_peak(tmp_path):
    d = tmp_path / "src"
    _llama().to(torch.bfloat16).save_pretrained(d)
    _, report = prunetool.shrink(str(d), None, ratio=0.5, tokens=8, calib=8, measure=False)
    m = report["memory"]
    assert m["weights_bytes"] == sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert m["weights_on_demand"]  # bf16 safetensors in a Hugging Face directory: mapped, read as used
    assert m["estimate_bytes"] == memory.estimate(m["weights_bytes"], prunetool.options.DEFAULT_CALIB_MEMORY,
                                                  prunetool.data.OUTPUT_BYTES, on_demand=True)
    assert memory.estimate(100, 0, 0, on_demand=True) < memory.estimate(100, 0, 0)
    assert 0 < m["peak_bytes"]


def test_a_run_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    d = tmp_path / "src"
    _llama().to(torch.bfloat16).save_pretrained(d)
    capsys.readouterr()
    monkeypatch.setattr(memory, "available", lambda: 100 << 20)
    monkeypatch.setattr(prunetool.commands.common, "load", lambda *a, **k: pytest.fail("loaded before the check"))
    assert main(["shrink", str(d), "--tokens", "8", "--calib", "8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--calib-memory" in err and "100 MiB is available" in err
    assert not (tmp_path / "o").exists()


def test_offload_needs_a_gpu(tmp_path, capsys):
    assert main(["shrink", str(tmp_path / "m.pt"), "--offload", "--input-shape", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "--offload" in err and "--device cuda" in err


def test_offload_onloads_parameters_to_the_compute_device():
    """The mode's onloading (here to the CPU device itself, as no GPU is lent in CI): results are unchanged."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(torch.bfloat16)
    x = torch.randn(5, 4)
    with torch.no_grad(), precision.Compute("cpu"):
        got = model(x)
    assert torch.equal(got, copy.deepcopy(model).float()(x))


def test_a_file_checked_after_writing_reuses_the_tensors_in_memory_only_when_equal_bit_for_bit(tmp_path):
    model = zoo.build("DepthwiseSENet").eval()
    path = tmp_path / "m.safetensors"
    from prunetool.load import load, write_file

    write_file(path, model, "zoo:DepthwiseSENet")
    state = model.state_dict()
    back = load(path, reuse=state).model
    ptrs = {t.data_ptr() for t in state.values()}
    assert all(t.data_ptr() in ptrs for t in back.state_dict().values())  # no second copy
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    changed = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in changed.items() if v.is_floating_point() and v.numel() > 1)
    changed[key].view(-1)[0] += 1  # one weight differs from the file: the file's own is read
    again = load(path, reuse=changed).model
    assert again.state_dict()[key].data_ptr() != changed[key].data_ptr()
    assert torch.equal(again.state_dict()[key], state[key])


def test_a_cut_copies_only_the_tensors_it_slices(mnist_small):
    from conftest import evci_cnn, traced
    from prunetool.cut import cut, plan_cut

    dense, graph, x, _ = traced(evci_cnn(), mnist_small, 64)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    first, *rest = graph.groups
    keep = {g.name: torch.arange(g.units // 2 if g is first else g.units) for g in graph.groups}
    small = cut(layers.clone(dense, share=True), graph, keep, "none")
    touched = {f"{name}.{attr}" for (name, attr, _), drop in plan_cut(graph, keep).drops.items() if drop}
    assert touched
    theirs = {n: t.data_ptr() for n, t in dense.state_dict().items()}
    for name, t in small.state_dict().items():
        assert (t.data_ptr() == theirs[name]) == (name not in touched), name
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    with torch.no_grad():  # a cut of nothing is the model itself, sharing every tensor
        same = cut(layers.clone(dense, share=True), graph, {g.name: torch.arange(g.units) for g in graph.groups}, "none")
        assert all(t.data_ptr() == theirs[n] for n, t in same.state_dict().items())
        assert torch.equal(same(x), dense(x))


def _resident(t: torch.Tensor) -> int:
    """How many whole pages of ``t`` are in this process's memory now (/proc/self/pagemap's present bit)."""
    import os

    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-t.data_ptr() // page), (t.data_ptr() + t.numel() * t.element_size()) // page
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = np.frombuffer(os.pread(fd, (last - first) * 8, first * 8), dtype=np.uint64)
    finally:
        os.close(fd)
    return int((entries >> np.uint64(63)).sum())


def test_mapped_weights_go_back_to_their_file_after_use_and_written_ones_stay(tmp_path):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model = prunetool.load(str(tmp_path / "src")).model
    x = torch.randint(0, 512, (2, 16))
    mlp = model.model.layers[0].mlp
    written = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        written[0, :] = 3.0  # a private copy of those pages: only this process has these bytes
    assert precision.FilePages.of_weight_files().ranges, "from_pretrained maps the safetensors file"
    with precision.Compute(), torch.no_grad():
        first = model(x).logits
        assert _resident(mlp.up_proj.weight) == 0  # read for the call, handed back after it
        assert _resident(written) > 0  # kept: dropping it would lose the write
        assert torch.equal(model(x).logits, first)  # read again from the file: the same weights
        with precision.resident():  # while latency is timed, weights stay in memory as where they are served
            model(x)
            assert _resident(mlp.up_proj.weight) > 0
    assert (written[0] == 3.0).all()
    with torch.no_grad():  # a float32 copy in memory computes the same (the write included)
        assert torch.equal(copy.deepcopy(model).float()(x).logits, first)


def test_only_half_precision_safetensors_in_a_directory_count_as_read_on_demand(tmp_path):
    _llama().to(torch.bfloat16).save_pretrained(tmp_path / "half")
    _llama().save_pretrained(tmp_path / "full")
    torch.save(_llama().to(torch.bfloat16).state_dict(), tmp_path / "m.pt")
    assert memory.mapped(tmp_path / "half")
    assert not memory.mapped(tmp_path / "full") and not memory.mapped(tmp_path / "m.pt")
    (tmp_path / "half" / "model.safetensors").write_bytes(b"\xff" * 16)  # a damaged header: not read on demand
    assert not memory.mapped(tmp_path / "half")


def test_weights_linked_from_a_cache_blob_are_read_on_demand_too(tmp_path):
    import shutil

    _llama().to(torch.bfloat16).save_pretrained(tmp_path / "saved")
    snap, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    shutil.move(tmp_path / "saved" / "model.safetensors", blobs / "0123abcd")  # as the Hugging Face cache keeps it
    (snap / "model.safetensors").symlink_to(blobs / "0123abcd")
    shutil.copy(tmp_path / "saved" / "config.json", snap / "config.json")
    model = prunetool.load(str(snap)).model
    weight = model.model.embed_tokens.weight
    assert memory.mapped(snap)
    assert not precision.FilePages.of_weight_files().covers(weight)  # listed under the blob's name
    with precision.Compute(files=[str(snap / "model.safetensors")]) as mode:
        assert mode.pages.covers(weight)
