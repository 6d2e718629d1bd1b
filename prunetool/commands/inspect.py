"""``inspect``: where is this model redundant, and what would shrink and lowrank do to it? The numbers of
:mod:`prunetool.redundancy` as a report, with pictures as PNG files and one self-contained HTML page."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from .. import ops, pictures as pic
from ..layers import op_of
from ..errors import UsageError
from ..measure import params
from ..options import DataOptions, Source
from ..progress import Bars
from ..redundancy import (BUDGET, DEAD_NATS, FROZEN_RELATIVE, MRP_MAX_UNITS, matrices, matrix_report, unit_report)
from ..staging import Staging
from .common import Keywords, preflight, start


def run(source: Source, data: DataOptions, staging: Staging, html: str | None = None, plots: str | None = None,
        progress: bool = False, reports: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> dict:
    """The redundancy report of ``source``, with ``html``/``plots`` staged. ``reports``: flag → path of the files
    the caller writes from the report (``--json``), and ``inputs`` more files it reads: checked with the others,
    before any work."""
    data.check()
    preflight({**{k: v for k, v in (("--html", html), ("--plots", plots)) if v}, **(reports or {})}, source, data,
              inputs=inputs)
    if plots is not None and Path(plots).exists() and not Path(plots).is_dir():
        raise UsageError(f"--plots {plots} is a file; give a folder")
    if data.data is None:
        warnings.warn("no --data: dead and frozen units and MRS come from random inputs labelled by the model itself")
    bars = Bars(progress)
    job = start(source, data)
    try:
        return _run(job, staging, html, plots, bars)
    finally:
        job.close()


def _run(job, staging: Staging, html: str | None, plots: str | None, bars: Bars) -> dict:
    dense = job.dense
    groups = unit_report(dense, job.graph, job.calib, job.settings, bars) if job.graph.groups else []
    layers, modules = [], {}
    for name, module in bars.track(matrices(dense), "spectra"):
        layers.append(matrix_report(name, module)[0])
        modules[name] = module
    report = {
        "command": "inspect", "source": job.ckpt.path, "params": params(dense), "calib": len(job.calib),
        "data": job.data.spec, "input_shape": list(job.input_shape),
        "dead_by": "mrp" if sum(g.units for g in job.graph.groups) <= MRP_MAX_UNITS else "mrs",
        "thresholds": {"dead_nats": DEAD_NATS, "frozen_relative": FROZEN_RELATIVE, "loss_budget": BUDGET,
                       "mrp_max_units": MRP_MAX_UNITS},
        "groups": groups, "layers": layers,
        "protected": [{"name": p.name, "reason": p.reason} for p in job.graph.protected],
    }
    if html or plots:
        images = {}
        for g in groups:
            images[f"scores_{g['name']}.png"] = pic.scores_png(g)
        first = next((n for n in job.graph.order if n in modules), None)
        shape = job.input_shape
        for m in bars.track(layers, "pictures"):
            n = m["name"]
            images[f"spectrum_{n}.png"] = pic.spectrum_png(m)
            images[f"esd_{n}.png"] = pic.esd_png(m)
            images[f"weights_{n}.png"] = pic.weights_png(n, modules[n])
            if n == first and op_of(modules[n]) is ops.LINEAR and isinstance(job.probe, torch.Tensor) and \
                    len(shape) == 3 and \
                    modules[n].in_features == math.prod(shape):
                images[f"fields_{n}.png"] = pic.receptive_fields_png(n, modules[n], shape)
        if plots:
            report["plots"] = _stage_plots(staging, images, plots)
        if html:
            staging.write(html, pic.page(report, images).encode())
            report["html"] = html
    return report


def _stage_plots(staging: Staging, images: dict[str, bytes], folder: str) -> list[str]:
    """Into an existing folder file by file; a new folder is staged whole."""
    if Path(folder).is_dir():
        for name, data in images.items():
            staging.write(os.path.join(folder, name), data)
    else:
        tmp = staging.path(folder, directory=True)
        for name, data in images.items():
            Path(tmp, name).write_bytes(data)
    return [os.path.join(folder, name) for name in images]


def inspect(model, data=None, *, calib: int = DataOptions.calib, input_shape=None, arch=None, arch_kwargs=None,
            unsafe_pickle: bool = Source.unsafe_pickle, download: bool = DataOptions.download, html: str | None = None,
            plots: str | None = None, progress: bool = False, tokens: int | None = None, seq_len: int | None = None,
            tokenizer: str | None = None, output_key: str | None = None,
            trust_remote_code: bool = Source.trust_remote_code) -> dict:
    """Every number of :mod:`prunetool.redundancy` as a report; with ``html``/``plots`` the pictures too."""
    given = Keywords(locals())
    with Staging() as staging:
        report = run(given.source(), given.data(), staging, html, plots, progress)
        staging.commit()
    return report
