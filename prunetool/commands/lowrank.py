"""``lowrank``: factor layers into rank-k products, the rank chosen by a fixed k, an energy threshold, the elbow of
the residual curve, or an accuracy budget. Same start and end as shrink."""

from __future__ import annotations

import warnings

from torch import nn

from .. import layers, task
from ..batch import batch_slice
from ..calibrate import covariances, output_sensitivity
from ..calls import first_call
from ..data import eval_loader
from ..errors import UsageError
from ..factor import (Candidate, candidates, capped_rank, cost_of, elbow, factor, fit_budget, greedy_baseline,
                      matrix, params_of, predicted_loss, rank_for_energy, relative_error, saves, search_drop,
                      spectrum)
from ..layers import replace
from ..load import upcast_half
from ..measure import evaluate, macs, params, quality_on
from ..options import DEFAULT_HOLD, FIDELITY, DataOptions, LowrankOptions, Measurement, Outputs, Recovery, Source
from ..progress import Bars
from ..recover import distill, finetune
from ..staging import Staging
from ..verify import check_forward
from .common import Keywords, Step, finish, check_job_outputs, recovery_inputs, start


def run(source: Source, data: DataOptions, opts: LowrankOptions, recovery: Recovery, measurement: Measurement,
        outputs: Outputs, staging: Staging, progress: bool = False) -> tuple[nn.Module, dict]:
    for options in (opts, data, recovery, measurement):
        options.check()
    check_job_outputs(outputs, source, data)
    bars = Bars(progress)
    job = start(source, data, measurement.device)
    try:
        return _run(job, opts, recovery, measurement, outputs, staging, bars)
    finally:
        job.close()


