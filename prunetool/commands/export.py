"""``export``: any checkpoint prunetool loads, to ONNX and/or pt2, each checked against PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

from ..batch import batch_len
from ..errors import UsageError
from ..export import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL, export_onnx, export_pt2
from ..options import DataOptions, Outputs, Source, option
from ..staging import Staging
from .common import Keywords, preflight, start


@dataclass
class ExportOptions:
    """What ``export`` writes and how many inputs it compares (here, not in :mod:`prunetool.options`: the opset's
    default is the exporter's own, a module above that one)."""

    onnx: str | None = option(None, "--onnx", "Where to write the .onnx file.")
    pt2: str | None = option(None, "--pt2", "Where to write the torch.export program (.pt2).")
    calib: int = option(64, "--calib", "Inputs compared between PyTorch and the exported program.")
    opset: int = option(DEFAULT_OPSET, "--opset", "ONNX opset version.")


def run(source: Source, data: DataOptions, staging: Staging, onnx: str | None = None, pt2: str | None = None,
        opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
        reports: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> dict:
    """Export ``source`` to ``onnx`` and/or ``pt2``, staged. ``reports``: flag → path of the files the caller
    writes from the report (``--json``), and ``inputs`` more files it reads: checked with the exports, before any
    work."""
    if onnx is None and pt2 is None:
        raise UsageError("export needs --onnx PATH, --pt2 PATH or both")
    data.check()
    preflight({**{k: v for k, v in (("--onnx", onnx), ("--pt2", pt2)) if v}, **(reports or {})}, source, data,
              inputs=inputs)
    job = start(source, data)
    try:
        probe = job.probe
        report = {"command": "export", "source": job.ckpt.path, "inputs_compared": batch_len(probe)}
        key = job.settings.output_key
        if onnx is not None:
            report["onnx"] = export_onnx(job.dense, probe, staging.path(onnx), atol, rtol, opset, shown_as=onnx,
                                         output_key=key)
        if pt2 is not None:
            report["pt2"] = export_pt2(job.dense, probe, staging.path(pt2), atol, rtol, shown_as=pt2, output_key=key)
        return report
    finally:
        job.close()


def export(model, *, onnx: str | None = None, pt2: str | None = None, data=None, calib: int = ExportOptions.calib,
           input_shape=None, arch=None, arch_kwargs=None, unsafe_pickle: bool = Source.unsafe_pickle,
           opset: int = ExportOptions.opset, atol: float = Outputs.atol, rtol: float = Outputs.rtol,
           tokens: int | None = None, seq_len: int | None = None, tokenizer: str | None = None,
           output_key: str | None = None, trust_remote_code: bool = Source.trust_remote_code) -> dict:
    """Export ``model`` (a path, a :class:`Checkpoint` or an ``nn.Module``) to ONNX and/or pt2, checked."""
    given = Keywords(locals())
    with Staging() as staging:
        report = run(given.source(), given.data(), staging, onnx, pt2, opset, atol, rtol)
        staging.commit()
    return report
