"""``shrink``: remove units ranked by a criterion, compensate them, verify, recover and measure; ``plan`` is its dry
run."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, replace
from statistics import linear_regression

import torch
from torch import nn

from ..layers import clone, op_of, unshare
from ..load import upcast_half
from ..batch import batch_slice, batch_to, model_dtype, stored_dtype
from ..cut import MAX_FIT_INPUTS, can_add_bias, cut, global_ratios, n_removed, plan_cut, select, sequential_means
from ..data import eval_loader
from ..errors import TargetUnreachable, UsageError, VerificationError
from ..export import DeployedSpeed
from ..measure import evaluate, macs, params
from ..options import DATA_CRITERIA, FIDELITY, DataOptions, Measurement, Outputs, Recovery, ShrinkOptions, Source
from ..progress import QUIET, Bars
from ..recover import distill, finetune, has_batchnorm, recalibrate_bn
from ..score import Scores, score
from ..staging import Staging
from ..store import trim_heap
from ..calibrate import statistics
from ..groups import Protected
from .. import allocate, depth, expert_units, experts, hf, width
from ..hf import Widths
from ..trace import Trace
from ..verify import REMOVAL_PROBE, misread_groups, outputs_of, verify
from .common import Keywords, Step, finish, check_job_outputs, recovery_inputs, start, trace_probe

DRY_RUN_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DRY_RUN_CALIB = 256  # calibration samples a dry run draws at most: it traces, and scores only for scope "global"
# plan() works without data: its criterion (scope "global" only) reads the weights alone unless one is asked for
# (the CLI's --dry-run passes --criterion: obs by default, mrs with --compensate mean or none)
DRY_RUN_CRITERION = "l2"
LATENCY_STEPS = 4  # proportional steps of --target-latency on the MACs fraction
LATENCY_WINDOW = 0.03  # a step's latency this close below the target ends the search
# the steps never ask for fewer MACs: one ratio cutting 10x leaves a compact model no accuracy to speak of, and a
# latency met only there is met by the runtime's fixed cost and its noise, not by the cut
LATENCY_MIN_MACS = 0.1
LATENCY_MISS = 0.03  # the result's latency this far above the target is a missed budget (beyond the timing noise)
OFF_BLOCK = "convolution(s) keep widths off the multiples of"  # the warning's words (a plan's trials hide it)
EXPERT_TOLERANCE = 1e-4  # relative difference between the model without experts and the dense one routed around them


def keep_units(graph, scores, ratio: float, opts: ShrinkOptions, widths: Widths | None = None
               ) -> dict[str, torch.Tensor]:
    """The units kept at ``ratio``, rounded to counts a Hugging Face config holds when ``widths`` is given."""
    per_group = global_ratios(graph, scores, ratio, opts.max_layer_ratio) if opts.scope == "global" else ratio
    keep = select(graph, scores, per_group, opts.rounding)
    return keep if widths is None else widths.round(keep, scores)[0]


def widths_of(job, model: nn.Module, graph: Trace, opts: ShrinkOptions) -> Widths | None:
    """For Hugging Face input (unless ``--free-widths``): the unit counts its family's config holds, so that the
    result is a directory ``from_pretrained`` reads. None otherwise, or when the model's own widths already
    differ from what a config can say."""
    if opts.free_widths or not hf.is_hf(job.ckpt):
        return None
    kwargs = job.ckpt.arch_kwargs
    trust = bool(kwargs.get("trust_remote_code"))
    config = kwargs["config"]
    try:
        if model is not job.dense:  # a later step of a schedule: the config of the model cut so far
            config = hf.config_for(model, kwargs["architecture"], config, trust)[0]
        return Widths(model, graph, kwargs["architecture"], config, trust)
    except hf.NotRepresentable:
        return None
    except Exception as e:  # a family that does not build on the meta device: cut as asked, written as it can be
        warnings.warn(f"widths are not rounded to the family's config (its model does not build on the meta device: "
                      f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        return None


def size_after(dense, graph, keep, example, compensate: str = "none", units: list | None = None,
               kept: dict[str, int] | None = None, widths: Widths | None = None) -> tuple[int, int]:
    """Parameters and MACs of the cut (structure only), counting the biases least squares gives the consumers it
    refits that had none, with ``kept`` units in every expert of the stacked ``units``; with ``widths`` (written
    as a Hugging Face directory), the zero biases the config's bias flag adds beside them too."""
    small = structure(dense, graph, keep, units, kept)
    added: dict[str, tuple[int, ...]] = {}
    if compensate == "lstsq":
        modules = dict(small.named_modules())
        for name, c in plan_cut(graph, keep).consumers.items():
            if can_add_bias(modules[name], c):
                added[f"{name}.bias"] = (c.op.as_matrix(getattr(modules[name], c.weight)).shape[0],)
    flagged = widths.flag_biases({**{k: tuple(v.shape) for k, v in small.state_dict().items()}, **added}) \
        if widths is not None and added else 0
    return params(small) + sum(n for n, in added.values()) + flagged, macs(small, example)


def structure(model, graph, keep, units: list | None = None, kept: dict[str, int] | None = None) -> nn.Module:
    """``model`` cut to ``keep`` without compensation (its weights shared), with ``kept`` units in every expert of
    the stacked ``units``: what sizes and speeds are measured on."""
    small = cut(clone(model, share=True), graph, keep, "none")
    if units:
        expert_units.cut(small, units, expert_units.first(units, kept))
    return small


@dataclass
class LatencyGoal:
    """What :func:`_latency_goal` found for one unit-count multiple: the step whose MACs fraction the cut meets (the
    most MACs among those that met the latency, else the fastest), and every step (``macs`` asked, ``macs_kept``,
    ``ratio``, ``latency``, ``round_to``; ``timings``, both readings, where it was timed again)."""
    best: dict
    steps: list[dict]

    @property
    def macs(self) -> float:
        return self.best["macs"]

    def met(self, target: float) -> bool:
        return self.best["latency"] <= target


def _latency_goal(job, model, graph, scores, opts: ShrinkOptions, widths, units: list, speed: DeployedSpeed
                  ) -> LatencyGoal:
    """The steps towards the MACs fraction whose one-ratio cut of ``model`` (structure only) runs in
    ``target_latency`` of the dense model's time, and the one the cut meets. MACs alone mislead: a depthwise or
    memory-bound layer saves less time than its MACs say, and a runtime's time per call has a part no cut removes.
    Each step scales the MACs the last cut kept by target/measured, never below :data:`LATENCY_MIN_MACS`; the step
    that meets the target with the most MACs is timed again (the cut in fresh sessions), and meets it only if both
    readings do. Refused where the fastest cut is far from the target, and where none met it and the line of
    latency on MACs through three cuts or more (:func:`fixed_cost`) reaches the target only below
    :data:`LATENCY_MIN_MACS`: the runtime's fixed cost is near the target, and a cut that meets it there has no
    accuracy left and meets it by noise."""
    goal = opts.target_latency
    m = max(goal, LATENCY_MIN_MACS)
    steps: list[dict] = []
    dense_macs = macs(job.dense, job.example)

    def cut_at(r: float) -> nn.Module:  # the structure of one ratio's cut
        return structure(model, graph, keep_units(graph, scores, r, opts, widths), units,
                         unit_counts(units, {}, r, opts))

    for _ in range(LATENCY_STEPS):
        trial = replace(opts, target_latency=None, target_macs=m, allocation="uniform")
        try:
            r = fit_target(job.dense, graph, scores, trial, job.example, widths, model, units)
        except TargetUnreachable:
            break
        same = next((st for st in steps if st["ratio"] == r), None)
        if same is not None and same["latency"] <= goal:
            break  # the cut measured already meets it (no unit needed to go, say): a wider MACs goal changes nothing
        if same is None:
            small = cut_at(r)
            latency = 1 / speed.speedup(small)["speedup"]["p50"]
            # kept: below the goal where whole blocks or the stream took more than it asked
            kept = min(m, macs(small, job.example) / dense_macs)
            steps.append({"macs": round(m, 4), "ratio": r, "latency": round(latency, 4), "round_to": opts.rounding,
                          "macs_kept": round(kept, 4)})
        else:
            latency, kept = same["latency"], same["macs_kept"]  # the same cut, too slow: not timed again
        if goal - LATENCY_WINDOW <= latency <= goal:
            break
        # proportional, from the MACs the cut kept: where the runtime has a fixed cost it steps short of the target,
        # which errs towards accuracy (a line through two noisy timings overshot to a tenth of the MACs)
        m = min(1.0, max(LATENCY_MIN_MACS, kept * goal / latency))
    if not steps:
        raise TargetUnreachable(f"--target-latency {goal} cannot be reached: no ratio below 0.99 cuts the MACs to "
                                f"{goal} (protected layers stay whole)")
    # a session's thread placement can make one reading lucky: the step that would be taken is timed again (the
    # cut in fresh sessions) and holds the slower of its two readings; one that no longer meets it gives way
    for st in sorted((st for st in steps if st["latency"] <= goal), key=lambda st: st["macs"], reverse=True):
        st["timings"] = [st["latency"], round(1 / speed.speedup(cut_at(st["ratio"]))["speedup"]["p50"], 4)]
        st["latency"] = max(st["timings"])
        if st["latency"] <= goal:
            break
    fastest = min(steps, key=lambda st: st["latency"])
    if fastest["latency"] > goal + LATENCY_MISS:  # the fastest cut is far from the target: cutting on would ruin it
        raise TargetUnreachable(f"--target-latency {goal} cannot be reached in {speed.runtime}: the fastest cut "
                                f"measured (one ratio, {fastest['macs']:.3f} of the MACs) runs in "
                                f"{fastest['latency']:.3f} of the dense model's time; raise the target, or give "
                                "--target-macs")
    line = fixed_cost(steps)
    met = [st for st in steps if st["latency"] <= goal]
    # (a step that met it twice stands: one point below the line must not refuse it)
    if not met and len(steps) >= 3 and line is not None and (goal - line[0]) / line[1] < LATENCY_MIN_MACS:
        where = "never" if line[0] >= goal else f"only at {(goal - line[0]) / line[1]:.3f} of the MACs"
        raise TargetUnreachable(f"--target-latency {goal} cannot be reached in {speed.runtime} with the accuracy "
                                f"kept: its time per call keeps about {line[0]:.2f} of the dense model's with no "
                                f"MACs left, and a line through the {len(steps)} cuts measured reaches {goal} "
                                f"{where}; raise the target, or give --target-macs")
    return LatencyGoal(max(met, key=lambda st: st["macs"]) if met else fastest, steps)


