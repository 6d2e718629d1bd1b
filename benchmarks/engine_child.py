"""One measurement of benchmarks/engine.py, in a fresh process whose PYTHONPATH picks the prunetool under test.

    python benchmarks/engine_child.py METHOD MODEL CALIB WORKDIR RATIO

Prints one JSON line: seconds of the work, and the peak resident size during it minus the resident size before
it (the model and the calibration tensors loaded).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import TensorDataset


def rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    method, name, calib, work, ratio = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    ckpt = os.path.join(work, f"{name}.pt")
    if not os.path.exists(ckpt):
        torch.save(model.state_dict(), ckpt)
    x = torch.randn(calib, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = torch.cat([model(b).argmax(-1) for b in x.split(32)])
    batch = 32
    Path("/proc/self/clear_refs").write_text("5")
    base = rss("VmRSS:")
    start = time.perf_counter()
    params_after = None
    if method == "forward+backward":
        for xb, yb in zip(x.split(batch), y.split(batch)):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
    elif method.startswith("prunetool"):
        import prunetool
        from prunetool.data import Data

        out = os.path.join(work, f"{name}.{method.replace(' ', '_')}.pt")
        small, _ = prunetool.shrink(ckpt, Data(TensorDataset(x, y), None, "random"), ratio=ratio, calib=calib,
                                    out=out, measure=False, arch=f"torchvision.models:{name}")
        params_after = sum(p.numel() for p in small.parameters())
    else:
        import torch_pruning as tp

        model.load_state_dict(torch.load(ckpt, weights_only=True))
        if name.startswith("vit"):  # the MLP units only (its head pruning needs per-model configuration)
            ignored = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("mlp.0")]
            ignored.append(model.conv_proj)
        else:
            ignored = [[m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]]
        imp = tp.importance.MagnitudeImportance(p=2) if method.endswith("magnitude") else tp.importance.TaylorImportance()
        pruner = tp.pruner.MetaPruner(model, x[:2], importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
        if method.endswith("taylor"):
            model.zero_grad()
            for xb, yb in zip(x.split(batch), y.split(batch)):
                F.cross_entropy(model(xb), yb).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
        torch.save(model.state_dict(), os.path.join(work, f"{name}.tp.pt"))
        params_after = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    print(json.dumps({"method": method, "model": name, "seconds": seconds, "peak_beyond_mb": rss("VmHWM:") - base,
                      "base_mb": base, "params_after": params_after, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
