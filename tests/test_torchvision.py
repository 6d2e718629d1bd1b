"""Every listed torchvision classifier shrinks with random weights at a small input size."""

import json

import pytest
import torch
import torchvision

import prunetool

MODELS = {
    "resnet18": {}, "resnet50": {}, "vgg11_bn": {}, "mobilenet_v2": {}, "mobilenet_v3_small": {},
    "efficientnet_b0": {}, "densenet121": {}, "squeezenet1_1": {}, "shufflenet_v2_x0_5": {},
    "regnet_x_400mf": {}, "convnext_tiny": {}, "googlenet": {"aux_logits": False, "init_weights": False},
    "vit_b_16": {"image_size": 32},
}
# The default criterion (obs) costs units · fan-in² per group: on these, tens of seconds on 2 cores; their structure
# is what the test checks, so they are scored by mrs (the cheaper ones above exercise obs).
HEAVY = {"resnet50", "vgg11_bn", "densenet121", "googlenet", "vit_b_16"}


def _model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(**MODELS[name]).eval()
    for m in model.modules():  # fresh BatchNorm statistics are trivial: make them ordinary
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_shrink_torchvision_classifier(name):
    size = 32 if name == "vit_b_16" else 64
    model = _model(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        dense_out = model(x)
    small, report = prunetool.shrink(model, None, criterion="mrs" if name in HEAVY else None, ratio=0.3, calib=8,
                                     input_shape=(3, size, size), measure=False)
    with torch.no_grad():
        out = small(x)
    assert out.shape == dense_out.shape
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert report["verify"]["ratio_zero"] == "exact" and report["verify"]["removal_rel_diff"] < 1e-4

    same, _ = prunetool.shrink(model, None, "l1", 0.0, "none", calib=8, input_shape=(3, size, size), measure=False)
    with torch.no_grad():
        assert torch.equal(same(x), dense_out)


def test_cli_on_resnet18_reloads(tmp_path):
    from prunetool.cli import main

    ckpt = tmp_path / "r18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _model("resnet18").state_dict().items()}}, ckpt)
    assert main(["shrink", str(ckpt), "--arch", "torchvision.models:resnet18", "--arch-kwargs", '{"num_classes": 1000}',
                 "--input-shape", "3,64,64", "--ratio", "0.5", "--calib", "8", "--quiet"]) == 0
    small = prunetool.load(tmp_path / "r18.shrunk.safetensors").model
    assert small.layer1[0].conv1.out_channels == 32
    with torch.no_grad():
        assert small(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resnet50_loses_a_bottleneck_that_adds_nothing_and_reloads_with_the_dense_outputs(tmp_path):
    from prunetool.cli import main

    model = _model("resnet50")
    with torch.no_grad():  # layer3[2] writes nothing: its input (after a ReLU) passes its ReLU unchanged
        model.layer3[2].bn3.weight.zero_()
        model.layer3[2].bn3.bias.zero_()
    ckpt = tmp_path / "r50.pt"
    torch.save(model.state_dict(), ckpt)
    assert main(["shrink", str(ckpt), "--arch", "torchvision.models:resnet50", "--input-shape", "3,64,64",
                 "--ratio", "0", "--drop-blocks", "1", "--no-recalibrate-bn", "--calib", "8", "--no-latency", "-q",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = [r for r in report["layers"] if r.get("block")]
    assert len(rows) == 12  # the bottlenecks with an identity shortcut: each stage's but its first
    assert [r["name"] for r in rows if r["units_after"] == 0] == ["layer3.2"]
    small = prunetool.load(tmp_path / "r50.shrunk.safetensors").model.eval()
    assert type(small.layer3[2]).__name__ == "Skip"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-4)