def fixed_cost(steps: list[dict]) -> tuple[float, float] | None:
    """The least-squares line ``latency ≈ a + b · macs_kept`` through the measured ``steps``: ``(a, b)``, where
    ``a`` is the time a cut with no MACs left would keep (the runtime's fixed cost). None with fewer than two MACs
    fractions, or where the time does not fall with the MACs (``b ≤ 0``: noise, nothing to follow)."""
    x, y = [st["macs_kept"] for st in steps], [st["latency"] for st in steps]
    if len(x) < 2 or max(x) - min(x) < 1e-6:
        return None
    b, a = linear_regression(x, y)
    return (a, b) if b > 0 else None


def _latency_goals(job, model, graph, scores, opts: ShrinkOptions, widths, units: list, speed: DeployedSpeed
                   ) -> dict[int, LatencyGoal]:
    """For each unit-count multiple a target measures (:attr:`ShrinkOptions.roundings`), what its latency steps
    found (:func:`_latency_goal`): a multiple the steps refuse is left out (the first refusal raised when all are),
    and so is a further one none of whose cuts met ``target_latency``."""
    goals, refused = {}, None
    for r in opts.roundings:
        try:
            found = _latency_goal(job, model, graph, scores, replace(opts, round_to=r), widths, units, speed)
        except UsageError as e:
            refused = refused or e
            continue
        if r != opts.rounding and not found.met(opts.target_latency):
            continue  # a further multiple that never met the latency must not win on divergence
        goals[r] = found
    if not goals:
        raise refused
    return goals


def _channel_block(group) -> int:
    """The channels the deployed kernels of ``group``'s producers process in blocks of (the largest
    :attr:`prunetool.ops.Op.channel_block`; 1: no such blocks)."""
    return max((getattr(op_of(p.module), "channel_block", 1) for p in group.producers), default=1)


