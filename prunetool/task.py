"""What a model's outputs and labels mean: the logits, the loss that scores differentiate, the metric reported.

**Outputs → logits** (every stage reads a model's output through :func:`logits`): a tensor is the logits; a
mapping (a Hugging Face ``ModelOutput``, a dict) gives its ``"logits"`` entry, else its first tensor; a tuple or
list gives its first element; the rule is applied again to what it gives. ``output_key`` (``--output-key``)
names the entry (or, as a number, the position) to take instead.

**Labels → task**: one class index per sample (``N``) is classification: cross-entropy, metric top-1 accuracy.
One target per token (``N × T``, :data:`IGNORE` where there is none) is a token task, such as a language model's
next tokens (:func:`next_tokens`): cross-entropy per token, metric perplexity (``exp`` of the mean token loss).

One label per pixel (``N × H × W`` against ``N × C × H × W`` logits) is segmentation: cross-entropy per pixel,
metric mean IoU over the classes present (pixel accuracy beside it).

**Without labels** (:class:`Fidelity`), the cut model is measured against the dense one on the same inputs, by
what its output is: ``N × C`` (read as class logits) and per-token logits by top-1 *agreement*, ``N × C × H × W``
(read as segmentation logits) by the *mean IoU* of the two argmax maps over C, anything else (a detector's raw
head outputs, a single regression output) by the *output error* ``‖after − before‖ / ‖before‖``; cosine
similarity and output error are kept beside. The shape cannot tell an embedding or a feature map from logits:
``--fidelity`` names the metric then.

**Drop** (:func:`drop`): accuracy, agreement and mean IoU in percentage points (before − after), perplexity in
percent of the dense perplexity (after / before − 1), output error in percent: positive when the model got worse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # a token without a target (the last one, padding): Hugging Face's convention


def logits(out, key: str | int | None = None) -> torch.Tensor:
    """The logits in a model's output (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if key is not None:
        try:
            if isinstance(out, Mapping):
                picked = out[key]
            else:
                picked = out[int(key)]
        except (KeyError, IndexError, ValueError, TypeError):
            have = list(out.keys()) if isinstance(out, Mapping) else f"{len(out)} entries"
            raise OutputError(f"the model's output has no entry {key!r} (it has {have}); fix --output-key") \
                from None
        return logits(picked)
    if isinstance(out, Mapping):
        if out.get("logits") is not None:
            return logits(out["logits"])
        for value in out.values():
            if _has_tensor(value):
                return logits(value)
    elif isinstance(out, (tuple, list)) and out:
        return logits(out[0])
    raise OutputError(f"the model returns {type(out).__name__} with no tensor to read as logits; give "
                      "--output-key or return logits")


class OutputError(ValueError):
    """A model output the logits rule cannot read."""


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return bool(value) and _has_tensor(value[0])
    return False


def per_token(y: torch.Tensor) -> bool:
    return y.dim() == 2


def per_pixel(y: torch.Tensor) -> bool:
    return y.dim() >= 3


def metric_of(y: torch.Tensor | None) -> str:
    if y is None:
        return "accuracy"
    return "perplexity" if per_token(y) else "miou" if per_pixel(y) else "accuracy"


def next_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A causal language model's targets: at each position the next token (:data:`IGNORE` at the last position
    and wherever the next token is padding)."""
    y = torch.full_like(input_ids, IGNORE)
    y[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        y[:, :-1][attention_mask[:, 1:] == 0] = IGNORE
    return y.long()


def loss(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits ``out`` against labels ``y``: ``"mean"`` (over labelled samples or tokens),
    ``"sum"``, or ``"none"`` (one value per sample, its tokens' losses summed)."""
    if per_pixel(y):  # N × C × H × W against N × H × W
        each = F.cross_entropy(out, y, ignore_index=IGNORE, reduction="none")
        if reduction == "none":
            return each.reshape(len(y), -1).sum(1)
        return each.sum() if reduction == "sum" else each.sum() / (y != IGNORE).sum().clamp_min(1)
    if not per_token(y):
        return F.cross_entropy(out, y, reduction=reduction)
    each = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                           reduction="none").reshape(y.shape)
    if reduction == "none":
        return each.reshape(len(y), -1).sum(1)
    if reduction == "sum":
        return each.sum()
    return each.sum() / (y != IGNORE).sum().clamp_min(1)


def labels_from(out: torch.Tensor) -> torch.Tensor:
    """The model's own predictions as labels (structure-only runs): per sample, per token, or per pixel of an
    N × C × H × W output."""
    return out.argmax(1) if out.dim() == 4 else out.argmax(-1)


