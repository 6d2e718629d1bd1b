"""``lowrank``: factor layers into rank-k products, the rank chosen by a fixed k, an energy threshold, the elbow of
the residual curve, or an accuracy budget. Same start and end as shrink."""

from __future__ import annotations

import copy

from torch import nn

from ..data import eval_loader
from ..errors import UsageError
from ..calibrate import covariances
from ..factor import (candidates, elbow, factor, matrix, params_of, rank_for_energy, replace, saves, search_ranks,
                      spectrum)
from ..measure import evaluate
from ..options import LATENCY_BATCHES, DataOptions, LowrankOptions, Measurement, Outputs, Recovery, Source
from ..progress import Bars
from ..recover import finetune
from ..staging import Staging, check_outputs
from ..verify import check_forward
from .common import finish, input_paths, start


def run(source: Source, data: DataOptions, opts: LowrankOptions, recovery: Recovery, measurement: Measurement,
        outputs: Outputs, staging: Staging, progress: bool = False) -> tuple[nn.Module, dict]:
    for options in (opts, data, recovery, measurement):
        options.check()
    check_outputs(outputs.paths(), input_paths(source))
    bars = Bars(progress)
    job = start(source, data, measurement.device)
    try:
        return _run(job, opts, recovery, measurement, outputs, staging, bars)
    finally:
        job.close()


def _run(job, opts: LowrankOptions, recovery: Recovery, measurement: Measurement, outputs: Outputs,
         staging: Staging, bars: Bars) -> tuple[nn.Module, dict]:
    if (opts.data_aware or opts.max_drop is not None) and not job.data.has_labels:
        raise UsageError("--data-aware and --max-drop need --data (calibration inputs and labels)")
    if recovery.finetune_epochs and not job.data.has_labels:
        raise UsageError("--finetune-epochs needs --data with a train split")
    dense, calib, device = job.dense, job.calib, measurement.device
    names = candidates(dense, job.graph.heads, opts.layers)
    method = opts.method
    covs = covariances(dense, names, calib, job.settings, job.graph, bars) if opts.data_aware else {}

    specs, entries, upper = {}, [], {}
    for name in bars.track(names, "singular values"):
        module = dense.get_submodule(name)
        specs[name] = spectrum(module, covs.get(name))
        full = len(specs[name].sigma)
        k = min(full, opts.rank) if method == "rank" else rank_for_energy(specs[name], opts.energy) \
            if method == "energy" else elbow(specs[name])
        m, n = matrix(module).shape
        max_saving = max(0, (m * n - 1) // (m + n))
        upper[name] = min(full, max_saving)
        entries.append({"name": name, "shape": [m, n], "full_rank": full, "elbow": elbow(specs[name]), "rank": k,
                        "params_before": params_of(module)})
    evaluations = 0
    if opts.max_drop is not None:
        chosen, evaluations = search_ranks(dense, specs, {n: u for n, u in upper.items() if u >= 1}, calib,
                                           opts.max_drop, bars)
        for e in entries:
            e["rank"] = chosen.get(e["name"])

    small = copy.deepcopy(dense)
    factored = dict(job.ckpt.record.get("factored", {}))
    for e in entries:
        module = dense.get_submodule(e["name"])
        k = e["rank"]
        if k is None or not saves(module, k):
            e.update(rank=None, energy=None, params_after=e["params_before"],
                     skipped=f"rank {k} would not save parameters" if k else "no rank within the accuracy budget")
            continue
        new = factor(module, k, specs[e["name"]])
        replace(small, e["name"], new)
        factored[e["name"]] = k
        e.update(energy=specs[e["name"]].energy(k), params_after=params_of(new))
    small.eval()
    probe = job.probe
    check_forward(small, probe, job.graph.output_shape)
    extra = {}
    if recovery.finetune_epochs:
        loader = eval_loader(job.data, job.eval)
        step = {"accuracy_after_cut": evaluate(small, loader, device, bars, "evaluating the factored model")[0]}
        step["finetune_loss"] = finetune(small, job.data, recovery.finetune_epochs, recovery.lr, recovery.batch_size,
                                         recovery.optimizer, dense if recovery.distill else None, device, bars)
        step["accuracy_after_finetune"] = evaluate(small, loader, device, bars, "evaluating")[0]
        extra["steps"] = [step]
        check_forward(small, probe, job.graph.output_shape)

    settings = {"method": method, "rank": opts.rank, "energy": opts.energy, "layers": opts.layers,
                "data_aware": opts.data_aware, "max_drop": opts.max_drop, "search_evaluations": evaluations,
                "finetune_epochs": recovery.finetune_epochs, "lr": recovery.lr, "batch_size": recovery.batch_size,
                "optimizer": recovery.optimizer, "distill": recovery.distill}
    report = finish(job, "lowrank", small, settings, entries, {"forward": "ok"}, factored=factored,
                    outputs=outputs, staging=staging, measurement=measurement, bars=bars, extra=extra)
    return small, report


def lowrank(model, data=None, *, rank: int | None = None, energy: float | None = None, layers: str | None = None,
            data_aware: bool = False, max_drop: float | None = None, calib: int = 1000, eval: int | None = None,
            input_shape=None, device: str = "cpu", out: str | None = None, onnx: str | None = None,
            pt2: str | None = None, arch=None, arch_kwargs=None, unsafe_pickle: bool = False, download: bool = False,
            progress: bool = False, latency_batches=LATENCY_BATCHES, measure: bool = True, finetune_epochs: int = 0,
            lr: float = 1e-3, batch_size: int = 128, optimizer: str = "adam",
            distill: bool = False) -> tuple[nn.Module, dict]:
    """Factor layers into rank-k products; the rank by ``rank``, ``energy``, or the elbow (default)."""
    with Staging() as staging:
        small, report = run(
            Source(model, arch, arch_kwargs or {}, unsafe_pickle),
            DataOptions(data, calib, eval, tuple(input_shape) if input_shape else None, download),
            LowrankOptions(rank, energy, layers, data_aware, max_drop),
            Recovery(finetune_epochs, lr, batch_size, optimizer, distill),
            Measurement(measure, tuple(latency_batches) if measure else (), device),
            Outputs(out=out, onnx=onnx, pt2=pt2), staging, progress)
        staging.commit()
    return small, report