def _off_block(graph: Trace, keep: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """The groups cut to a count off their :func:`_channel_block` (a convolution's): ``(name, kept, block)``
    each. (A grouped convolution's groups keep their own counts: left out.)"""
    off = []
    for g in graph.groups:
        block, kept = _channel_block(g), len(keep[g.name])
        if block > 1 and g.blocks == 1 and kept < g.units and kept % block:
            off.append((g.name, kept, block))
    return off


def unit_counts(units: list, counts: dict[str, int], ratio: float, opts: ShrinkOptions) -> dict[str, int]:
    """The units every expert of each stacked experts module keeps at ``ratio`` of its original ``counts``."""
    return {u.name: expert_units.kept_count(counts.get(u.name, u.units), ratio, opts.rounding) for u in units}


def _target(dense: nn.Module, opts: ShrinkOptions, example) -> tuple[str, float, int, float]:
    """The size target: its metric, fraction, index in :func:`size_after`'s pair, and the size it allows."""
    metric, fraction = ("params", opts.target_params) if opts.target_params is not None else ("macs", opts.target_macs)
    index = 0 if metric == "params" else 1
    return metric, fraction, index, fraction * (params(dense), macs(dense, example))[index]


def fit_target(dense, graph, scores, opts: ShrinkOptions, example, widths: Widths | None = None,
               model: nn.Module | None = None, units: list | None = None) -> float:
    """The smallest ratio whose cut of ``model`` (default: ``dense``; the model without its dropped experts),
    with its stacked experts' ``units``, keeps at most ``target_params``/``target_macs`` of ``dense``."""
    metric, fraction, index, goal = _target(dense, opts, example)
    model = dense if model is None else model

    def size(r):
        return size_after(model, graph, keep_units(graph, scores, r, opts, widths), example, opts.compensate,
                          units, unit_counts(units or [], {}, r, opts), widths)[index]

    lo, hi = 0.0, 0.99
    if size(hi) > goal:
        raise TargetUnreachable(f"--target-{metric} {fraction} cannot be reached: ratio 0.99 still keeps "
                                f"{size(hi) / (goal / fraction):.3f} of the {metric} (protected layers stay whole)")
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(mid) <= goal else (mid, hi)
    return min(0.99, math.ceil(hi * 1e4) / 1e4)  # rounded up: a larger ratio never keeps more


def removed_fraction(graph: Trace, keep: dict[str, torch.Tensor]) -> float:
    """The fraction of all the trace's units that ``keep`` removes."""
    total = sum(g.units for g in graph.groups)
    return 1 - sum(len(keep[g.name]) for g in graph.groups) / total if total else 0.0


def _allocate(job, model: nn.Module, graph: Trace, scores: Scores, opts: ShrinkOptions, probe, engine, bars: Bars,
              widths: Widths | None, units: list, recalibrate: bool, fidelity: str | None = None,
              more: dict[int, float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The units kept under ``target_params``/``target_macs`` by measured sensitivity (:mod:`prunetool.allocate`),
    and the curves for the report (``fidelity``: what the divergence reads the outputs as, ``--fidelity``).
    ``more``: other unit-count multiples, each with the fraction of the target's metric its candidates meet
    (``--target-latency`` measures a MACs fraction per multiple); by default, at the target itself, the other
    :attr:`ShrinkOptions.roundings` that are some group's :attr:`prunetool.ops.Op.channel_block` (a convolution's: a
    matrix product's widths off 8 measured no slower). The candidate that diverges least among all is kept."""
    metric, fraction, index, goal = _target(job.dense, opts, job.example)
    if more is None:  # a size target: a further multiple where the deployed kernels block some group's channels by it
        # (a grouped convolution's groups keep their own counts: select)
        blocks = {_channel_block(g) for g in graph.groups if g.blocks == 1}
        more = {r: fraction for r in opts.roundings if r != opts.rounding and r in blocks}

    def size_of(keep, rounded=True):
        if rounded and widths is not None:
            keep = widths.round(keep, scores.scores)[0]
        kept = unit_counts(units, {}, removed_fraction(graph, keep), opts)
        return size_after(model, graph, keep, job.example, opts.compensate, units, kept,
                          widths if rounded else None)[index]

    ties, whole = widths.ties() if widths is not None else ([], [])
    trials = allocate.Trials(model, graph, scores.scores, opts.compensate, job.calib, probe, engine, scores.means,
                             recalibrate, fidelity)
    curves = allocate.measure(trials, lambda keep: size_of(keep, rounded=False), opts.max_layer_ratio, bars,
                              skip=whole)
    options, multiple = {}, {}
    for r, goal_r in {opts.rounding: goal, **{r: f * goal / fraction for r, f in more.items()}}.items():
        try:
            keep, _ = allocate.fit(allocate.tied(curves, ties, whole), size_of, goal_r, graph, scores.scores, r)
        except ValueError:
            if r != opts.rounding:
                continue
            raise UsageError(f"--target-{metric} {fraction} cannot be reached: removing {opts.max_layer_ratio} of "
                             "every layer's units still keeps more (protected layers stay whole; raise "
                             "--max-layer-ratio)")
        found = allocate.candidates(graph, keep, size_of, goal_r, scores.scores, r, whole, opts.max_layer_ratio)
        suffix = "" if r == opts.rounding else f", widths ×{r}"
        options.update({name + suffix: k for name, k in found.items()})
        multiple.update({name + suffix: r for name in found})
    if widths is not None:
        options = {name: widths.round(k, scores.scores)[0] for name, k in options.items()}
    chosen, measured = allocate.choose(trials, options, bars)
    return options[chosen], {
        "chosen": chosen,
        "candidates": {name: {"divergence": round(measured[name], 6), "removed": round(removed_fraction(graph, k), 4),
                              "round_to": multiple[name]} for name, k in options.items()},
        "curves": {c.group: {"units": c.units, "removed": c.units - len(options[chosen][c.group]),
                             "divergence": [[k, round(v, 6)] for k, v in zip(c.removed, c.cost)]}
                   for c in curves.values()}}


def plan(model, data=None, *, criterion: str = DRY_RUN_CRITERION, scope: str = ShrinkOptions.scope,
         max_layer_ratio: float = ShrinkOptions.max_layer_ratio, round_to: int | None = ShrinkOptions.round_to,
         free_widths: bool = ShrinkOptions.free_widths, calib: int = DRY_RUN_CALIB, input_shape=None, arch=None,
         arch_kwargs=None, unsafe_pickle=Source.unsafe_pickle, download=DataOptions.download, ratios=DRY_RUN_RATIOS,
         tokens: int | None = None, seq_len: int | None = None, tokenizer: str | None = None,
         output_key: str | None = None, trust_remote_code: bool = Source.trust_remote_code) -> dict:
    """The dry run: groups found, what is protected and why, and the size each ratio would give."""
    given = Keywords(locals())
    opts = given.make(ShrinkOptions)
    opts.check()
    job = start(given.source(), given.data())
    try:
        shape = job.example
        if scope == "global":
            scores = score(job.dense, job.graph, criterion, job.calib, settings=job.settings).scores
        else:
            scores = {g.name: torch.zeros(g.units) for g in job.graph.groups}
        base = (params(job.dense), macs(job.dense, shape))
        rows = []
        widths = widths_of(job, job.dense, job.graph, opts)
        units, left = expert_units.find(job.dense, batch_slice(job.probe, 0, 2), output_key)
        for r in ratios:
            p, m = size_after(job.dense, job.graph, keep_units(job.graph, scores, r, opts, widths), shape,
                              units=units, kept=unit_counts(units, {}, r, opts))
            rows.append({"ratio": r, "params": p, "macs": m, "params_fraction": p / base[0],
                         "macs_fraction": m / base[1]})
    finally:
        job.close()
    return {
        "command": "dry-run", "params": base[0], "macs": base[1], "input_shape": list(job.input_shape),
        "groups": [{"name": g.name, "units": g.units, "producers": [p.name for p in g.producers],
                    "consumers": [c.name for c in g.consumers], "members": [m.name for m in g.members],
                    "blocks": g.blocks} for g in job.graph.groups]
        + [{"name": f"{u.name}.units", "units": u.experts * u.units, "producers": u.describe()["producers"],
            "consumers": [f"{u.name}.{u.output}"], "members": [], "blocks": u.experts} for u in units],
        "protected": [{"name": p.name, "reason": p.reason} for p in job.graph.protected]
        + [{"name": name, "reason": f"the units inside its experts are kept whole: {why}"} for name, why in left],
        "ratios": rows, "settings": {"scope": scope, "round_to": opts.rounding, "criterion": criterion,
                                     "free_widths": free_widths},
    }


def _cpu(scores: Scores) -> Scores:
    return Scores(scores.criterion, {k: v.cpu() for k, v in scores.scores.items()},
                  {g: {c: m.cpu() for c, m in per.items()} for g, per in scores.means.items()})


def run(source: Source, data: DataOptions, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement,
        outputs: Outputs, staging: Staging, progress: bool = False,
        scores: Scores | None = None) -> tuple[nn.Module, dict]:
    """Remove units from every prunable group, compensate, verify, recover and measure (see :func:`shrink`)."""
    for options in (opts, data, recovery, measurement):
        options.check()
    if opts.target_latency is not None and measurement.offload:
        raise UsageError("--target-latency times the model on the device, which --offload streams weights to; drop "
                         "one of them")
    if recovery.recover and measurement.offload:
        raise UsageError("--recover trains the whole model on the device, which --offload is there to avoid; drop "
                         "one of them")
    check_job_outputs(outputs, source, data)
    bars = Bars(progress)
    job = start(source, data, measurement.device, measurement.offload)
    try:
        small, report = _run(job, opts, recovery, measurement, outputs, staging, bars, scores)
        if job.caller_mode is not None:
            unshare(small, job.dense)  # the caller's module stays theirs: nothing written into the result reaches it
        return small, report
    finally:
        job.close()


def _protect_misread(model: nn.Module, graph: Trace, keep: dict, probe, reported: Trace) -> tuple[dict, frozenset]:
    """After a cut failed its checks: ``keep`` with every group the tracer misread kept whole (its removal alone
    is not the same as zeroing it), each named among ``reported``'s protected layers with the difference, and
    those groups. One misread part never costs the rest; the cut is then made again."""
    misread = misread_groups(model, graph, keep, batch_slice(probe, 0, REMOVAL_PROBE))
    for name, diff in misread.items():
        reported.protected.append(Protected(name, f"removing its units is not the same as zeroing them (relative "
                                                  f"difference {diff:.2g}): the tracer misread this part"))
    if misread:
        warnings.warn(f"kept whole, the tracer misread them: {', '.join(misread)} (see the report's protected "
                      "layers)")
    return {g.name: torch.arange(g.units) if g.name in misread else keep[g.name] for g in graph.groups}, \
        frozenset(misread)


def _same_outputs(small: nn.Module, probe, want: torch.Tensor, what: str, tolerance: float = EXPERT_TOLERANCE
                  ) -> float:
    """The relative difference of ``small``'s outputs on ``probe`` from ``want``; raises ``VerificationError``
    saying ``what`` when it passes ``tolerance``."""
    diff = float((outputs_of(small, probe) - want).norm() / want.norm().clamp_min(1e-12))
    if not diff <= tolerance:
        raise VerificationError(f"{what} (relative difference {diff:.2g})")
    return diff


def _drop_experts(job, opts: ShrinkOptions, bars: Bars, device: str, offload: bool) -> tuple[nn.Module, Trace, list]:
    """The dense model with ``drop_experts`` of every mixture-of-experts block's experts removed (the least routed
    to), checked to equal the dense model routed around them; its trace; and the report's rows for the blocks."""
    found = experts.blocks(job.dense)
    if not offload:
        job.dense.to(device)
    mass = experts.routing_mass(job.dense, found, job.calib, job.settings.output_key, bars, device=device)
    job.dense.cpu()
    keep = experts.choose(found, mass, opts.drop_experts)
    current = clone(job.dense, share=True)
    experts.drop(current, keep)
    probe = batch_slice(job.probe, 0, REMOVAL_PROBE)
    with experts.routed_around(job.dense, keep):
        want = outputs_of(job.dense, probe)
    diff = _same_outputs(current, probe, want, "removing experts is not the same as routing around them")
    graph = trace_probe(current, job.probe, job.settings.output_key)
    rows = [{"name": f"{b.name}.experts", "units_before": b.count, "units_after": len(keep[b.name]),
             "producers": [f"{b.name}.{n}" for n, m in b.module.named_children() if m is b.router],
             "routing_mass": [round(float(v), 4) for v in mass[b.name]], "routed_around": diff} for b in found]
    return current, graph, rows


@dataclass
class BlockChoice:
    """The removable blocks of a model (:func:`prunetool.depth.find`), their compensation, and the order the greedy
    choice removes them in (``names``; ``rounds``: each round's divergences): the first k are the k that go."""

    found: list
    refit: depth.Refit
    names: list[str]
    rounds: list[dict]


def _choose_blocks(job, model: nn.Module, opts: ShrinkOptions, count: int, bars: Bars, device: str,
                   fidelity: str | None = None, found: list | None = None) -> BlockChoice:
    """The first ``count`` blocks of ``model`` the greedy choice removes (:func:`prunetool.depth.choose`, after
    the compensation ``--compensate`` asks for), among ``found`` (its removable blocks; found here when not
    given)."""
    key = job.settings.output_key
    probe = batch_to(job.probe, device, model_dtype(model))
    if found is None:
        found = depth.find(model, probe, key)
    if len(found) < count:
        raise UsageError(f"--drop-blocks {count}: the model has {len(found)} removable blocks (children "
                         "of a ModuleList/Sequential among siblings of their class that return their input's "
                         "shape); ask for fewer")
    refit = depth.Refit(model, found, job.calib, opts.compensate, key, device, fidelity)
    names, rounds = depth.choose(model, found, probe, count, key, bars, fidelity, refit)
    return BlockChoice(found, refit, names, rounds)


def _drop_blocks(job, model: nn.Module, opts: ShrinkOptions, bars: Bars, device: str, offload: bool,
                 fidelity: str | None = None, record: dict | None = None, blocks: BlockChoice | None = None
                 ) -> tuple[nn.Module, Trace, list, dict]:
    """``model`` without ``drop_blocks`` whole blocks (:mod:`prunetool.depth`; the first of ``blocks`` when it is
    given, chosen here otherwise), their writes compensated (:class:`prunetool.depth.Refit`, by ``--compensate``)
    and checked to equal that model with those blocks passing their input on; its trace, the report's rows and
    the structural record after the removal (``record``: the model's so far, :func:`prunetool.depth.remove`)."""
    key = job.settings.output_key
    if not offload:
        model.to(device)
    if blocks is None or len(blocks.names) < opts.drop_blocks:
        blocks = _choose_blocks(job, model, opts, opts.drop_blocks, bars, device, fidelity)
    found, names, rounds = blocks.found, blocks.names[:opts.drop_blocks], blocks.rounds[:opts.drop_blocks]
    small_probe = batch_slice(batch_to(job.probe, device, model_dtype(model)), 0, REMOVAL_PROBE)
    # the greedy choice compares blocks after a part of the compensation; ShortGPT's (least block influence) is
    # compensated in full beside it where it differs, and the one the held-out samples prefer goes
    influence = [b.name for b in sorted(found, key=lambda b: b.influence)[:opts.drop_blocks]]
    choices = [names] + ([influence] if set(influence) != set(names) and blocks.refit.active else [])
    compensated = [_compensated(model, blocks.refit, option, small_probe, bars, len(choices) > 1)
                   for option in choices]
    best = min(range(len(choices)), key=lambda i: compensated[i][3])
    names, (small, refits, want, _) = choices[best], compensated[best]
    chosen_by = "greedy divergence" if best == 0 else (
        f"block influence (ShortGPT): held-out divergence {compensated[1][3]:.6g} after compensation, the greedy "
        f"choice's {compensated[0][3]:.6g}")
    try:
        record = depth.remove(small, found, names, record)
    except ValueError as e:
        raise UsageError(f"--drop-blocks {opts.drop_blocks}: {e}; ask for fewer blocks")
    _same_outputs(small, small_probe, want, "removing blocks is not the same as passing their inputs on")
    model.cpu()
    small.cpu()
    graph = trace_probe(small, job.probe, key)
    rows = [{"name": b.name, "units_before": 1, "units_after": 0 if b.name in names else 1, "producers": [],
             "block": True, "block_influence": round(b.influence, 6),
             "divergence_alone": rounds[0].get(b.name) if rounds else None,
             **({"chosen_by": chosen_by} if b.name in names else {}),
             **({"compensation": [{k: v for k, v in r.items() if k != "blocks"} for r in refits
                                  if b.name in r["blocks"]]} if b.name in names else {})} for b in found]
    return small, graph, rows, record


def _compensated(model: nn.Module, refit: depth.Refit, names: list[str], probe, bars: Bars, compare: bool
                 ) -> tuple[nn.Module, list[dict], torch.Tensor, float]:
    """A copy of ``model`` sharing its weights, the blocks ``names`` passing their inputs on and compensated
    (``refit``); its refit records, its outputs on ``probe`` and (``compare``) its held-out divergence."""
    small = clone(model, share=True)
    with depth.skipped(small, names):
        refits = refit.apply(small, names, bars=bars)
        want = outputs_of(small, probe)
        return small, refits, want, refit.divergence(small) if compare else 0.0


def _drop_heads(job, model: nn.Module, graph: Trace, opts: ShrinkOptions, bars: Bars, device: str, offload: bool
                ) -> tuple[nn.Module, Trace, dict[str, int]]:
    """``model`` without ``--drop-heads`` attention heads (key/value groups where heads share them) in every
    attention layer: those the criterion ranks lowest, compensated by ``--compensate`` and verified as a cut of
    units is (:func:`prunetool.verify.verify`). Its trace and each attention group's head count before; the units
    step that follows ranks what is left afresh."""
    engine, key = job.settings, job.settings.output_key
    attention = [g for g in graph.groups if g.heads]
    if not attention:
        raise UsageError(f"--drop-heads {opts.drop_heads}: no attention heads to remove (none of the model's "
                         "groups is an attention layer's heads; see --dry-run); drop --drop-heads")
    few = min(attention, key=lambda g: g.units)
    if opts.drop_heads >= few.units:
        raise UsageError(f"--drop-heads {opts.drop_heads}: {few.name} has {few.units} heads (key/value groups) and "
                         "keeps at least one; ask for fewer")
    if not offload:
        model.to(device)
    try:
        stats = statistics(model, graph, job.calib, engine, bars, targets=opts.compensate == "lstsq")
        scores = _cpu(score(model, graph, opts.criterion, job.calib, bars=bars, means=stats.means, settings=engine))
        # (d + ½)/n: floor(ratio·n) is exactly d heads whatever the float rounding
        keep = select(graph, scores.scores, {g.name: (opts.drop_heads + 0.5) / g.units if g.heads else 0.0
                                             for g in graph.groups})
        widths = widths_of(job, model, graph, opts)
        moved = widths.round(keep, scores.scores)[1] if widths is not None else []
        if moved:  # the count asked for is the point: refuse rather than remove another (a plan tries the next)
            raise TargetUnreachable(f"--drop-heads {opts.drop_heads}: {moved[0].describe()}; ask for another count, "
                                    "or give --free-widths")
        means = sequential_means(model, graph, keep, job.calib, bars, engine) if opts.compensate == "mean" \
            else scores.means
        small = cut(clone(model, share=True), graph, keep, opts.compensate, means, job.calib, bars, stats=stats,
                    settings=engine).eval()
        stats.release()
    finally:
        model.cpu()
    small.cpu()
    verify(model, small, graph, keep, job.probe, key)
    return small, trace_probe(small, job.probe, key), {g.name: g.units for g in attention}


def _narrow_stream(job, model: nn.Module, opts: ShrinkOptions, bars: Bars, device: str, offload: bool
                   ) -> tuple[nn.Module, Trace, list]:
    """``model`` with ``--hidden`` of its residual stream's channels removed (:mod:`prunetool.width`; turned first
    with ``--rotate``, the stream's readers refit with ``--compensate lstsq``), after checking that turning the
    whole stream leaves the outputs as they were (what shows the stream was read right); its trace and the
    report's row."""
    key = job.settings.output_key
    if not offload:
        model.to(device)
    probe = batch_slice(batch_to(job.probe, device, model_dtype(model)), 0, REMOVAL_PROBE)
    try:
        try:
            stream = width.find(model, probe, key)
            kept = width.kept_width(model.config, opts.hidden, opts.rounding)
        except width.NotAStream as e:
            raise UsageError(f"--hidden {opts.hidden:g}: {e}; drop --hidden") from None
        if stream.tied and opts.rotate:
            head = model.get_output_embeddings().weight
            warnings.warn(f"--hidden: turning the stream unties the head from the embedding ({head.shape[0]:,} × "
                          f"{kept} more parameters); --no-rotate keeps the tie")
        directions, energy = width.basis(model, stream, job.calib, opts.rotate, device, key, bars)
        turned = clone(model, share=True)  # the turn sets new tensors, never writes into these
        width.slice_stream(turned, stream, directions, stream.width, rotated=opts.rotate)
        # a turned half-precision weight is rounded to its dtype: a misread stream moves the outputs by far more
        tolerance = max(EXPERT_TOLERANCE, 4 * torch.finfo(stored_dtype(model)).eps)
        _same_outputs(turned, probe, outputs_of(model, probe), "turning the residual stream changed the outputs: "
                                                              "its writers and readers were misread", tolerance)
        del turned
        small = clone(model, share=True)
        scales = width.norm_scales(model, stream, directions, kept, job.calib, device, key, bars)
        width.slice_stream(small, stream, directions, kept, scales, rotated=opts.rotate)
        refit = width.refit_readers(small, model, stream, job.calib, device, key, bars) \
            if opts.compensate == "lstsq" else 0
    finally:
        model.cpu()
    small.cpu()
    row = {"name": "hidden size", "units_before": stream.width, "units_after": kept,
           "units_asked": width.asked_width(stream.width, opts.hidden),
           "producers": [], "stream": True,
           "rotated": opts.rotate, "energy_kept": round(float(energy[:kept].sum() / energy.sum()), 6),
           "readers_refit": refit, "untied_head": stream.tied and opts.rotate}
    return small, trace_probe(small, job.probe, key), [row]


def _blocks_size(model: nn.Module, names: list[str], index: int, example) -> int:
    """``model``'s parameters (``index`` 0) or MACs (1) with the blocks ``names`` passing their input on."""
    trial = clone(model, share=True)
    with depth.skipped(trial, names):
        return (params(trial), macs(trial, example))[index]


def _plan_blocks(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, bars: Bars, plan: dict,
                 speed: DeployedSpeed | None) -> tuple[ShrinkOptions, BlockChoice, dict]:
    """How many whole blocks go under the target (``--axes`` names blocks): with units too, the count whose
    cut — the blocks, then one ratio of units meeting the target — diverges least from the dense outputs on the
    refit's held-out samples, counts tried upward until one does worse than the best (a count at which units cannot
    meet the target counts as infinite), up to the count whose blocks alone meet a size target (under a latency,
    its MACs, and on while the last count does best); blocks alone, the fewest that meet the size target. The
    options with that count, the choice, and ``plan`` filled for the report."""
    dense, device = job.dense, measurement.device
    fidelity = FIDELITY.get(measurement.fidelity)
    # a latency bounds the counts first by the MACs in its proportion (each trial then meets the latency measured)
    bound = opts if opts.target_latency is None else replace(opts, target_macs=opts.target_latency)
    metric, fraction, index, goal = _target(dense, bound, job.example)
    if not measurement.offload:
        dense.to(device)
    try:
        found = depth.find(dense, batch_to(job.probe, device, model_dtype(dense)), job.settings.output_key)
    finally:
        dense.cpu()
    if not found:
        raise UsageError(f"--axes {','.join(opts.axes)}: the model has no removable block (a child of a ModuleList/"
                         "Sequential among siblings of its class that returns its input's shape); drop blocks from "
                         "--axes")

    def ordered(count: int) -> BlockChoice:  # the greedy order's first ``count`` blocks (a longer one extends it)
        if not measurement.offload:
            dense.to(device)
        try:
            return _choose_blocks(job, dense, opts, count, bars, device, fidelity, found)
        finally:
            dense.cpu()

    # beyond the count whose smallest blocks alone meet the size target, no unit would go: no need to try further
    full = _blocks_size(dense, [], index, job.example)
    saved = sorted(full - _blocks_size(dense, [b.name], index, job.example) for b in found)
    most = next((n for n in range(1, len(found)) if full - sum(saved[:n]) <= goal), len(found) - 1)
    blocks = ordered(most)
    sizes = [_blocks_size(dense, blocks.names[:n], index, job.example) / full for n in range(most + 1)]
    plan["order"] = blocks.names
    if "units" not in opts.axes:
        met = [n for n in range(most + 1) if sizes[n] <= fraction]
        if not met:
            raise UsageError(f"--axes blocks: removing {most} of the {len(found)} blocks keeps {sizes[-1]:.3f} of the "
                             f"{metric}, more than --target-{metric} {fraction}; add units to --axes")
        plan["counts"] = [{"blocks": n, "blocks_" + metric: round(sizes[n], 4)} for n in range(met[0] + 1)]
        plan["chosen"] = met[0]
        return replace(opts, drop_blocks=met[0], ratio=0.0, target_params=None, target_macs=None), blocks, plan
    best, least = 0, math.inf
    for n in bars.track(range(len(found)), "planning: blocks against units"):
        if n > most:
            if opts.target_latency is None or best != most:
                break
            # a latency falls slower than the MACs (embeddings, the head and each call's overhead stay): while the
            # bound's count does best, one block more is tried (the greedy order is the same, one longer)
            most = n
            blocks = ordered(most)
            plan["order"] = blocks.names
            sizes.append(_blocks_size(dense, blocks.names[:n], index, job.example) / full)
        entry = _trial(job, replace(opts, drop_blocks=n), recovery, measurement, blocks, blocks.refit, speed)
        plan["counts"].append({"blocks": n, "blocks_" + metric: round(sizes[n], 4)} | entry)
        divergence = entry.get("divergence", math.inf)
        if divergence == math.inf:
            continue  # units cannot meet the target beside this few blocks: more blocks may let them
        if divergence >= least:
            break  # one more block did worse than the best so far: more would not do better
        best, least = n, divergence
    if least == math.inf and not (opts.plans_hidden or opts.plans_heads):  # narrower, or fewer heads, may still do
        raise UsageError(f"{_target_text(plan)} cannot be reached with up to {most} whole blocks removed: "
                         f"{plan['counts'][-1]['error']}")
    plan["chosen"] = best
    return replace(opts, drop_blocks=best), blocks, plan


def _plan_heads(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, bars: Bars,
                blocks: BlockChoice | None, plan: dict, speed: DeployedSpeed | None
                ) -> tuple[ShrinkOptions, BlockChoice | None, dict]:
    """How many attention heads (key/value groups) every layer loses (``--axes`` names heads), beside the blocks
    and hidden size chosen before: from none upward, the count whose cut — those heads, then one ratio of units
    meeting the target — diverges least on held-out samples, until one more does worse (a count at which units
    cannot meet the target counts as infinite: more heads may let them). Under a latency this is where the time
    is: at a long context each head's softmax and masks cost as much as its share of the matrix products. The
    options with the count, the blocks' order (chosen here for ``--drop-blocks N``), and the plan's ``heads`` (each
    count measured) and ``heads_chosen``."""
    dense, device, key = job.dense, measurement.device, job.settings.output_key
    fewest = min((g.units for g in job.graph.groups if g.heads), default=0)
    if not fewest:
        raise UsageError(f"--axes {','.join(opts.axes)}: the model has no attention heads to count (no group's "
                         "units are heads; see --dry-run); drop heads from --axes")
    fidelity = FIDELITY.get(measurement.fidelity)
    if not measurement.offload:
        dense.to(device)
    try:
        if blocks is None and opts.drop_blocks:  # chosen once: every trial and the run remove the same blocks
            blocks = _choose_blocks(job, dense, opts, opts.drop_blocks, bars, device, fidelity)
        held = blocks.refit if blocks is not None else depth.HeldOut(dense, job.calib, key, device, fidelity)
    finally:
        dense.cpu()
    plan["heads"], best, least = [], 0, math.inf
    for h in bars.track(range(fewest), "planning: heads against units"):
        entry = _trial(job, replace(opts, drop_heads=h), recovery, measurement, blocks, held, speed)
        plan["heads"].append({"heads": h} | entry)
        divergence = entry.get("divergence", math.inf)
        if divergence == math.inf:
            continue
        if divergence >= least:
            break  # one more head did worse than the best so far
        best, least = h, divergence
    if least == math.inf:
        raise UsageError(f"{_target_text(plan)} cannot be reached removing up to {fewest - 1} heads from every "
                         f"attention layer: {plan['heads'][-1]['error']}")
    plan["heads_chosen"] = best
    return replace(opts, drop_heads=best), blocks, plan


def _target_text(plan: dict) -> str:
    """The plan's target as its flag, e.g. ``--target-params 0.7``."""
    (metric, fraction), = plan["target"].items()
    return f"--target-{metric} {fraction}"


def _trial(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, blocks: BlockChoice | None,
           held: depth.HeldOut, speed: DeployedSpeed | None = None) -> dict:
    """What a plan compares of the cut ``opts`` asks for, one ratio in every layer, without training (BatchNorm
    recalibrated as the run will be) or evaluation: the ratio of units and the held-out divergence (and, under
    ``--target-latency``, the latency measured on ``speed``'s runtime); ``{"error": why}`` where one ratio cannot
    meet the target, or only beyond ``--max-layer-ratio`` (the allocation removes no more from a layer). The units'
    and the stream's fits read the calibration samples but those ``held`` out, so that the comparison is fair."""
    if len(job.calib) > held.rows[1] - held.rows[0]:  # (all of them held out of one sample or so: fit on those)
        job = replace(job, calib=job.calib.without(*held.rows))
    quiet = replace(measurement, evaluate=False)
    untrained = replace(recovery, finetune_epochs=0, recover=0.0)
    try:
        with warnings.catch_warnings():  # a trial is not the result: what its widths would say, the run says
            warnings.filterwarnings("ignore", message=".*" + re.escape(OFF_BLOCK))
            step = work(job, replace(opts, allocation="uniform"), untrained, quiet, QUIET, blocks=blocks,
                        shared_speed=speed)
    except TargetUnreachable as e:
        return {"error": str(e)}
    ratio, latency = step.settings["ratio"], step.extra.get("latency_target", {}).get("latency")
    if opts.allocating and ratio > opts.max_layer_ratio:
        return {"error": f"one ratio of units {ratio} is beyond --max-layer-ratio {opts.max_layer_ratio}"}
    if latency is not None and latency > opts.target_latency:  # the search's fastest, near the target: not met
        return {"error": f"the fastest cut measured runs in {latency} of the dense model's time, above "
                         f"--target-latency {opts.target_latency}", "latency": latency}
    small = step.model.to(measurement.device) if not measurement.offload else step.model
    entry = {"ratio": ratio, "divergence": round(held.divergence(small), 6)}
    small.cpu()
    return entry | ({"latency": latency} if latency is not None else {})


HIDDEN_STEP = 0.05  # --axes hidden: the widths tried are those the config accepts at multiples of this fraction


def _widths(job, opts: ShrinkOptions, measurement: Measurement) -> list[int]:
    """The hidden sizes a plan may narrow the stream to, widest first (each the largest the family's config accepts
    at a multiple of :data:`HIDDEN_STEP` removed); a one-line refusal, before any work, where the model has no
    stream :mod:`prunetool.width` narrows."""
    dense, device = job.dense, measurement.device
    if not measurement.offload:
        dense.to(device)
    try:
        stream = width.find(dense, batch_slice(batch_to(job.probe, device, model_dtype(dense)), 0, REMOVAL_PROBE),
                            job.settings.output_key)
    except width.NotAStream as e:
        raise UsageError(f"--axes {','.join(opts.axes)}: {e}; drop hidden from --axes") from None
    finally:
        dense.cpu()
    found = set()
    for k in range(1, round(1 / HIDDEN_STEP)):
        try:
            found.add(width.kept_width(dense.config, k * HIDDEN_STEP, opts.rounding))
        except width.NotAStream:
            break  # no narrower width is one the config accepts
    if not found - {stream.width}:
        raise UsageError(f"--axes {','.join(opts.axes)}: no narrower hidden size than {stream.width} is one the "
                         f"model's config accepts at multiples of {opts.rounding}; drop hidden from --axes")
    return sorted((w for w in found if w < stream.width), reverse=True)


def _plan_hidden(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, bars: Bars,
                 blocks: BlockChoice | None, plan: dict, widths: list[int], speed: DeployedSpeed | None
                 ) -> tuple[ShrinkOptions, BlockChoice, dict]:
    """How much of the hidden size goes (``--axes`` names hidden), and how many blocks when the plan chooses those
    too: from the count of blocks chosen at the full width (or ``--drop-blocks``), a descent over (blocks, width):
    each move goes to a neighbour — one width narrower, one block fewer or more, one width wider, the first of them
    whose cut, then one ratio of units meeting the target, diverges less on held-out samples — until none does.
    The options with the choice, the blocks' order, and the plan with every cut measured."""
    dense, device, key = job.dense, measurement.device, job.settings.output_key
    full = dense.config.hidden_size
    if not measurement.offload:
        dense.to(device)
    try:
        if blocks is None and opts.drop_blocks:
            blocks = _choose_blocks(job, dense, opts, opts.drop_blocks, bars, device,
                                    FIDELITY.get(measurement.fidelity))
        held = blocks.refit if blocks is not None else \
            depth.HeldOut(dense, job.calib, key, device, FIDELITY.get(measurement.fidelity))
    finally:
        dense.cpu()
    counts = range(len(blocks.names) + 1) if opts.plans_blocks else [opts.drop_blocks]
    sizes = [full] + widths
    measured = {(c["blocks"], 0): c.get("divergence", math.inf) for c in plan["counts"]}

    def fraction(k: int) -> float:
        return (full - sizes[k]) / full  # exact: the width kept is sizes[k] (width.asked_width)

    def measure(n: int, k: int) -> float:
        if (n, k) not in measured:  # infinite where units cannot meet the target at this width: a narrower one may
            entry = _trial(job, replace(opts, drop_blocks=n, hidden=fraction(k)), recovery, measurement, blocks, held,
                           speed)
            measured[n, k] = entry.get("divergence", math.inf)
            plan["counts"].append({"blocks": n, "hidden_size": sizes[k]} | entry)
        return measured[n, k]

    at = (plan.get("chosen", opts.drop_blocks), 0)
    while measure(*at) == math.inf and at[1] + 1 < len(sizes):
        at = (at[0], at[1] + 1)  # units alone cannot meet the target this wide: start from the widest that can
    for _ in bars.track(range(len(counts) * len(sizes)), "planning: blocks, hidden size and units"):
        n, k = at
        # narrower first, then fewer blocks (the width took part of the target), more, wider; the first that does
        # better is taken (fewer cuts measured than comparing all four)
        near = [(n + dn, k + dk) for dn, dk in ((0, 1), (-1, 0), (1, 0), (0, -1))
                if n + dn in counts and 0 <= k + dk < len(sizes)]
        better = next((c for c in near if measure(*c) < measured[at]), None)
        if better is None:
            break  # no neighbour does better
        at = better
    if measured[at] == math.inf:
        raise UsageError(f"{_target_text(plan)} cannot be reached at any hidden size down to {sizes[at[1]]}: "
                         f"{plan['counts'][-1]['error']}")
    plan["chosen"], plan["hidden_size"], plan["order"] = at[0], sizes[at[1]], blocks.names if blocks else []
    return replace(opts, drop_blocks=at[0], hidden=fraction(at[1])), blocks, plan


def _plan(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, bars: Bars
          ) -> tuple[ShrinkOptions, BlockChoice | None, dict]:
    """What a plan across axes (``--axes`` naming blocks or hidden) removes under the size or latency target: the
    options with the counts chosen, the blocks' order, and the plan for the report."""
    widths = _widths(job, opts, measurement) if opts.plans_hidden else []
    target = {"latency": opts.target_latency} if opts.target_latency is not None else \
        dict([_target(job.dense, opts, job.example)[:2]])
    blocks, plan = None, {"axes": list(opts.axes), "target": target, "counts": []}
    # under a latency, one runtime times every trial against the dense model (exported once)
    speed = DeployedSpeed(job.dense, job.example, 1, job.settings.output_key, device=measurement.device) \
        if opts.target_latency is not None else None
    try:
        if opts.plans_blocks:
            opts, blocks, plan = _plan_blocks(job, opts, recovery, measurement, bars, plan, speed)
        if opts.plans_hidden:
            opts, blocks, plan = _plan_hidden(job, opts, recovery, measurement, bars, blocks, plan, widths, speed)
        if opts.plans_heads:
            opts, blocks, plan = _plan_heads(job, opts, recovery, measurement, bars, blocks, plan, speed)
    finally:
        if speed is not None:
            speed.close()
    return opts, blocks, plan


def _cut_units(small: nn.Module, units: list, unit_stats: dict, kept: dict[str, int],
               compensate: str) -> tuple[float, list[str]]:
    """Cut ``small``'s stacked experts to ``kept`` units each (their best by saliency), checked to equal
    the dense experts with the removed units zeroed, then compensated. The check's difference, and the modules left
    uncompensated."""
    keep = expert_units.choose(units, expert_units.scores(units, unit_stats), kept)
    expert_units.cut(small, units, keep)
    diff = expert_units.check(small, units, keep, unit_stats)
    if not diff <= expert_units.TOLERANCE:
        raise VerificationError(f"removing units inside the experts is not the same as zeroing them (relative "
                                f"difference {diff:.2g})")
    missed = expert_units.compensate(small, units, keep, unit_stats, compensate)
    if missed:
        warnings.warn(f"the units removed inside the experts of {', '.join(missed)} are not compensated (see the "
                      "report)")
    return diff, missed


def _run(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, outputs: Outputs,
         staging: Staging, bars: Bars, scores: Scores | None) -> tuple[nn.Module, dict]:
    blocks, plan = None, None
    if opts.plans:
        opts, blocks, plan = _plan(job, opts, recovery, measurement, bars)
        scores = None  # scored on the dense model; blocks or channels may go first
    step = work(job, opts, recovery, measurement, bars, scores, blocks)
    if plan is not None:
        step.extra["plan"] = plan
    report = finish(job, "shrink", step.model, step.settings, step.layers, step.checks, factored=step.factored,
                    outputs=outputs, staging=staging, measurement=measurement, bars=bars, extra=step.extra)
    return step.model, report


def work(job, opts: ShrinkOptions, recovery: Recovery, measurement: Measurement, bars: Bars,
         scores: Scores | None = None, blocks: BlockChoice | None = None,
         shared_speed: DeployedSpeed | None = None) -> "Step":
    """The cut itself, without the shared end: the smaller model and what to record and report about it
    (``blocks``: the order whole blocks go in, when it is known; chosen here otherwise; ``shared_speed``: the
    runtime a plan times its trials on, left open, the result's latency read from the search's steps)."""
    dense, calib, graph, device, engine = job.dense, job.calib, job.graph, measurement.device, job.settings
    if not graph.groups and not expert_units.stacked(dense):
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in graph.protected[:2])
        raise UsageError(f"nothing to prune: every layer is protected ({reasons}); see --dry-run for the reasons")
    if recovery.finetune_epochs and not job.data.has_labels:
        raise UsageError("--finetune-epochs needs --data with a train split")
    if opts.drop_experts and not experts.blocks(dense):
        raise UsageError("--drop-experts: the model has no mixture-of-experts block (a router 'gate' beside "
                         "'experts'); drop the flag")
    if not job.data.has_labels and opts.criterion in DATA_CRITERIA:
        warnings.warn(f"no --data: {opts.criterion} scores come from random inputs labelled by the model itself")
    recalibrate = has_batchnorm(dense) if recovery.recalibrate_bn is None else recovery.recalibrate_bn
    loader = eval_loader(job.data, job.eval) if measurement.evaluate else None
    steps = list(opts.schedule) if opts.schedule else [opts.ratio]
    ratio = steps[-1]

    current, history, probe, reverted, rounded, widths = dense, [], job.probe, False, [], None
    fidelity = FIDELITY.get(measurement.fidelity)  # how every divergence below reads the outputs
    moe, units, counts, missed, sensitivity, speed = [], [], {}, [], None, None
    goals: dict[int, LatencyGoal] = {}  # --target-latency: what each unit-count multiple's steps found
    structure_record = dict(job.ckpt.record.get("factored", {}))
    if opts.drop_experts:
        current, graph, moe = _drop_experts(job, opts, bars, device, measurement.offload)
    if opts.drop_blocks:
        current, graph, dropped, structure_record = _drop_blocks(job, current, opts, bars, device,
                                                                 measurement.offload, fidelity, structure_record,
                                                                 blocks)
        moe += dropped
    if opts.hidden:
        current, graph, narrowed = _narrow_stream(job, current, opts, bars, device, measurement.offload)
        moe += narrowed
    heads: dict[str, int] = {}
    if opts.drop_heads:
        current, graph, heads = _drop_heads(job, current, graph, opts, bars, device, measurement.offload)
        scores = None  # scores given were the model's before: the units step scores what is left
    original = {g.name: g.units for g in graph.groups}  # after blocks, experts or heads went (names may shift)
    for step, step_ratio in enumerate(steps):
        if step:
            graph = trace_probe(current, probe, engine.output_key)
        if not measurement.offload:
            current.to(device)
        stats = statistics(current, graph, calib, engine, bars, targets=opts.compensate == "lstsq")
        units, left = expert_units.find(current, batch_to(batch_slice(probe, 0, 2), device, model_dtype(current)),
                                        engine.output_key)
        if step == 0 and not graph.groups and not units:
            reasons = "; ".join(f"{name}: {why}" for name, why in left[:2])
            raise UsageError(f"nothing to prune: every layer is protected ({reasons}); see --dry-run for the reasons")
        if step == 0:
            counts = {u.name: u.units for u in units}
            known = {p.name for p in job.graph.protected}  # a plan's trials run this too
            job.graph.protected += [Protected(name, f"the units inside its experts are kept whole: {why}")
                                    for name, why in left if name not in known]
        unit_stats = expert_units.statistics(current, units, calib, engine.output_key, bars, device=device)
        if scores is None or step:
            scores = score(current, graph, opts.criterion, calib, bars=bars, means=stats.means, settings=engine)
        scores = _cpu(scores)
        trim_heap()
        widths = widths_of(job, current, graph, opts)
        allocating = opts.allocating and not units  # units inside stacked experts: one ratio (no curves for them)
        if step == 0 and opts.target_latency is not None:
            speed = shared_speed or DeployedSpeed(dense, job.example, 1, engine.output_key, device=device)
            goals = _latency_goals(job, current, graph, scores.scores, opts, widths, units, speed)
            if opts.rounding not in goals or not allocating:
                # one ratio (nothing measures which diverges less): the multiple keeping the most MACs at the latency
                opts = replace(opts, round_to=max(goals, key=lambda r: (goals[r].met(opts.target_latency),
                                                                         goals[r].macs)))
            macs_goal = goals[opts.rounding].macs
            opts = replace(opts, target_macs=macs_goal)  # the allocation meets the MACs the latency needs
        if step == 0 and opts.allocating and units:
            warnings.warn("the target is shared by one ratio: allocation by sensitivity does not measure the units "
                          "inside stacked experts")
        if step == 0 and allocating:
            further = {r: g.macs for r, g in goals.items() if r != opts.rounding} if goals else None
            keep, sensitivity = _allocate(job, current, graph, scores, opts,
                                          batch_to(probe, device, model_dtype(current)), engine, bars, widths, units,
                                          recalibrate, fidelity, further)
            rounding = sensitivity["candidates"][sensitivity["chosen"]]["round_to"]
            if rounding != opts.rounding:  # a candidate at widths the kernels like won: its multiple (and MACs goal)
                opts = replace(opts, round_to=rounding, **({"target_macs": goals[rounding].macs} if goals else {}))
            step_ratio = ratio = round(removed_fraction(graph, keep), 4)
        elif step == 0 and opts.targeted:
            step_ratio = ratio = fit_target(dense, graph, scores.scores, opts, job.example, widths, current, units)
        if allocating:
            pass  # keep: the allocation's
        elif opts.schedule:  # cumulative: each group ends the step with n₀ − floor(r·n₀) units
            per_group = {g.name: (g.units - (original[g.name] - n_removed(original[g.name], step_ratio))) / g.units
                         for g in graph.groups}
            keep = select(graph, scores.scores, per_group, opts.rounding)
        else:
            keep = keep_units(graph, scores.scores, step_ratio, opts)
        if widths is not None:
            keep, rounded = widths.round(keep, scores.scores)
        misread: frozenset = frozenset()
        while True:
            means = sequential_means(current, graph, keep, calib, bars, engine) if opts.compensate == "mean" \
                else scores.means
            small = cut(clone(current, share=True), graph, keep, opts.compensate, means, calib, bars, stats=stats,
                        settings=engine).eval()
            paths = dict(stats.paths)
            stats.release()
            trim_heap()  # the passes' freed memory back to the system before the checks (glibc keeps it otherwise)
            current.cpu()
            small.cpu()
            try:
                checks = verify(current, small, graph, keep, probe, engine.output_key, misread)
                break
            except VerificationError:
                keep, found = _protect_misread(current, graph, keep, probe, job.graph)  # raises when none is
                if not found - misread:
                    raise
                misread |= found
                if widths is not None:
                    keep, more = widths.round(keep, scores.scores, misread)
                    moved = {name for r in more for name in r.groups}
                    rounded = [r for r in rounded if not moved & set(r.groups)] + more
                del small
                if not measurement.offload:
                    current.to(device)
                stats = statistics(current, graph, calib, engine, bars, targets=opts.compensate == "lstsq")
        if units:
            checks["expert_units"], missed = _cut_units(small, units, unit_stats,
                                                        unit_counts(units, counts, step_ratio, opts), opts.compensate)
        if recalibrate or recovery.finetune_epochs or recovery.recover:
            unshare(small, current)  # both write into the tensors
        cut_any = any(len(keep[g.name]) < g.units for g in graph.groups) or (step == 0 and opts.drop_blocks)
        # (under --target-latency the widths were measured: nothing to warn of)
        off = _off_block(graph, keep) if opts.round_to is None and opts.target_latency is None and \
            step == len(steps) - 1 else []
        if off:
            name, kept, block = off[0]
            warnings.warn(f"{len(off)} {OFF_BLOCK} {block} that ONNX Runtime's CPU "
                          f"convolutions run in blocks of (e.g. {name}: {kept}); such a cut can run slower there than "
                          f"the dense model (the Fashion-MNIST ResNet-20 at 2x fewer MACs: 0.67x, against 1.35x at "
                          f"widths of the block); give --round-to {block}, or --target-latency to measure it")
        if recalibrate and cut_any:  # whole blocks gone shift the statistics of every BatchNorm after them too
            reverted |= not recalibrate_bn(small, calib, probe=probe, output_key=engine.output_key)
        entry = {"ratio": step_ratio, "params": params(small)}
        if loader is not None and (recovery.finetune_epochs or recovery.recover or len(steps) > 1):
            q = evaluate(small, loader, device, bars, "evaluating the cut", engine.output_key)
            entry[f"{q.metric}_after_cut"] = q.value
        if recovery.finetune_epochs:
            upcast_half(small)  # trained in float32 (steps below a half's resolution would vanish), saved rounded
            entry["finetune_loss"] = finetune(small, job.data, recovery.finetune_epochs, recovery.finetune_lr,
                                              recovery.batch_size, recovery.optimizer,
                                              dense if recovery.distill else None, device, bars,
                                              output_key=engine.output_key)
            if loader is not None:
                q = evaluate(small, loader, device, bars, "evaluating", engine.output_key)
                entry[f"{q.metric}_after_finetune"] = q.value
        if recovery.recover:
            upcast_half(small)
            entry["recover"] = distill(small, dense, recovery_inputs(job), recovery.recover, recovery.recover_lr,
                                       device=device, bars=bars, output_key=engine.output_key, metric=fidelity,
                                       mixup=recovery.mixup)
            if loader is not None:
                q = evaluate(small, loader, device, bars, "evaluating", engine.output_key)
                entry[f"{q.metric}_after_recover"] = q.value
        history.append(entry)
        current = small
    checks.pop("outputs")

    before = original | heads  # an attention layer's heads before --drop-heads
    layers = moe + [{"name": g.name, "units_before": before.get(g.name, g.units), "units_after": len(keep[g.name]),
                     "producers": [p.name for p in g.producers]} for g in graph.groups]
    kept = unit_counts(units, counts, ratio, opts)
    layers += [u.describe() | {"units_before": u.experts * counts[u.name], "units_after": u.experts * kept[u.name]}
               for u in units]
    settings = {"criterion": opts.criterion, "ratio": ratio, "compensation": opts.compensate, "scope": opts.scope,
                "max_layer_ratio": opts.max_layer_ratio, "target_params": opts.target_params,
                "target_macs": opts.target_macs, "round_to": opts.rounding, "schedule": opts.schedule,
                "recalibrate_bn": recalibrate and not reverted, "finetune_epochs": recovery.finetune_epochs,
                "lr": recovery.finetune_lr, "recover_lr": recovery.recover_lr, "batch_size": recovery.batch_size,
                "optimizer": recovery.optimizer,
                "distill": recovery.distill, "recover": recovery.recover, "engine": paths,
                "free_widths": opts.free_widths,
                "drop_experts": opts.drop_experts, "drop_blocks": opts.drop_blocks, "drop_heads": opts.drop_heads,
                "hidden": opts.hidden,
                "rotate": opts.rotate,
                "target_latency": opts.target_latency,
                "allocation": "sensitivity" if sensitivity is not None else ("uniform" if opts.targeted else None)}
    extra = {"protected": [{"name": p.name, "reason": p.reason} for p in job.graph.protected]}
    if speed is not None and shared_speed is not None:  # a plan's trial: the search measured its cut
        found = goals[opts.rounding]
        extra["latency_target"] = {"goal": opts.target_latency, "macs_goal": found.macs, "steps": found.steps,
                                   "latency": found.best["latency"]}
    elif speed is not None:
        extra["latency_target"] = _latency_met(speed, current, opts.target_latency,
                                               [st for g in goals.values() for st in g.steps], opts.target_macs)
    if sensitivity is not None:
        extra["allocation"] = sensitivity
    if rounded:
        extra["rounded"] = [asdict(r) | {"text": r.describe()} for r in rounded]
    if widths is not None and widths.no_bias and opts.compensate != "none":
        how = ("not compensated (mean compensation needs a bias)" if opts.compensate == "mean" else
               f"refit without a bias (their weights alone; one reading {MAX_FIT_INPUTS:,} inputs or more is not "
               "refit)")
        extra.setdefault("rounded", []).append({"no_bias": widths.no_bias, "text": (
            f"{', '.join(widths.no_bias)}: {how}, the family's config holds no bias there; --free-widths adds one "
            "(prunetool's own file)")})
    if missed:
        extra["experts_not_compensated"] = {"modules": missed, "text": (
            f"{', '.join(missed)}: the units removed inside the experts are not compensated ("
            + ("the experts have no output bias to take their means)" if opts.compensate == "mean" else
               f"their Gram matrices exceed {expert_units.GRAM_BUDGET >> 30} GiB)"))}
    if recovery.finetune_epochs or recovery.recover or len(steps) > 1:
        extra["steps"] = history
    return Step(current, settings, layers, checks, extra, structure_record)


def _latency_met(speed: DeployedSpeed, small: nn.Module, goal: float, steps: list[dict], macs_goal: float) -> dict:
    """The measured latency of the result against ``goal``; ``missed``, a budget's line (the run exits 1), when it
    is missed by more than the noise."""
    try:
        measured = speed.speedup(small)
    finally:
        speed.close()
    latency = 1 / measured["speedup"]["p50"]
    missed = None
    if latency > goal + LATENCY_MISS and not measured["noisy"]:
        missed = (f"--target-latency {goal}: the result runs in {latency:.3f} of the dense model's time in "
                  f"{speed.runtime} (the one-ratio cut at {macs_goal:.3f} of the MACs measured within the target; "
                  "timings vary, and an allocation across layers spends MACs where kernels may pay less); lower the "
                  "target, or give --allocation uniform")
    return {"goal": goal, "runtime": speed.runtime, "batch": speed.batch, "macs_goal": macs_goal, "steps": steps,
            "latency": round(latency, 4), "noisy": measured["noisy"], "missed": missed}


def shrink(model, data=None, criterion: str | None = ShrinkOptions.criterion, ratio: float = ShrinkOptions.ratio,
           compensate: str = ShrinkOptions.compensate, *, calib: int = DataOptions.calib, eval: int | None = None,
           input_shape: tuple[int, ...] | None = None, device: str = Measurement.device, out: str | None = None,
           onnx: str | None = None, pt2: str | None = None, arch: str | None = None,
           arch_kwargs: dict | None = None, unsafe_pickle: bool = Source.unsafe_pickle,
           download: bool = DataOptions.download, progress: bool = False, scope: str = ShrinkOptions.scope,
           max_layer_ratio: float = ShrinkOptions.max_layer_ratio, target_params: float | None = None,
           target_macs: float | None = None, target_latency: float | None = None, allocation: str | None = None,
           round_to: int | None = ShrinkOptions.round_to,
           free_widths: bool = ShrinkOptions.free_widths, drop_blocks: int = ShrinkOptions.drop_blocks,
           drop_experts: float = ShrinkOptions.drop_experts, drop_heads: int = ShrinkOptions.drop_heads,
           axes: tuple[str, ...] | None = ShrinkOptions.axes,
           hidden: float = ShrinkOptions.hidden, rotate: bool = ShrinkOptions.rotate,
           latency_batches: tuple[int, ...] = Measurement.latency_batches, scores: Scores | None = None,
           measure: bool = Measurement.evaluate, schedule: list[float] | None = None, recalibrate: bool | None = None,
           finetune_epochs: int = Recovery.finetune_epochs, lr: float | None = Recovery.lr,
           batch_size: int = Recovery.batch_size, optimizer: str = Recovery.optimizer,
           distill: bool = Recovery.distill, recover: float = Recovery.recover, mixup: bool = Recovery.mixup,
           tokens: int | None = None, seq_len: int | None = None, tokenizer: str | None = None,
           output_key: str | None = None, trust_remote_code: bool = Source.trust_remote_code,
           offload: bool = Measurement.offload) -> tuple[nn.Module, dict]:
    """Remove units from every prunable group, compensate, verify, recover and measure.

    ``model`` is an ``nn.Module`` (left as it was), a :class:`Checkpoint` or a checkpoint path. With
    ``scope="layer"`` every group loses ``floor(ratio·n)`` units; with ``"global"`` ``ratio`` of all units go,
    ranked across groups. ``target_latency`` (a fraction of the dense model's time at batch 1 in ONNX Runtime, or
    PyTorch on ``device="cuda"``) becomes the MACs fraction whose one-ratio cut measured within it; a result
    timed slower than it beyond the noise sets ``report["latency_target"]["missed"]`` (the CLI exits 1).
    ``target_params``/``target_macs`` (fractions of the original) are shared across layers by
    measured sensitivity (``allocation="sensitivity"``, the default: each layer loses what costs the least
    divergence from the dense outputs after compensation) or by one ratio (``allocation="uniform"``).
    ``drop_blocks`` whole residual blocks (transformer layers, CNN blocks whose shortcut is the identity) go first,
    each the one whose removal moves the outputs least (:mod:`prunetool.depth`); ``drop_experts`` of every
    mixture-of-experts block's experts likewise. ``drop_heads`` attention heads (key/value groups where heads share
    them) of every attention layer go next, the least important by ``criterion``, compensated as units are.
    ``axes=("units", "blocks")`` under ``target_params``/``target_macs``
    chooses the number of blocks by measuring the cut at each (``("blocks",)``: blocks alone, the fewest that meet
    the target); the report's ``plan`` lists what each number measured; ``"units,blocks,hidden"`` or
    ``"units,hidden"`` choose the hidden size too (a descent over blocks and widths). ``hidden`` (a Hugging Face pre-norm
    decoder) removes that fraction of the residual stream's channels before any unit, the stream turned onto its
    principal directions first with ``rotate`` (:mod:`prunetool.width`). ``schedule`` (cumulative ratios, e.g.
    ``[0.1, 0.2, 0.4, 0.6]``) prunes step by step, re-scoring at each step, with ``finetune_epochs`` of training
    after every step. BatchNorm statistics are recalibrated on the calibration data after every cut
    (``recalibrate=None``: when the model has BatchNorm). Returns the smaller
    model and a report dict (the CLI's ``--json``). With ``out`` (``.safetensors`` or ``.pt``) the model is
    saved there, once the saved bytes were checked to reload to identical outputs; ``onnx``/``pt2`` export it,
    checked against PyTorch. ``measure=False`` skips evaluation and latency. ``model`` may be a Hugging Face
    model directory (``out`` then a directory too: head and MLP counts are rounded to ones the family's config
    holds, the same in every layer, and the report's ``rounded`` says what moved; ``free_widths=True`` cuts as asked
    and writes prunetool's own file instead); token models take ``tokens`` (a structure-only run of random
    ids), ``seq_len``/``tokenizer`` (text data) and ``output_key`` (the logits of a structured output);
    ``trust_remote_code`` lets a directory's own model code run. The returned model keeps the checkpoint's
    dtypes (a bfloat16 checkpoint gives a bfloat16 model; prunetool computes half precision in float32).
    ``offload=True`` with ``device="cuda"`` keeps the weights in host memory and onloads each call's own to the GPU
    (a model larger than the GPU); peak memory is estimated before loading and a run that cannot fit is refused.
    """
    given = Keywords(locals())
    if isinstance(axes, str):  # "units,blocks" as the command line writes it
        axes = axes.split(",")
    opts = given.make(ShrinkOptions, schedule=list(schedule) if schedule else None,
                      axes=tuple(axes) if axes is not None else None)
    with Staging() as staging:
        small, report = run(given.source(), given.data(), opts, given.make(Recovery), given.measurement(),
                            given.make(Outputs), staging, progress, scores)
        staging.commit()
    return small, report
