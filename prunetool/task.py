"""What a model's outputs and labels mean: the logits, the loss that scores differentiate, the metric reported.

**Outputs → logits** (every stage reads a model's output through :func:`logits`): a tensor is the logits; a
mapping (a Hugging Face ``ModelOutput``, a dict) gives its ``"logits"`` entry, else its first tensor; a tuple or
list gives its first element; the rule is applied again to what it gives. ``output_key`` (``--output-key``)
names the entry (or, as a number, the position) to take instead.

**Labels → task**: one class index per sample (``N``) is classification: cross-entropy, metric top-1 accuracy.
One target per token (``N × T``, :data:`IGNORE` where there is none) is a token task, such as a language model's
next tokens (:func:`next_tokens`): cross-entropy per token, metric perplexity (``exp`` of the mean token loss).

**Drop** (:func:`drop`): accuracy in percentage points (before − after), perplexity in percent of the dense
perplexity (after / before − 1): both positive when the model got worse.
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
    return y.dim() >= 2


def metric_of(y: torch.Tensor | None) -> str:
    return "perplexity" if y is not None and per_token(y) else "accuracy"


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
    """The model's own predictions as labels (structure-only runs): per sample, or per token."""
    return out.argmax(-1)


@dataclass
class Tally:
    """Correct predictions, labelled items (samples or tokens) and summed loss, batch by batch."""

    correct: float = 0.0
    count: float = 0.0
    loss_sum: float = 0.0
    metric: str = "accuracy"

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        self.metric = metric_of(y)
        valid = y != IGNORE
        out = out.float()
        self.loss_sum += float(loss(out, y, "sum"))
        self.correct += float(((out.argmax(-1) == y) & valid).sum())
        self.count += float(valid.sum())

    def result(self) -> "Quality":
        if not self.count:
            return Quality(self.metric, None, None)
        return Quality(self.metric, 100.0 * self.correct / self.count, self.loss_sum / self.count)


@dataclass
class Quality:
    """How good a model is on some data: the metric's name, top-1 accuracy (of samples or tokens) and mean loss."""

    metric: str
    accuracy: float | None
    loss: float | None

    @property
    def perplexity(self) -> float | None:
        if self.loss is None:
            return None
        if not math.isfinite(self.loss):  # a NaN loss is no perplexity at all: infinitely bad, never within budget
            return math.inf
        return math.exp(min(self.loss, 700.0))

    @property
    def value(self) -> float | None:
        return self.perplexity if self.metric == "perplexity" else self.accuracy


def drop(metric: str, before: float | None, after: float | None) -> float | None:
    """How much worse ``after`` is than ``before``: percentage points of accuracy, or percent of perplexity."""
    if before is None or after is None:
        return None
    if metric == "perplexity":
        return 100.0 * (after / before - 1.0)
    return before - after


def drop_unit(metric: str) -> str:
    return "%" if metric == "perplexity" else "pp"
