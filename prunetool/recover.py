"""Recover accuracy after a cut: BatchNorm recalibration and fine-tuning (optionally distilled from the dense
model). Only the train split is used: calibration samples for BatchNorm, the whole train split for
fine-tuning; the test split never chooses anything."""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import distributed, layers, task
from .batch import as_input, batch_len, batch_to, call, model_dtype, token_ids
from .data import SEED, Data, Samples, as_samples
from .errors import UsageError
from .options import FINETUNE_LR, OPTIMIZERS, RECOVER_LR, Recovery
from .progress import QUIET, Bars


def has_batchnorm(model: nn.Module) -> bool:
    return bool(layers.batch_norms(model))


RECALIBRATION_BATCH = 32  # samples per batch of BatchNorm recalibration (never moved by the memory budget)


def recalibrate_bn(model: nn.Module, samples, batch: int | None = None, probe=None,
                   output_key: str | None = None) -> bool:
    """Re-estimate every BatchNorm's running mean and variance on ``samples`` (a :class:`Samples` or a tensor of
    inputs; cumulative average, no momentum). With a ``probe`` batch: when the model's outputs on it were finite
    before and are not after (statistics that overflow float32, as in deep nets with random weights), the
    statistics from before are put back with a warning. Returns whether the new statistics were kept."""
    norms = [m for m in layers.batch_norms(model) if m.track_running_stats]
    if not norms:
        return False
    samples = as_samples(samples)
    if len(samples) < 2:  # a BatchNorm after a global pool sees one value per channel: no variance to estimate
        warnings.warn("BatchNorm recalibration needs at least 2 calibration samples; the statistics from before "
                      "are kept (raise --calib)")
        return False
    checked = probe is not None and _finite(model, probe, output_key)  # only outputs that were finite can be lost
    before = [{k: t.clone() for k, t in m.named_buffers(recurse=False)} for m in norms] if checked else []
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    model.eval()
    stored = {}  # half-precision statistics are gathered in float32 (a computing call only reads copies of them)
    for m in norms:
        for k, t in list(m._buffers.items()):
            if t is not None and t.dtype in (torch.float16, torch.bfloat16):
                stored[(m, k)] = t.dtype
                m._buffers[k] = t.float()
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    # A fixed batch, whatever the memory budget: the running variance averages per-batch variances, so a budget
    # that moved the batch would move the statistics.
    size = max(batch or RECALIBRATION_BATCH, 2)
    while len(samples) % size == 1:  # a last batch of one sample: one value per channel after a global pool
        size += 1
    with torch.no_grad():
        for xb, _, _ in samples.batches(size):
            call(model, batch_to(xb, device, model_dtype(model)))
    for (m, k), dtype in stored.items():
        m._buffers[k] = m._buffers[k].to(dtype)
    for m, momentum in saved:
        m.momentum = momentum
        m.eval()
    model.train(was_training)
    if checked and not _finite(model, probe, output_key):
        with torch.no_grad():
            for m, buffers in zip(norms, before):
                for k, t in buffers.items():
                    getattr(m, k).copy_(t)
        warnings.warn("BatchNorm recalibration made the outputs non-finite (the activations overflow float32); "
                      "the statistics from before it are kept")
        return False
    return True


def _finite(model: nn.Module, probe, output_key: str | None) -> bool:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = call(model, batch_to(probe, device, model_dtype(model)), output_key)
    model.train(was_training)
    return bool(torch.isfinite(out).all())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float = 4.0,
                      alpha: float = 0.5) -> torch.Tensor:
    """``(1−α)·CE(student, y) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` (Hinton et al.)."""
    s, t = student, teacher
    if task.per_pixel(y):  # one distribution per pixel: N × C × H × W → N·H·W × C
        s, t = (v.movedim(1, -1).reshape(-1, v.shape[1]) for v in (student, teacher))
    elif task.per_token(y):  # one distribution per token
        s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="batchmean",
                  log_target=True)
    return (1 - alpha) * task.loss(student, y) + alpha * temperature ** 2 * kl