def _confusion(pred: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """classes × classes counts of (label, prediction) over the labelled entries."""
    valid = y != IGNORE
    pairs = y[valid].long() * classes + pred[valid].long()
    return torch.bincount(pairs.cpu(), minlength=classes * classes).reshape(classes, classes).double()


def mean_iou(confusion: torch.Tensor) -> float | None:
    """Mean intersection over union, in percent, over the classes that occur in labels or predictions."""
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float(100.0 * (inter[present] / union[present]).mean()) if present.any() else None


@dataclass
class Tally:
    """Correct predictions, labelled items (samples or tokens) and summed loss, batch by batch."""

    correct: float = 0.0
    count: float = 0.0
    loss_sum: float = 0.0
    metric: str = "accuracy"
    confusion: torch.Tensor | None = None  # segmentation: label × prediction counts

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        self.metric = metric_of(y)
        valid = y != IGNORE
        out = out.float()
        self.loss_sum += float(loss(out, y, "sum"))
        pred = out.argmax(1 if per_pixel(y) else -1)
        self.correct += float(((pred == y) & valid).sum())
        self.count += float(valid.sum())
        if per_pixel(y):
            c = _confusion(pred, y, out.shape[1])
            self.confusion = c if self.confusion is None else self.confusion + c

    def result(self) -> "Quality":
        if not self.count:
            return Quality(self.metric, None, None)
        miou = mean_iou(self.confusion) if self.confusion is not None else None
        return Quality(self.metric, 100.0 * self.correct / self.count, self.loss_sum / self.count, miou)


@dataclass
class Quality:
    """How good a model is on some data: the metric's name, top-1 accuracy (of samples or tokens) and mean loss."""

    metric: str
    accuracy: float | None
    loss: float | None
    miou: float | None = None

    @property
    def perplexity(self) -> float | None:
        if self.loss is None:
            return None
        if not math.isfinite(self.loss):  # a NaN loss is no perplexity at all: infinitely bad, never within budget
            return math.inf
        return math.exp(min(self.loss, 700.0))

    @property
    def value(self) -> float | None:
        return self.perplexity if self.metric == "perplexity" else self.miou if self.metric == "miou" else \
            self.accuracy


def drop(metric: str, before: float | None, after: float | None) -> float | None:
    """How much worse ``after`` is than ``before``: percentage points of accuracy, or percent of perplexity."""
    if before is None or after is None:
        return None
    if metric == "perplexity":
        return 100.0 * (after / before - 1.0)
    if metric == "output error":
        return after - before
    return before - after


def drop_unit(metric: str) -> str:
    return "%" if metric in ("perplexity", "output error") else "pp"


def fidelity_metric(out: torch.Tensor, tokens: bool = False) -> str:
    """The metric that compares a cut model's output with the dense model's (see the module docstring);
    ``tokens``: the inputs are token ids (an N × T × V output is then per-token logits)."""
    if out.dim() == 4 and out.shape[1] > 1:
        return "miou"
    if out.dim() == 2 and out.shape[1] > 1 or tokens and out.dim() == 3:
        return "agreement"
    return "output error"


@dataclass
class Fidelity:
    """A cut model's outputs against the dense model's on the same inputs, batch by batch (no labels needed)."""

    metric: str | None = None
    tokens: bool = False
    agree: float = 0.0
    count: float = 0.0
    error_sq: float = 0.0
    reference_sq: float = 0.0
    dot: float = 0.0
    other_sq: float = 0.0
    confusion: torch.Tensor | None = None

    def add(self, dense: torch.Tensor, small: torch.Tensor) -> None:
        dense, small = dense.double(), small.double()
        self.metric = self.metric or fidelity_metric(dense, self.tokens)
        self.error_sq += float((small - dense).pow(2).sum())
        self.reference_sq += float(dense.pow(2).sum())
        self.dot += float((small * dense).sum())
        self.other_sq += float(small.pow(2).sum())
        if self.metric in ("miou", "agreement"):
            cdim = 1 if dense.dim() == 4 else -1  # the classes: per pixel of N × C × H × W, else the last dim
            ref, pred = dense.argmax(cdim), small.argmax(cdim)
            if self.metric == "miou":
                c = _confusion(pred, ref, dense.shape[cdim])
                self.confusion = c if self.confusion is None else self.confusion + c
            self.agree += float((ref == pred).sum())
            self.count += ref.numel()

    def result(self) -> dict:
        error = 100.0 * math.sqrt(self.error_sq / self.reference_sq) if self.reference_sq else None
        cosine = self.dot / math.sqrt(self.reference_sq * self.other_sq) if self.reference_sq and self.other_sq \
            else None
        value = {"miou": mean_iou(self.confusion) if self.confusion is not None else None,
                 "agreement": 100.0 * self.agree / self.count if self.count else None,
                 "output error": error}[self.metric or "output error"]
        out = {"metric": self.metric or "output error", "value": value, "cosine": cosine, "output_error": error}
        if self.count:
            out["agreement"] = 100.0 * self.agree / self.count
        return out

    def perfect(self) -> float:
        """What the dense model scores against itself."""
        return 0.0 if self.metric == "output error" else 100.0
