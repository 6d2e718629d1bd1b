"""``compress``: shrink and lowrank under one budget.

Every plan reaches the target on its own: shrink alone (the ratio fitted to the target), lowrank alone (ranks
allocated across layers), and the two in either order with the budget split evenly between the steps (the
second step's target measured on what the first one left). Each is scored on the calibration samples; the plan
with the best calibration accuracy within ``max_drop`` is kept (the test split chooses nothing). The report shows
every plan and what each step of the chosen one did.
"""

from __future__ import annotations

from torch import nn

from .. import task
from ..errors import UsageError
from ..measure import macs, params, quality_on
from ..options import (CompressOptions, DataOptions, LowrankOptions, Measurement, Outputs, Recovery, ShrinkOptions,
                       Source)
from ..progress import Bars
from ..staging import Staging
from . import lowrank, shrink
from .common import Keywords, derive, finish, check_job_outputs, start


def run(source: Source, data: DataOptions, opts: CompressOptions, measurement: Measurement, outputs: Outputs,
        staging: Staging, progress: bool = False) -> tuple[nn.Module, dict]:
    for options in (opts, data, measurement):
        options.check()
    check_job_outputs(outputs, source, data)
    bars = Bars(progress)
    job = start(source, data, measurement.device)
    try:
        return _run(job, opts, measurement, outputs, staging, bars)
    finally:
        job.close()


def _run(job, opts: CompressOptions, measurement: Measurement, outputs: Outputs, staging: Staging,
         bars: Bars) -> tuple[nn.Module, dict]:
    if not job.data.has_labels:
        raise UsageError("compress chooses between plans by their accuracy (or perplexity): it needs --data")
    key = "params" if opts.target_params is not None else "macs"
    fraction = opts.target_params if key == "params" else opts.target_macs

    def size(model):
        return params(model) if key == "params" else macs(model, job.probe)

    total = size(job.dense)
    goal = fraction * total
    okey = job.settings.output_key
    base = quality_on(job.dense, job.calib, okey)
    quiet = Measurement(False, (), measurement.device)
    plans = []
    for plan in bars.track(opts.plans, "plans"):
        steps = plan.split("+")
        current, record, made = job, dict(job.ckpt.record), []
        try:
            for i, command in enumerate(steps):
                share = fraction ** (1 / len(steps)) if i == 0 else min(0.999, goal / size(current.dense))
                target = {f"target_{key}": share}
                if command == "shrink":
                    step = shrink.work(current, ShrinkOptions(**target), Recovery(), quiet, bars)
                else:
                    step = lowrank.work(current, LowrankOptions(**target), Recovery(), quiet, bars)
                record = {**record, "factored": step.factored,
                          "history": record.get("history", []) + [{"command": command, **step.settings}]}
                made.append({"command": command, f"target_{key}": share, "params": params(step.model),
                             "macs": macs(step.model, job.probe), "layers": step.layers, "step": step})
                current = derive(current, step.model, record)
        except UsageError as e:  # this plan cannot reach the target (everything left is protected, say)
            plans.append({"plan": plan, "error": str(e)})
            continue
        q = quality_on(current.dense, job.calib, okey)
        plans.append({"plan": plan, f"calibration_{base.metric}": q.value,
                      "calibration_drop": task.drop(base.metric, base.value, q.value),
                      f"{key}_fraction": size(current.dense) / total, "reached": size(current.dense) <= goal * 1.001,
                      "steps": made, "model": current.dense, "record": record})
    ok = [p for p in plans if "error" not in p and p["reached"]]
    if not ok:
        reasons = "; ".join(f"{p['plan']}: {p.get('error', 'above the target')}" for p in plans)
        raise UsageError(f"no plan reaches --target-{key} {fraction} ({reasons})")
    within = [p for p in ok if opts.max_drop is None or p["calibration_drop"] <= opts.max_drop]
    chosen = min(within or ok, key=lambda p: p["calibration_drop"])
    last = chosen["steps"][-1]["step"]
    layers = [{"step": s["command"], **layer} for s in chosen["steps"] for layer in s["layers"]]
    settings = {f"target_{key}": fraction, "max_drop": opts.max_drop, "plan": chosen["plan"],
                "plans": [{k: v for k, v in p.items() if k not in ("steps", "model", "record")} for p in plans],
                f"calibration_{base.metric}_before": base.value}
    extra = {"steps": [{"command": s["command"], f"target_{key}": s[f"target_{key}"], "params": s["params"],
                        "macs": s["macs"], "layers": s["layers"]} for s in chosen["steps"]]}
    checks = {k: v for s in chosen["steps"] for k, v in s["step"].checks.items() if k != "outputs"}
    job.ckpt.record = {**job.ckpt.record, "history": chosen["record"]["history"][:-1]}
    report = finish(job, "compress", chosen["model"], settings, layers, checks, factored=last.factored,
                    outputs=outputs, staging=staging, measurement=measurement, bars=bars, extra=extra)
    return chosen["model"], report


def compress(model, data, *, target_params: float | None = None, target_macs: float | None = None,
             max_drop: float | None = None, plans=None, calib: int = DataOptions.calib, eval: int | None = None,
             input_shape=None, device: str = Measurement.device, out: str | None = None, onnx: str | None = None,
             pt2: str | None = None, arch=None, arch_kwargs=None, unsafe_pickle: bool = Source.unsafe_pickle,
             download: bool = DataOptions.download, progress: bool = False,
             latency_batches=Measurement.latency_batches, measure: bool = Measurement.evaluate,
             tokens: int | None = None, seq_len: int | None = None, tokenizer: str | None = None,
             output_key: str | None = None,
             trust_remote_code: bool = Source.trust_remote_code) -> tuple[nn.Module, dict]:
    """Shrink and lowrank under one budget (see the module docstring); ``plans=None``: every plan."""
    given = Keywords(locals())
    opts = given.make(CompressOptions, plans=tuple(plans) if plans else CompressOptions.plans)
    with Staging() as staging:
        small, report = run(given.source(), given.data(), opts, given.measurement(), given.make(Outputs), staging,
                            progress)
        staging.commit()
    return small, report
