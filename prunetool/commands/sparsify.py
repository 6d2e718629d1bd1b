"""``sparsify``: iterative magnitude pruning of single weights (seed 004: 30% of the remaining weights of every
layer per round, retraining between rounds, optional rewind), then physical removal of the units left without
incoming weights (their output is a constant: bias propagation replaces them exactly) or without outgoing weights
(nothing reads them), so the result is smaller, not just sparse (Evci §2.2)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import layers as layer_kinds
from ..layers import clone
from ..cut import apply_masks, cut, sequential_means
from ..data import eval_loader
from ..errors import UsageError
from ..measure import evaluate
from ..options import DataOptions, Measurement, Outputs, Recovery, Source, SparsifyOptions
from ..progress import Bars
from ..recover import finetune, has_batchnorm, recalibrate_bn
from ..score import magnitude_masks, removable_units
from ..staging import Staging
from ..verify import verify
from .common import Keywords, finish, check_job_outputs, start


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose single weights are masked: those of the linear and convolution kinds of
    :mod:`prunetool.layers` (Hugging Face's GPT-2 ``Conv1D``, depthwise and transposed convolutions too); layers
    registered as atomic keep their weights."""
    return {n: m for n, m in model.named_modules()
            if layer_kinds.kind_of(m).op is not None and not layer_kinds.kind_of(m).atomic
            and isinstance(getattr(m, "weight", None), torch.Tensor)}


def run(source: Source, data: DataOptions, opts: SparsifyOptions, recovery: Recovery, measurement: Measurement,
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


def _run(job, opts: SparsifyOptions, recovery: Recovery, measurement: Measurement, outputs: Outputs,
         staging: Staging, bars: Bars) -> tuple[nn.Module, dict]:
    if not job.data.has_labels:
        raise UsageError("sparsify retrains between rounds: it needs --data with a train split")
    dense, calib, device = job.dense, job.calib, measurement.device
    sparse = clone(dense)
    layers = prunable_weights(sparse)
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    early = None
    loader = eval_loader(job.data, job.eval)
    history = []
    for r in range(opts.rounds):
        magnitude_masks(layers, masks, opts.imp)
        if opts.rewind and early is not None:
            sparse.load_state_dict(early)
        apply_masks(layers, masks)
        losses = finetune(sparse, job.data, opts.finetune_epochs, recovery.finetune_lr, recovery.batch_size,
                          recovery.optimizer, device=device, bars=bars,
                          after_step=lambda m: apply_masks(layers, masks),
                          output_key=job.settings.output_key) if opts.finetune_epochs else []
        if opts.rewind and early is None:
            early = copy.deepcopy(sparse.state_dict())
        total = sum(int(m.numel()) for m in masks.values())
        history.append({"round": r + 1, "sparsity": 1 - sum(int(m.sum()) for m in masks.values()) / total,
                        "finetune_loss": losses,
                        "accuracy": evaluate(sparse, loader, device, output_key=job.settings.output_key).accuracy})

    graph = job.graph
    keep = removable_units(graph, sparse)
    means = sequential_means(sparse, graph, keep, calib, bars, job.settings)
    small = cut(clone(sparse), graph, keep, "mean", means, calib, bars).eval()
    checks = verify(sparse, small, graph, keep, job.probe, job.settings.output_key)
    checks.pop("outputs")
    if has_batchnorm(small) and any(len(keep[g.name]) < g.units for g in graph.groups):
        recalibrate_bn(small, calib, probe=job.probe, output_key=job.settings.output_key)

    per_layer = [{"name": n, "weights": int(masks[n].numel()), "nonzero": int(masks[n].sum()),
                  "sparsity": 1 - float(masks[n].float().mean())} for n in layers]
    units = [{"name": g.name, "units_before": g.units, "units_after": len(keep[g.name]),
              "producers": [p.name for p in g.producers]} for g in graph.groups]
    settings = {"imp": opts.imp, "rounds": opts.rounds, "finetune_epochs": opts.finetune_epochs,
                "lr": recovery.finetune_lr, "batch_size": recovery.batch_size, "optimizer": recovery.optimizer,
                "rewind": opts.rewind}
    nonzero = sum(int((p != 0).sum()) for p in small.parameters())
    report = finish(job, "sparsify", small, settings, units, checks,
                    factored=job.ckpt.record.get("factored", {}), outputs=outputs, staging=staging,
                    measurement=measurement, bars=bars,
                    extra={"rounds": history, "sparsity": per_layer, "nonzero_params_after": nonzero})
    return small, report


def sparsify(model, data, *, imp: float = SparsifyOptions.imp, rounds: int = SparsifyOptions.rounds,
             finetune_epochs: int = SparsifyOptions.finetune_epochs, lr: float | None = Recovery.lr,
             batch_size: int = Recovery.batch_size, optimizer: str = Recovery.optimizer,
             rewind: bool = SparsifyOptions.rewind, calib: int = DataOptions.calib,
             eval: int | None = None, device: str = Measurement.device, out: str | None = None, onnx: str | None = None,
             pt2: str | None = None, arch=None, arch_kwargs=None, unsafe_pickle: bool = Source.unsafe_pickle,
             download: bool = DataOptions.download, progress: bool = False,
             latency_batches=Measurement.latency_batches, measure: bool = Measurement.evaluate,
             input_shape=None, seq_len: int | None = None, tokenizer: str | None = None,
             output_key: str | None = None,
             trust_remote_code: bool = Source.trust_remote_code) -> tuple[nn.Module, dict]:
    """Iterative magnitude pruning with retraining, then physical removal of units left without weights.
    ``data`` needs a train split; for a token model, a text file cut into ``seq_len`` tokens by ``tokenizer``
    (default: the model directory's), and ``output_key`` names the logits of a structured output."""
    given = Keywords(locals())
    with Staging() as staging:
        small, report = run(given.source(), given.data(), given.make(SparsifyOptions), given.make(Recovery),
                            given.measurement(), given.make(Outputs), staging, progress)
        staging.commit()
    return small, report