def finetune(model: nn.Module, data: Data, epochs: int, lr: float = FINETUNE_LR,
             batch_size: int = Recovery.batch_size,
             optimizer: str = Recovery.optimizer, teacher: nn.Module | None = None, device: str = "cpu",
             bars: Bars = QUIET, after_step=None, output_key: str | None = None) -> list[float]:
    """Train ``model`` on the train split for ``epochs`` (shuffled with a fixed seed); returns each epoch's
    mean training loss."""
    if data.train is None:
        raise UsageError("fine-tuning needs --data with a train split")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose sgd or adam")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    sampler = None
    if distributed.active():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data.train, shuffle=True, seed=SEED)
    share = len(sampler) if sampler is not None else len(data.train)  # what this process trains on
    lone = share % batch_size == 1 and share > 1  # a last batch of one breaks BatchNorm in training
    if sampler is not None:
        loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, drop_last=lone)
    else:
        loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=lone,
                            generator=torch.Generator().manual_seed(SEED))
    model.to(device)
    trained = model
    if distributed.active():
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda")
                                          else None)
    if teacher is not None:
        teacher.to(device).eval()
    losses = []
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for xb, yb in bars.track(loader, f"fine-tuning, epoch {epoch + 1}/{epochs}", total=len(loader)):
            xb, yb = as_input(xb, model, device), yb.to(device)
            out = call(trained, xb, output_key)
            if teacher is None:
                loss = task.loss(out, yb)
            else:
                with torch.no_grad():
                    target = call(teacher, xb, output_key)
                loss = distillation_loss(out, target, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            total += loss.item() * batch_len(xb)
            count += batch_len(xb)
        losses.append(distributed.reduce_sum(total) / distributed.reduce_sum(count))
    opt.zero_grad(set_to_none=True)  # the next calibration pass would carry a model's worth of gradients
    model.eval().to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    return losses


def output_divergence(student: torch.Tensor, teacher: torch.Tensor, tokens: bool = False,
                      metric: str | None = None, temperature: float = 1.0) -> torch.Tensor:
    """What label-free recovery minimises, and what the allocation and the choice of blocks measure:
    KL(teacher ‖ student) of the softmax over the classes where the outputs are logits, read by the rule the
    fidelity metric reads them (:func:`prunetool.task.fidelity_metric`: N × C, N × T × V when the inputs are token
    ids (``tokens``), per pixel N × C × H × W; or as ``metric``, ``--fidelity``, names);
    ‖student − teacher‖² / ‖teacher‖² for any other output (a detector's raw head, a regression, an embedding).
    For training, a ``temperature`` T softens both softmaxes (logits / T) and scales the KL by T² (Hinton et al.)."""
    s, t = student.float(), teacher.float()
    if (metric or task.fidelity_metric(t, tokens)) == "output error" or t.dim() < 2 \
            or t.shape[1 if t.dim() == 4 else -1] < 2:  # one class: a softmax over it says nothing
        return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
    if s.dim() == 4:  # per pixel: the classes are dimension 1
        s, t = (v.movedim(1, -1) for v in (s, t))
    s, t = s.reshape(-1, s.shape[-1]) / temperature, t.reshape(-1, t.shape[-1]) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    return temperature ** 2 * kl


def mean_divergence(model: nn.Module, pairs, output_key: str | None = None, metric: str | None = None) -> float:
    """:func:`output_divergence` of ``model``'s outputs from the targets over ``pairs`` of (input batch, target
    outputs), each batch weighted by its size; never below 0 (a divergence is ≥ 0: rounding below it must not count
    as an improvement)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for xb, target in pairs:
            got = call(model, xb, output_key)
            total += float(output_divergence(got, target, token_ids(xb), metric)) * batch_len(xb)
            n += batch_len(xb)
    return max(total / n, 0.0) if n else 0.0


HELD_OUT = 0.1  # of the recovery inputs, never trained on: the recovered weights are kept only if they do better there
MIN_HELD_OUT = 16
RECOVER_TEMPERATURE = 4.0  # trained at T=4, checked at T=1; at 60 s, T=4 against T=1 (Fashion-MNIST test accuracy):
# ResNet-20 2x fewer MACs 92.67 vs 92.42, 3x 91.78 vs 91.68, the MobileNetV2-style net 2x 92.00 vs 91.96, 3x
# 91.15 vs 91.06
MAX_CHECKED = 512  # samples each divergence is measured on (held out, and of the training part): outside the budget


def _split(samples: Samples, held: int) -> tuple[Samples, Samples]:
    """The samples without their last ``held``, and those."""
    n = len(samples) - held
    if samples.x is not None:
        rows = samples.rows if samples.rows is not None else torch.arange(len(samples))
        return (Samples(samples.x, samples.y, rows=rows[:n], ids=samples.ids[:n]),
                Samples(samples.x, samples.y, rows=rows[n:], ids=samples.ids[n:]))
    return (Samples(dataset=samples.dataset, indices=samples.indices[:n], workers=samples.workers, ids=samples.ids[:n]),
            Samples(dataset=samples.dataset, indices=samples.indices[n:], workers=samples.workers, ids=samples.ids[n:]))


def mixed(xb, gen: torch.Generator):
    """Each input of the batch mixed with another of it, λ·x + (1−λ)·x[π] with λ ~ U(0, 1) per sample (mixup): a
    batch of floating-point inputs (a tensor, or a dict of them; mixed with the same λ and π) becomes new inputs
    between the ones it has. Token ids, masks and batches of one are returned as they are."""
    values = list(xb.values()) if isinstance(xb, dict) else [xb]
    n = batch_len(xb)
    if n < 2 or not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values):
        return xb
    lam = torch.rand(n, generator=gen)
    pair = torch.randperm(n, generator=gen)

    def mix(v: torch.Tensor) -> torch.Tensor:
        w = lam.to(v.device, v.dtype).view(-1, *[1] * (v.dim() - 1))  # N → N × 1 × … to broadcast over a sample
        return w * v + (1 - w) * v[pair.to(v.device)]

    return {k: mix(v) for k, v in xb.items()} if isinstance(xb, dict) else mix(xb)


def distill(model: nn.Module, teacher: nn.Module, samples: Samples, seconds: float, lr: float = RECOVER_LR,
            batch_size: int = 32, device: str = "cpu", bars: Bars = QUIET, output_key: str | None = None,
            metric: str | None = None, mixup: bool = True) -> dict:
    """Label-free recovery: train ``model`` towards ``teacher``'s outputs on the inputs of ``samples`` (no labels
    read) with Adam for ``seconds`` of wall time, by :func:`output_divergence` (``metric``: as it). Each pass visits
    the training samples in a new order, and with ``mixup`` trains on mixtures of pairs of them (:func:`mixed`;
    the teacher labels each mixture: fitting the teacher between the inputs, not only at the few it is given, is what
    keeps a small set from being overfitted). Both stay in eval mode: BatchNorm statistics and dropout are frozen,
    so the inputs are fitted as the deployed model computes them. The last :data:`HELD_OUT` of the samples are never
    trained on (with fewer than 64 samples, the check reads the training samples): after every pass the divergence
    there is measured, and the weights of the best pass are kept when it fell below the start; else the model is
    put back as it was (Adam moves even a model equal to its teacher, on rounding noise). Returns the steps, passes
    begun over the training samples, the pass kept, the divergence on both parts before and after, and whether
    recovered weights were kept."""
    samples = as_samples(samples)
    held = min(MAX_CHECKED, max(MIN_HELD_OUT, round(HELD_OUT * len(samples)))) if len(samples) >= 4 * MIN_HELD_OUT \
        else 0
    # too few to hold any out: checked on the training samples themselves (an uncut model still comes back whole)
    train, check = _split(samples, held) if held else (samples, samples)
    params = [p for p in model.parameters() if p.requires_grad and p.dtype.is_floating_point]
    opt = torch.optim.Adam(params, lr=lr)
    model.to(device).eval()
    teacher.to(device).eval()
    dtype = model_dtype(model)
    gen = torch.Generator().manual_seed(SEED)

    def pairs(part: Samples, mix: bool = False):  # (inputs, the teacher's outputs), batch by batch
        for xb, _, _ in part.batches(batch_size):
            xb = batch_to(xb, device, dtype)
            if mix:
                xb = mixed(xb, gen)
            with torch.no_grad():
                target = call(teacher, xb, output_key)
            yield xb, target  # outside no_grad: a generator suspended within it would leave grads off for its caller

    seen = _split(train, len(train) - MAX_CHECKED)[0] if len(train) > MAX_CHECKED else train  # the training side

    def divergence(part: Samples) -> float:
        return mean_divergence(model, pairs(part), output_key, metric)

    best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # the start, then the best pass
    steps, passes, best_pass, done = 0, 0, 0, False
    try:
        before, before_held = divergence(seen), divergence(check)
        best_held = before_held
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            passes += 1
            for xb, target in bars.track(pairs(train.shuffled(gen), mixup),
                                         f"label-free recovery, pass {passes} ({seconds:g} s in all)",
                                         total=math.ceil(len(train) / batch_size)):
                loss = output_divergence(call(model, xb, output_key), target, token_ids(xb), metric,
                                         RECOVER_TEMPERATURE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if time.perf_counter() - start >= seconds:
                    break
            held_now = divergence(check)
            if held_now < best_held:
                best_held, best_pass = held_now, passes
                for k, v in model.state_dict().items():  # into the copy there is: one copy held, never two
                    best[k].copy_(v.detach())
        opt.zero_grad(set_to_none=True)
        if best_pass != passes:
            model.load_state_dict(best)
        after = divergence(seen)
        done = True
    finally:  # an error (out of memory) leaves neither model on the device nor half-trained
        if not done:
            model.load_state_dict(best)
        model.cpu()
        teacher.cpu()
    return {"seconds": seconds, "steps": steps, "passes": passes, "samples": len(train), "held_out": held,
            "mixup": mixup, "pass_kept": best_pass,
            "divergence_before": round(before, 6), "divergence_after": round(after, 6),
            "held_out_before": round(before_held, 6), "held_out_after": round(best_held, 6), "kept": best_pass > 0}
