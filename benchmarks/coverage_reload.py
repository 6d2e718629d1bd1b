"""The fresh-process half of benchmarks/coverage.py, run from another directory with nothing but prunetool
installed: ``prunetool.load`` a shrunk checkpoint with no flags and compare its outputs with onnxruntime and with
the reloaded torch.export program.

    python benchmarks/coverage_reload.py X.pt SIZE X.onnx|- X.pt2|-

Prints one JSON line; exits 1 (one line on stderr) when anything does not match.
"""

import json
import sys

import numpy as np
import torch

import prunetool
from prunetool.export import tolerance, within
from prunetool.options import DEFAULT_ATOL, DEFAULT_RTOL


def main() -> None:
    path, size, onnx_path, pt2_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    model = prunetool.load(path).model.float().eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(x)
    scale, tol = tolerance(want.numpy(), DEFAULT_ATOL, DEFAULT_RTOL)
    result, noise = {"max_abs_output": scale, "tolerance": tol}, []
    if onnx_path != "-":
        import onnxruntime

        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        result["onnx_diff"] = float(np.abs(got - want.numpy()).max())
    if pt2_path != "-":
        got = torch.export.load(pt2_path).module()(x)
        result["pt2_diff"] = float((got - want).abs().max())
    # the rule of the CLI's own check (prunetool.export): the fixed tolerance, or 4 × the model's float32 noise
    bad = [k for k in ("onnx_diff", "pt2_diff") if not within(result.get(k, 0.0), tol, want.numpy(), model, (x,),
                                                                 noise)[0]]
    result["float32_noise"] = noise[0] if noise else None
    if bad:
        print(f"fresh reload differs from {', '.join(bad)}: {result}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