def _candidates(job, names: list[str], covs: dict, fisher: dict | None) -> list[Candidate]:
    out = []
    example = batch_slice(job.probe, 0, 1)  # a tensor, or named inputs (token ids)
    for name in names:
        module = job.dense.get_submodule(name)
        spec = spectrum(module, covs.get(name))
        m, n = matrix(module).shape
        call = first_call(job.dense, name, [example, job.probe])  # an expert runs only on the tokens routed to it
        if call is None:
            continue  # no probe sample reaches it: it stays as it is
        positions = call.op.out_positions(call.output)
        upper = min(len(spec.sigma), max(0, (m * n - 1) // (m + n)))
        loss = predicted_loss(spec, fisher[name]) if fisher is not None and name in fisher else None
        out.append(Candidate(name, spec, m, n, m if module.bias is not None else 0, positions, upper, loss))
    return out


def _apply(dense: nn.Module, cands: list[Candidate], ranks: dict) -> nn.Module:
    model = layers.clone(dense)
    for c in cands:
        k = ranks.get(c.name)
        if k is not None and k <= c.upper:
            replace(model, c.name, factor(dense.get_submodule(c.name), k, c.spec))
    return model.eval()


def _held(cands: list[Candidate], capped: dict[str, int | None], accuracy) -> tuple[dict[str, int | None], int,
                                                                                   list[str]]:
    """``capped`` when its calibration accuracy is within :data:`DEFAULT_HOLD` points of the dense model's; else
    the most compressing allocation (:func:`prunetool.factor.search_drop`) whose ranks are never below
    ``capped``'s and that holds it (every layer whole when none does). Returns the ranks, the evaluations, and the
    layers whose rank rose."""
    if -accuracy(capped) <= DEFAULT_HOLD:
        return capped, 1, []
    best, evaluations = search_drop(cands, "params", accuracy, 0.0, DEFAULT_HOLD, floor=capped)
    return best, 1 + evaluations, [n for n in capped if best[n] != capped[n]]


def _run(job, opts: LowrankOptions, recovery: Recovery, measurement: Measurement, outputs: Outputs,
         staging: Staging, bars: Bars) -> tuple[nn.Module, dict]:
    step = work(job, opts, recovery, measurement, bars)
    report = finish(job, "lowrank", step.model, step.settings, step.layers, step.checks, factored=step.factored,
                    outputs=outputs, staging=staging, measurement=measurement, bars=bars, extra=step.extra)
    return step.model, report


def work(job, opts: LowrankOptions, recovery: Recovery, measurement: Measurement, bars: Bars) -> Step:
    """The factorisation itself, without the shared end."""
    method = opts.method
    data_aware = job.data.has_labels if opts.data_aware is None else opts.data_aware
    if (data_aware or opts.max_drop is not None) and not job.data.has_labels:
        raise UsageError("--data-aware and --max-drop need --data (calibration inputs and labels)")
    if recovery.finetune_epochs and not job.data.has_labels:
        raise UsageError("--finetune-epochs needs --data with a train split")
    dense, calib, device = job.dense, job.calib, measurement.device
    names, named_heads = candidates(dense, job.graph.heads, opts.layers)
    for head in named_heads:
        warnings.warn(f"factoring the output head {head}, as --layers names it: the model's outputs themselves "
                      "become approximate")
    fisher = None
    hold = method == "auto" and job.data.has_labels and opts.max_drop is None
    sensitive = (method == "budget" or hold) and job.data.has_labels and bool(names)
    covs = {}
    if names and (data_aware or sensitive):
        dense.to(device)  # the calibration passes send the batches to the device; the rest runs on the CPU
        try:
            covs = covariances(dense, names, calib, job.settings, job.graph, bars) if data_aware else {}
            fisher = output_sensitivity(dense, names, calib, job.settings, job.graph, bars) if sensitive else None
        finally:
            dense.cpu()
    cands = _candidates(job, names, covs, fisher)
    evaluations, rules = 0, {}

    okey = job.settings.output_key
    base = quality_on(dense, calib, okey) if method == "budget" or hold else None  # no data: the model's labels

    def accuracy(ranks):  # higher is better: minus the metric's drop from the dense model on the calibration samples
        q = quality_on(_apply(dense, cands, ranks), calib, okey)
        return -task.drop(base.metric, base.value, q.value)

    if method == "budget":
        key = "macs" if opts.target_macs is not None else "params"
        fixed = (params(dense) if key == "params" else macs(dense, job.probe)) - \
            cost_of(cands, {c.name: None for c in cands}, key)
        total = fixed + cost_of(cands, {c.name: None for c in cands}, key)
        fraction = opts.target_params if key == "params" else opts.target_macs
        if fraction is not None:
            goal = int(fraction * total)
            if opts.search == "greedy":
                ranks, evaluations, _ = greedy_baseline(cands, key, goal, fixed, accuracy)
            else:
                ranks, reached = fit_budget(cands, key, goal, fixed)
                if not reached:
                    raise UsageError(f"--target-{key} {fraction} cannot be reached: rank 1 in every layer still keeps "
                                     f"{(fixed + cost_of(cands, ranks, key)) / total:.3f} of the {key} (layers that "
                                     "cannot be factored stay whole)")
            rule = f"budget ({opts.search})"
        else:
            ranks, evaluations = search_drop(cands, key, accuracy, 0.0, opts.max_drop)
            evaluations += 1
            rule = "accuracy budget"
        rules = {c.name: rule for c in cands}
    else:
        ranks = {}
        for c in cands:
            full = len(c.spec.sigma)
            if method == "rank":
                ranks[c.name], rules[c.name] = min(full, opts.rank), "fixed rank"
            elif method == "energy":
                ranks[c.name], rules[c.name] = rank_for_energy(c.spec, opts.energy), "energy"
            elif method == "elbow":
                ranks[c.name], rules[c.name] = elbow(c.spec), "elbow"
            else:
                ranks[c.name], rules[c.name] = capped_rank(c.spec, elbow(c.spec), opts.max_layer_error)
        if hold and cands:
            ranks, more, raised = _held(cands, ranks, accuracy)
            evaluations += more
            for name in raised:
                rules[name] = f"{rules[name]}, raised to hold the calibration accuracy within {DEFAULT_HOLD} points"

    small = layers.clone(dense)
    factored = dict(job.ckpt.record.get("factored", {}))
    entries = []
    for c in cands:
        module = dense.get_submodule(c.name)
        k = ranks.get(c.name)
        e = {"name": c.name, "shape": [c.m, c.n], "full_rank": len(c.spec.sigma), "elbow": elbow(c.spec),
             "rank": k, "rule": rules.get(c.name), "params_before": params_of(module),
             "relative_output_error": relative_error(c.spec, k) if k is not None else 0.0}
        if k is None or not saves(module, k):
            e.update(rank=None, energy=None, params_after=e["params_before"], relative_output_error=0.0,
                     skipped=f"rank {k} would not save parameters" if k is not None else
                     ("the budget keeps it whole" if method == "budget" else "kept whole"))
        else:
            new = factor(module, k, c.spec)
            replace(small, c.name, new)
            factored[c.name] = k
            e.update(energy=c.spec.energy(k), params_after=params_of(new))
        entries.append(e)
    small.eval()
    probe = job.probe
    check_forward(small, probe, job.graph.output_shape)
    extra = {}
    if recovery.finetune_epochs:
        loader = eval_loader(job.data, job.eval)
        q = evaluate(small, loader, device, bars, "evaluating the factored model", okey)
        step = {f"{q.metric}_after_cut": q.value}
        step["finetune_loss"] = finetune(small, job.data, recovery.finetune_epochs, recovery.finetune_lr,
                                         recovery.batch_size, recovery.optimizer,
                                         dense if recovery.distill else None, device, bars, output_key=okey)
        step[f"{q.metric}_after_finetune"] = evaluate(small, loader, device, bars, "evaluating", okey).value
        extra["steps"] = [step]
        check_forward(small, probe, job.graph.output_shape)
    if recovery.recover:
        step = extra.setdefault("steps", [{}])[0]
        upcast_half(small)  # trained in float32: steps below a half's resolution would vanish
        step["recover"] = distill(small, dense, recovery_inputs(job), recovery.recover, recovery.recover_lr,
                                  device=device, bars=bars, output_key=okey,
                                  metric=FIDELITY.get(measurement.fidelity), mixup=recovery.mixup)
        loader = eval_loader(job.data, job.eval)
        if loader is not None:
            q = evaluate(small, loader, device, bars, "evaluating", okey)
            step[f"{q.metric}_after_recover"] = q.value
        check_forward(small, probe, job.graph.output_shape)

    settings = {"method": method, "rank": opts.rank, "energy": opts.energy, "layers": opts.layers,
                "data_aware": data_aware, "max_drop": opts.max_drop, "target_params": opts.target_params,
                "target_macs": opts.target_macs, "max_layer_error": opts.max_layer_error, "search": opts.search,
                "search_evaluations": evaluations, "finetune_epochs": recovery.finetune_epochs,
                "lr": recovery.finetune_lr, "recover_lr": recovery.recover_lr, "batch_size": recovery.batch_size,
                "optimizer": recovery.optimizer, "distill": recovery.distill, "recover": recovery.recover}
    return Step(small, settings, entries, {"forward": "ok"}, extra, factored)


def lowrank(model, data=None, *, rank: int | None = None, energy: float | None = None, layers: str | None = None,
            data_aware: bool | None = None, max_drop: float | None = None, elbow: bool = LowrankOptions.elbow,
            raw_elbow: bool = LowrankOptions.raw_elbow,
            target_params: float | None = None, target_macs: float | None = None,
            max_layer_error: float = LowrankOptions.max_layer_error, search: str = LowrankOptions.search,
            calib: int = DataOptions.calib, eval: int | None = None,
            input_shape=None, device: str = Measurement.device, out: str | None = None, onnx: str | None = None,
            pt2: str | None = None, arch=None, arch_kwargs=None, unsafe_pickle: bool = Source.unsafe_pickle,
            download: bool = DataOptions.download, progress: bool = False,
            latency_batches=Measurement.latency_batches, measure: bool = Measurement.evaluate,
            finetune_epochs: int = Recovery.finetune_epochs, lr: float | None = Recovery.lr,
            batch_size: int = Recovery.batch_size, optimizer: str = Recovery.optimizer,
            distill: bool = Recovery.distill, recover: float = Recovery.recover, mixup: bool = Recovery.mixup,
            tokens: int | None = None,
            seq_len: int | None = None,
            tokenizer: str | None = None, output_key: str | None = None,
            trust_remote_code: bool = Source.trust_remote_code) -> tuple[nn.Module, dict]:
    """Factor layers into rank-k products. The rank: ``rank``, ``energy``, Heitmann's plain ``elbow``, a budget
    (``target_params``/``target_macs``/``max_drop``, ranks chosen across layers), or by default each layer's elbow
    (whitened by its inputs when there is data) capped at ``max_layer_error`` of its output energy."""
    given = Keywords(locals())
    with Staging() as staging:
        small, report = run(given.source(), given.data(), given.make(LowrankOptions), given.make(Recovery),
                            given.measurement(), given.make(Outputs), staging, progress)
        staging.commit()
    return small, report
