"""Data specs: torchvision datasets on disk, ImageFolder trees, .npz arrays, token data, or no data at all; and the
samples drawn from them.

Calibration takes ``calib`` train samples chosen with a fixed seed, as :class:`Samples`: held in memory when the
data already is (arrays, MNIST, tokens), read from disk in batches when it is an image folder (never all at once).
Evaluation uses the test split. Image folders are preprocessed as the model was trained: ``--resize``,
``--crop``, ``--mean``, ``--std``, or a named preset (``imagenet``).

Token models read a :class:`TokenDataset`: an ``.npz`` with ``input_ids`` (N×T integers), optional
``attention_mask`` (N×T, 1 = a real token) and ``labels`` (N: classification; N×T: per token), or a text file
tokenised with the model's tokenizer into sequences of ``--seq-len`` tokens. Without labels the targets are the
next tokens (a language model: metric perplexity). An ``.npz`` may give ``_train``/``_test`` splits
(``input_ids_train`` ...); with one split, or for a text file, the last tenth of the sequences is the test split.
``--tokens T`` is the structure-only run for a token model: random ids below the vocabulary size.

A model whose forward takes several inputs reads a :class:`NamedDataset`: an ``.npz`` with one array per forward
parameter and split (``image_train``, ``meta_train``, ``image_test``, ``meta_test``) and labels ``y_train``,
``y_test`` (``labels_train``, ``labels_test`` when a parameter is called ``y``), passed by keyword.
:func:`fit_inputs` checks any data against the model's forward before any work and names the inputs as the
forward takes them (token ids go to its first parameter when it has none called ``input_ids``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from . import distributed, layers, task
from .errors import UsageError
from .options import DEFAULT_SEQ_LEN, DataOptions
from .batch import Batch, Forward, as_input, batch_len, batch_slice, call, forward_of

SEED = 0
# --calib below FEW leaves the MRS means and the least-squares refits (a Linear layer's: one row per sample; a token
# model's: one per token) too noisy, and a warning says so; from GOOD on, results settle. Measured at ratio 0.6
# (accuracy, dense 99.0% / 98.2%): evci_cnn 11% at --calib 1, 51% at 4, 77% at 8, 89% at 16, 87-92% at 32-128,
# 96.5% at 256, 98.1% at 1000; lenet_300_100 78% at 8, 94.6% at 32, 97.3% at 256, 97.6% at 1000. kjv_llama at
# ratio 0.3 (perplexity +%, sequences of 128 tokens): +119% at 4, +22% at 16, +12.7% at 64, +11.4% at 512.
FEW_CALIB, GOOD_CALIB = 32, 256  # samples
FEW_CALIB_TOKENS, GOOD_CALIB_TOKENS = 4096, 8192  # tokens
PRESETS = {"imagenet": {"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}}

def as_samples(x, y: torch.Tensor | None = None) -> "Samples":
    """A :class:`Samples` as it is, or one holding a tensor (or dict) of inputs and its labels."""
    return x if isinstance(x, Samples) else Samples(x, y)


class Samples:
    """Samples in memory (``x``: a tensor or a dict of tensors; ``y``: labels or None) or read from ``dataset``
    at ``indices`` batch by batch (``workers`` loader processes). ``ids`` are the samples' global numbers (they
    seed per-sample choices, such as sampled positions, identically in every pass and under torchrun)."""

    def __init__(self, x: Batch | None = None, y: torch.Tensor | None = None, dataset: Dataset | None = None,
                 indices: list[int] | None = None, workers: int = 0, ids: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        self.x, self.y, self.dataset, self.indices, self.workers = x, y, dataset, indices, workers
        self.rows = rows  # in memory: which rows of x (and y) are the samples, without copying them
        n = len(rows) if rows is not None else batch_len(x) if x is not None else len(indices)
        self.ids = torch.arange(n) if ids is None else ids

    def _rows(self, start: int, stop: int) -> tuple[Batch, torch.Tensor | None]:
        if self.rows is None:
            return batch_slice(self.x, start, stop), (self.y[start:stop] if self.y is not None else None)
        r = self.rows[start:stop]
        x = self.x[r] if isinstance(self.x, torch.Tensor) else {k: v[r] for k, v in self.x.items()}
        return x, (self.y[r] if self.y is not None else None)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        return self.y is not None or self.dataset is not None

    def batches(self, size: int) -> Iterator[tuple[Batch, torch.Tensor | None, torch.Tensor]]:
        """(inputs, labels, ids) in order, ``size`` at a time."""
        size = max(1, int(size))
        if self.x is not None:
            for start in range(0, len(self), size):
                stop = min(start + size, len(self))
                x, y = self._rows(start, stop)
                yield x, y, self.ids[start:stop]
            return
        loader = DataLoader(Subset(self.dataset, self.indices), batch_size=size, shuffle=False,
                            num_workers=self.workers)
        start = 0
        for xb, yb in loader:
            n = batch_len(xb)
            yield xb, torch.as_tensor(yb).long(), self.ids[start:start + n]
            start += n

    def _at(self, positions: torch.Tensor) -> "Samples":
        """The samples at ``positions``, in that order (each keeps its id; nothing copied in memory)."""
        if self.x is not None:
            rows = torch.arange(len(self)) if self.rows is None else self.rows
            return Samples(self.x, self.y, ids=self.ids[positions], rows=rows[positions])
        return Samples(dataset=self.dataset, indices=[self.indices[i] for i in positions.tolist()],
                       workers=self.workers, ids=self.ids[positions])

    def shuffled(self, gen: torch.Generator) -> "Samples":
        """The same samples in an order drawn from ``gen`` (each keeps its id)."""
        return self._at(torch.randperm(len(self), generator=gen))

    def without(self, start: int, stop: int) -> "Samples":
        """These samples but those at positions ``start`` to ``stop`` (each keeps its id)."""
        return self._at(torch.cat([torch.arange(0, start), torch.arange(stop, len(self))]))

    def take(self, n: int) -> tuple[Batch, torch.Tensor | None]:
        """The first ``n`` samples, in memory."""
        n = min(n, len(self))
        if self.x is not None:
            return self._rows(0, n)
        xs, ys = [], []
        for xb, yb, _ in self.batches(n):
            xs.append(xb)
            ys.append(yb)
            break
        return xs[0], ys[0]

    def all(self) -> tuple[Batch, torch.Tensor | None]:
        """Every sample, in memory."""
        return self.take(len(self))

    def shard(self) -> "Samples":
        """This process's share under torchrun: every ``world``-th sample, starting at its rank."""
        if not distributed.active():
            return self
        return self._at(torch.arange(distributed.rank(), len(self), distributed.world()))


@dataclass
class Data:
    """Train and test splits; ``None`` splits mean a structure-only run."""

    train: Dataset | None
    test: Dataset | None
    spec: str = "none"

    @property
    def has_labels(self) -> bool:
        return self.train is not None


def _to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float()
    if t.dim() == 3:  # N×H×W grey images
        t = t.unsqueeze(1)
    return t


def _npz(path: Path) -> Data:
    try:
        arrays = np.load(path, allow_pickle=False)
        files = set(arrays.files)
    except Exception as e:
        raise UsageError(f"cannot read {path} as .npz ({str(e).splitlines()[0][:120]}); save it with numpy.savez") \
            from None
    if "input_ids" in files or "input_ids_train" in files:
        return _token_npz(path, arrays, files)
    if {k[:-len("_train")] for k in files if k.endswith("_train")} - {"x", "y"}:
        return _named_npz(path, arrays, list(arrays.files))
    need = {"x_train", "y_train", "x_test", "y_test"}
    missing = need - files
    if missing:
        raise UsageError(f"{path} lacks arrays {', '.join(sorted(missing))}; it needs x_train, y_train, x_test, y_test "
                         "(images) or input_ids (tokens)")
    split = {}
    for name in ("train", "test"):
        try:
            raw_x, raw_y = np.asarray(arrays[f"x_{name}"]), np.asarray(arrays[f"y_{name}"])
        except Exception as e:  # object arrays need pickle, which is refused
            raise UsageError(f"{path}: cannot read x_{name}/y_{name} ({str(e).splitlines()[0][:100]}); save plain "
                             "numeric arrays") from None
        _check_images(raw_x, f"{path}: x_{name}")
        _check_labels(raw_y, f"{path}: y_{name}")
        x, y = _to_float(raw_x), torch.as_tensor(raw_y).long()
        if len(x) != len(y):
            raise UsageError(f"{path}: x_{name} has {len(x)} samples but y_{name} has {len(y)}; give one label per "
                             "sample")
        if len(x) == 0:
            raise UsageError(f"{path}: x_{name} has no samples; the {name} split needs at least one")
        split[name] = TensorDataset(x, y)
    return Data(split["train"], split["test"], str(path))


def _named_npz(path: Path, arrays, files: list[str]) -> Data:
    """One input per ``NAME_train``/``NAME_test`` pair, in the file's order; labels in ``labels_*``, else ``y_*``."""
    label = "labels" if "labels_train" in files else "y"
    names = [k[:-len("_train")] for k in files if k.endswith("_train") and k != f"{label}_train"]
    split = {}
    for name in ("train", "test"):
        lacking = [f"{k}_{name}" for k in [*names, label] if f"{k}_{name}" not in files]
        if lacking:
            raise UsageError(f"{path} lacks {', '.join(lacking)}; named inputs need every array in both splits "
                             f"({', '.join(f'{k}_train' for k in names)}, ..., {label}_train, {label}_test; "
                             "see README, Data)")
        try:
            raw = {k: np.asarray(arrays[f"{k}_{name}"]) for k in names}
            raw_y = np.asarray(arrays[f"{label}_{name}"])
        except Exception as e:  # object arrays need pickle, which is refused
            raise UsageError(f"{path}: cannot read its {name} arrays ({str(e).splitlines()[0][:100]}); save plain "
                             "numeric arrays") from None
        _check_labels(raw_y, f"{path}: {label}_{name}")
        if len(raw_y) == 0:
            raise UsageError(f"{path}: {label}_{name} has no samples; the {name} split needs at least one")
        for k, a in raw.items():
            _check_named(a, f"{path}: {k}_{name}")
            if len(a) != len(raw_y):
                raise UsageError(f"{path}: {k}_{name} has {len(a)} samples but {label}_{name} has {len(raw_y)}; "
                                 "give one label per sample")
        split[name] = NamedDataset({k: _named_input(a) for k, a in raw.items()}, torch.as_tensor(raw_y).long())
    return Data(split["train"], split["test"], str(path))


def _check_named(a: np.ndarray, what: str) -> None:
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise UsageError(f"{what} holds {a.dtype} values, not numbers; save a numeric array")
    if a.ndim < 1:
        raise UsageError(f"{what} is a single value; save one row per sample (N×…)")
    if np.issubdtype(a.dtype, np.floating) and a.size and not np.isfinite(a).all():
        raise UsageError(f"{what} holds NaN or infinite values; clean the data")


def _named_input(a: np.ndarray) -> torch.Tensor:
    """A named array as the model is given it: uint8 scaled to [0, 1], other integers as int64 (ids, indices),
    floats as float32, booleans as they are; shapes unchanged."""
    t = torch.as_tensor(a)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype.is_floating_point:
        return t.float()
    return t if t.dtype == torch.bool else t.long()


def _check_images(x: np.ndarray, what: str) -> None:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UsageError(f"{what} holds {x.dtype} values, not numbers; save images as uint8 or float arrays")
    if x.ndim < 2:
        raise UsageError(f"{what} has shape {x.shape}; save it as N×C×H×W (or N×H×W, N×features)")
    if np.issubdtype(x.dtype, np.floating) and x.size:
        if not np.isfinite(x).all():
            raise UsageError(f"{what} holds NaN or infinite values; clean the data")
        if x.min() >= 0 and x.max() > 2.0 and float(x.max()) <= 255.0 and (x == np.round(x)).mean() > 0.99:
            raise UsageError(f"{what} holds float pixels in 0..255; prunetool feeds floats as they are: save uint8 "
                             "images (scaled to [0, 1] on loading) or divide by 255")


MASK_IGNORE = 255  # an unlabelled pixel in a segmentation mask (as in Pascal VOC), read as task.IGNORE


def _check_labels(y: np.ndarray, what: str) -> None:
    if y.ndim not in (1, 3):
        hint = " (one-hot?)" if y.ndim == 2 else ""
        raise UsageError(f"{what} has shape {y.shape}{hint}; give one class index per sample, e.g. y.argmax(1), or "
                         "one per pixel (N×H×W segmentation masks)")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise UsageError(f"{what} holds {y.dtype} values that are not class indices; give integer labels")
    if y.size and y.min() < 0 and not (y.ndim == 3 and set(np.unique(y[y < 0]).tolist()) <= {task.IGNORE}):
        raise UsageError(f"{what} has negative labels (e.g. {int(y.min())}); labels are class indices 0 … classes-1"
                         + (f" ({task.IGNORE} or {MASK_IGNORE} for an unlabelled pixel)" if y.ndim == 3 else ""))


def check_labels(data: Data, output_shape: tuple[int, ...]) -> None:
    """Labels must name one of the model's classes (the last dimension of its output per sample, or the first for
    segmentation masks against C × H × W logits, whose H × W they must have), checked before any work."""
    outputs = output_shape[-1]
    for name, ds in (("train", data.train), ("test", data.test)):
        y = ds.tensors[1] if isinstance(ds, TensorDataset) else ds.labels if isinstance(ds, NamedDataset) else None
        if y is not None and task.per_pixel(y):
            if len(output_shape) != 3 or tuple(output_shape[-2:]) != tuple(y.shape[-2:]):
                raise UsageError(f"{data.spec}: {name} masks are {tuple(y.shape[-2:])} per sample but the model "
                                 f"outputs {tuple(output_shape)} per sample; masks need C × H × W logits of their "
                                 "size")
            outputs = output_shape[0]
            if outputs <= MASK_IGNORE:  # 255 marks an unlabelled pixel unless it can be a class
                y.masked_fill_(y == MASK_IGNORE, task.IGNORE)
        if y is not None:
            if len(y) and int(y.max()) >= outputs:
                raise UsageError(f"{data.spec}: {name} labels go up to {int(y.max())} but the model has {outputs} "
                                 "outputs; check the data or --arch-kwargs (num_classes)")
        classes = getattr(ds, "classes", None)
        if classes is not None and len(classes) > outputs:
            raise UsageError(f"{data.spec}: {name} has {len(classes)} classes but the model has {outputs} outputs; "
                             "check the data or --arch-kwargs (num_classes)")


def fit_inputs(data: Data, model: torch.nn.Module) -> Data:
    """``data`` checked against ``model``'s forward before any work, its inputs named as the forward takes them
    (in place: the splits become renamed views; the datasets themselves are not changed). Token ids must index
    the vocabulary of a model that embeds tokens; one tensor needs a forward with at most one input without a
    default; named inputs need a forward parameter each, and every parameter without a default an input (token
    ids go to the first parameter when none is called ``input_ids``; an attention mask the forward does not take
    is left out); float inputs must not reach an embedding. Raises :class:`UsageError` naming the cause."""
    first = data.train if data.train is not None else data.test
    if first is None:
        return data
    if isinstance(first, TokenDataset):
        _check_vocabulary(data, model)
        shift = decoder_inputs(model)
        if shift is not None:
            data.train, data.test = (_teacher_forced(ds, shift) if isinstance(ds, TokenDataset) else ds
                                     for ds in (data.train, data.test))
            _check_vocabulary(data, model, "decoder_input_ids")
        first = data.train if data.train is not None else data.test
        _check_targets(data, shift is not None)
    forward, x = forward_of(model), _first_inputs(first)
    if forward is not None and isinstance(first, NamedDataset):
        ids = first.ids_key if isinstance(first, TokenDataset) else None
        names = keyword_names(list(first.inputs), forward, data.spec, ids)
        if any(k != v for k, v in names.items()):
            data.train, data.test = (ds.renamed(names) if ds is not None else None for ds in (data.train, data.test))
    elif forward is not None and isinstance(x, dict):  # a caller's dataset of keyword inputs: checked as it is
        keyword_names(list(x), forward, data.spec)
    elif forward is not None and not one_input_fits(forward):
        npz = data.spec.endswith(".npz")
        raise UsageError(f"the model's forward takes {forward.shown()} but {data.spec} gives one input per sample"
                         f"{' (x_train/x_test)' if npz else ''}: save {'' if npz else 'an .npz with '}one array per "
                         f"parameter, {_named_arrays(forward)}")
    if vocabulary(model) is not None:
        embedding = _float_reaches_embedding(model, x)
        if embedding is not None:
            raise UsageError(f"{data.spec} holds float inputs but the model's embedding {embedding} takes token "
                             "ids: give token data, an .npz with input_ids (see README, Token models)")
    return data


def decoder_inputs(model: torch.nn.Module):
    """For an encoder–decoder whose forward takes ``decoder_input_ids`` (Hugging Face's T5, BART, Marian): the
    function making them from target ids by teacher forcing (the targets shifted right behind the decoder's start
    token, ignored positions as padding); None for any other model."""
    config = getattr(model, "config", None)
    forward = forward_of(model)
    if not getattr(config, "is_encoder_decoder", False) or forward is None or \
            "decoder_input_ids" not in forward.names:
        return None
    pad = getattr(config, "pad_token_id", None) or 0
    start = getattr(config, "decoder_start_token_id", None)
    start = pad if start is None else start

    def shift(targets: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(targets, pad)
        out[:, 1:] = targets[:, :-1]  # N×T: position t reads target t−1
        out[:, 0] = start
        return out.masked_fill(out == task.IGNORE, pad)
    return shift


def _teacher_forced(ds: "TokenDataset", shift) -> "TokenDataset":
    """Sequence-to-sequence samples: the decoder reads the targets shifted right and predicts each target (the
    ``labels`` given per token, else the input ids: the decoder reproduces its input). Class labels are left as
    they are (a sequence classifier derives its own decoder inputs)."""
    if ds.targets_given and ds.labels.dim() == 1 or "decoder_input_ids" in ds.inputs:
        return ds
    mask = ds.inputs.get("attention_mask")
    targets = ds.labels if ds.targets_given else \
        ds.ids if mask is None else ds.ids.masked_fill(mask == 0, task.IGNORE)  # padding is no target
    out = copy.copy(ds)
    out.inputs, out.labels = {**ds.inputs, "decoder_input_ids": shift(targets)}, targets
    return out


def _check_targets(data: Data, seq2seq: bool) -> None:
    """Per-token labels have one target per input token, except a sequence-to-sequence model's."""
    for name, ds in (("train", data.train), ("test", data.test)):
        if isinstance(ds, TokenDataset) and ds.targets_given and ds.labels.dim() == 2 and not seq2seq and \
                ds.labels.shape != ds.ids.shape:
            raise UsageError(f"{data.spec}: {name} labels have shape {tuple(ds.labels.shape)} but input_ids "
                             f"{tuple(ds.ids.shape)}; per-token labels need one per token (targets of another "
                             "length are for an encoder–decoder)")


def _check_vocabulary(data: Data, model: torch.nn.Module, key: str = "input_ids") -> None:
    """Token ids (``key``: the input ids, or the decoder's, made from the labels) must index the model's
    vocabulary, and only a model that embeds tokens takes them."""
    vocab = vocabulary(model)
    if vocab is None:
        raise UsageError(f"{data.spec} holds token ids but the model embeds no tokens; give image data or an "
                         "input shape")
    for name, ds in (("train", data.train), ("test", data.test)):
        if isinstance(ds, TokenDataset):
            ids = ds.ids if key == "input_ids" else ds.inputs.get(key)
            top = int(ids.max()) if ids is not None and ids.numel() else -1
            if top >= vocab:
                what = "input_ids" if key == "input_ids" else "labels"
                raise UsageError(f"{data.spec}: {name} {what} go up to {top} but the model's vocabulary has "
                                 f"{vocab} tokens; tokenise with the model's own tokenizer")


def one_input_fits(forward: Forward) -> bool:
    """Whether ``model(x)`` can call this forward: one positional parameter (or ``*args``) and no other without a
    default."""
    first = forward.positional[:1]
    return bool(first or forward.var_args) and all(p in first for p in forward.required)


def keyword_names(keys: list[str], forward: Forward, spec: str, ids: str | None = None) -> dict[str, str | None]:
    """How each input of a dict batch reaches ``forward``: under its own name; token ids (key ``ids``) under the
    first positional parameter when the forward has none of their name; an attention mask the forward does not
    take left out (None). Raises :class:`UsageError` when an input has no parameter or a parameter without a
    default no input."""
    names: dict[str, str | None] = {}
    for k in keys:
        if forward.takes(k):
            names[k] = k
        elif k == ids:
            free = [p for p in forward.positional if p in forward.names and p not in keys]
            names[k] = free[0] if free else None
        elif ids is not None and k == "attention_mask":
            names[k] = None
    unfilled = set(forward.required) - {v for v in names.values() if v is not None}
    if ids is not None and (names.get(ids) is None or unfilled):
        passed = f", passed as {names[ids]}" if names.get(ids) not in (None, ids) else ""
        raise UsageError(f"the model's forward takes {forward.shown()} but {spec} gives token ids only ({ids}"
                         f"{passed}): give its other parameters a default, or save one array per parameter, "
                         f"{_named_arrays(forward)}")
    if ids is None and (len(names) < len(keys) or unfilled):
        arrays = ", ".join(f"{k}_train" for k in keys)
        raise UsageError(f"the model's forward takes {forward.shown()} but {spec} has the input arrays {arrays}: "
                         f"name one array per parameter, {_named_arrays(forward)}")
    return names


def _named_arrays(forward: Forward) -> str:
    """The named arrays that would fit ``forward``, as a message gives them, with the pointer to the README."""
    params = list(forward.required) if len(forward.required) > 1 else list(forward.positional[:2])
    label = "labels" if {"y", "labels"} & set(params) else "y"
    return (f"{', '.join(f'{p}_train' for p in params)} (and _test), labels {label}_train, {label}_test "
            "(see README, Data)")


def _first_inputs(ds: Dataset, n: int = 2) -> Batch | None:
    """The inputs of the first ``n`` samples (None where the dataset cannot give them)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][:n]
    if isinstance(ds, NamedDataset):
        return {k: v[:n] for k, v in ds.inputs.items()}
    try:
        return default_collate([ds[i][0] for i in range(min(n, len(ds)))])
    except Exception:
        return None


class _Reached(Exception):
    """Float inputs reached an embedding (raised by a hook to stop the forward there)."""


def _float_reaches_embedding(model: torch.nn.Module, x: Batch | None) -> str | None:
    """The name of the embedding that float inputs ``x`` reach first, where token ids were due (None: none does;
    whatever else fails is the trace's to report). Runs the model up to there without gradients; its modes and
    state are left as they were."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x.values()) if isinstance(x, dict) else []
    if not any(t.dtype.is_floating_point for t in parts):
        return None
    names = {m: n for n, m in model.named_modules()}
    modes = {m: m.training for m in names}

    def pre(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype.is_floating_point:
            raise _Reached(names[module] or type(module).__name__)

    handles = [m.register_forward_pre_hook(pre) for m in layers.embeddings(model)]
    try:
        model.eval()
        with torch.no_grad():
            call(model, as_input(x, model, next(model.parameters()).device))
    except _Reached as e:
        return str(e)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return None


def _torchvision(kind: str, root: str, download: bool) -> Data:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[kind]
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as e:
        raise UsageError(f"no {kind} data under {root} ({str(e).splitlines()[0]}); fix the path or add --download") from None
    except Exception as e:  # network failures during --download
        raise UsageError(f"cannot get {kind} into {root}: {str(e).splitlines()[0]}") from None

    def tensors(ds):
        x = torch.as_tensor(np.asarray(ds.data))
        if x.dim() == 4:  # CIFAR: N×H×W×C
            x = x.permute(0, 3, 1, 2).contiguous()
        return TensorDataset(_to_float(x), torch.as_tensor(np.asarray(ds.targets)).long())

    return Data(tensors(train), tensors(test), f"{kind}:{root}")


@dataclass
class Preprocessing:
    """How an image folder's pictures become inputs: resize (shorter side), centre crop, normalise."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    preset: str | None = None

    def resolved(self) -> "Preprocessing":
        if self.preset is None:
            return self
        if self.preset not in PRESETS:
            raise UsageError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        return Preprocessing(self.resize or base["resize"], self.crop or base["crop"], self.mean or base["mean"],
                             self.std or base["std"])

    def check(self) -> None:
        p = self.resolved()
        for flag, v in (("--resize", p.resize), ("--crop", p.crop)):
            if v is not None and v < 1:
                raise UsageError(f"{flag} {v} must be a positive number of pixels")
        if (p.mean is None) != (p.std is None) or (p.mean is not None and len(p.mean) != len(p.std)):
            raise UsageError("give --mean and --std together, one value per channel (e.g. 0.485,0.456,0.406)")
        if p.std is not None and any(v <= 0 for v in p.std):
            raise UsageError("--std values must be positive")


def _image_folder(root: Path, input_shape: tuple[int, ...] | None, pre: Preprocessing | None = None) -> Data:
    from torchvision import datasets, transforms

    pre = (pre or Preprocessing()).resolved()
    steps = []
    if input_shape is not None and input_shape[0] == 1:
        steps.append(transforms.Grayscale())
    if pre.resize is not None:
        steps.append(transforms.Resize(pre.resize))
    if pre.crop is not None:
        steps.append(transforms.CenterCrop(pre.crop))
    if pre.resize is None and pre.crop is None and input_shape is not None:
        steps.append(transforms.Resize(tuple(input_shape[1:])))
    steps.append(transforms.ToTensor())
    if pre.mean is not None:
        steps.append(transforms.Normalize(pre.mean, pre.std))
    tf = transforms.Compose(steps)
    val = root / "val" if (root / "val").is_dir() else root / "test"
    try:
        train, test = datasets.ImageFolder(root / "train", tf), datasets.ImageFolder(val, tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"--data {root}: {str(e).splitlines()[0]}; an image folder holds train/CLASS/*.jpg and "
                         "val/CLASS/*.jpg") from None
    return Data(train, test, str(root))


class NamedDataset(Dataset):
    """Samples of named inputs (``inputs``: name → N×… tensor, given to the model by keyword) and their labels."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.inputs.items()}, self.labels[i]

    def split(self, rows) -> "NamedDataset":
        """The samples at ``rows``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = copy.copy(self)
        out.inputs, out.labels = {k: v[rows] for k, v in self.inputs.items()}, self.labels[rows]
        return out

    def renamed(self, names: dict[str, str | None]) -> "NamedDataset":
        """The same samples with input ``k`` given as ``names[k]`` (left out where that is None)."""
        out = copy.copy(self)
        out.inputs = {names.get(k, k): v for k, v in self.inputs.items() if names.get(k, k) is not None}
        return out


class TokenDataset(NamedDataset):
    """Token sequences: ``inputs`` (``input_ids``, maybe ``attention_mask``; N×T) and ``labels`` (N classes, or N×T
    per-token targets; by default the next tokens). ``ids_key`` names the ids as the model's forward takes them
    (``input_ids`` unless renamed by :func:`fit_inputs`)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None):
        inputs = {"input_ids": input_ids.long()}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.long()
        super().__init__(inputs, labels.long() if labels is not None else task.next_tokens(input_ids, attention_mask))
        self.ids_key = "input_ids"
        self.targets_given = labels is not None

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs[self.ids_key]

    def renamed(self, names: dict[str, str | None]) -> "TokenDataset":
        out = super().renamed(names)
        out.ids_key = names.get(self.ids_key) or self.ids_key
        return out


TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
TEST_SHARE = 0.1  # one split given: the last tenth of the sequences is the test split


def _token_npz(path: Path, arrays, files: set[str]) -> Data:
    splits = {}
    suffixes = ("_train", "_test") if "input_ids_train" in files else ("",)
    for suffix in suffixes:
        try:
            got = {k: np.asarray(arrays[k + suffix]) for k in TOKEN_KEYS if k + suffix in files}
        except Exception as e:
            raise UsageError(f"{path}: cannot read its token arrays ({str(e).splitlines()[0][:100]}); save plain "
                             "integer arrays") from None
        if "input_ids" not in got:
            raise UsageError(f"{path} has input_ids_train but no input_ids{suffix}; give both splits or neither suffix")
        splits[suffix] = _token_arrays(got, f"{path}: ", suffix)
    if suffixes == ("",):
        return _held_out(splits[""], str(path))
    return Data(splits["_train"], splits["_test"], str(path))


def _token_arrays(got: dict, where: str, suffix: str = "") -> TokenDataset:
    ids = got["input_ids"]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"{where}input_ids{suffix} has shape {ids.shape} and dtype {ids.dtype}; save token ids as an "
                         "N×T integer array")
    if len(ids) == 0 or ids.shape[1] == 0:
        raise UsageError(f"{where}input_ids{suffix} is empty; give at least one sequence of one token")
    if ids.min() < 0:
        raise UsageError(f"{where}input_ids{suffix} has negative ids (e.g. {int(ids.min())}); ids index the vocabulary")
    mask = got.get("attention_mask")
    if mask is not None and (mask.shape != ids.shape or not np.isin(mask, (0, 1)).all()):
        raise UsageError(f"{where}attention_mask{suffix} must be 0/1 with the shape of input_ids {ids.shape}")
    labels = got.get("labels")
    if labels is not None:
        if labels.shape[:1] != ids.shape[:1] or labels.ndim > 2:
            raise UsageError(f"{where}labels{suffix} has shape {labels.shape}; give one class per sequence "
                             f"({ids.shape[0]},) or one per token {ids.shape} (N×T' targets for an encoder–decoder)")
        if not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"{where}labels{suffix} holds {labels.dtype} values; give integer class indices")
    return TokenDataset(torch.as_tensor(ids), torch.as_tensor(mask) if mask is not None else None,
                        torch.as_tensor(labels) if labels is not None else None)


def _held_out(ds: TokenDataset, spec: str) -> Data:
    """One split: the last tenth of the sequences for evaluation, the rest for calibration (both, when too few)."""
    n = len(ds)
    n_test = max(1, int(round(TEST_SHARE * n)))
    if n - n_test < 1:
        return Data(ds, ds, spec)
    return Data(ds.split(range(n - n_test)), ds.split(range(n - n_test, n)), spec)


def _text(path: Path, tokenizer: str | None, seq_len: int | None) -> Data:
    """A text file cut into sequences of ``seq_len`` tokens by the tokenizer in directory ``tokenizer``."""
    if tokenizer is None:
        raise UsageError(f"--data {path} is text: it needs a tokenizer; pass --tokenizer DIR (a Hugging Face "
                         "tokenizer directory), or give a model directory that has one")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as e:
        raise UsageError(f"cannot load a tokenizer from {tokenizer} ({str(e).splitlines()[0][:120]}); pass "
                         "--tokenizer DIR with tokenizer.json or the files AutoTokenizer reads") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--data {path} is not UTF-8 text; save it as UTF-8") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    length = seq_len or DEFAULT_SEQ_LEN
    if len(ids) < 2 * length:
        raise UsageError(f"--data {path} holds {len(ids)} tokens: fewer than two sequences of {length}; give more "
                         "text or a smaller --seq-len")
    n = len(ids) // length
    return _held_out(TokenDataset(torch.tensor(ids[:n * length]).reshape(n, length)), str(path))


TEXT_SUFFIXES = (".txt", ".text", ".md")


def random_tokens(n: int, length: int, vocab: int, gen: torch.Generator, model: torch.nn.Module | None = None) -> dict:
    """Structure-only token inputs: ids drawn uniformly below ``vocab``, every token attended; named as ``model``'s
    forward takes them (:func:`keyword_names`) when it is given."""
    ids = torch.randint(vocab, (n, length), generator=gen)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shift = decoder_inputs(model) if model is not None else None
    if shift is not None:  # an encoder–decoder: its decoder reproduces the input
        x["decoder_input_ids"] = shift(ids)
    forward = forward_of(model) if model is not None else None
    if forward is None:
        return x
    names = keyword_names(list(x), forward, "--tokens", "input_ids")
    return {names[k]: v for k, v in x.items() if names[k] is not None}


def vocabulary(model: torch.nn.Module) -> int | None:
    """The number of token ids the model takes: its input embedding's rows."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:  # a Hugging Face model without token embeddings may raise here (NotImplementedError)
        emb = None
    if emb is None or not layers.kind_of(emb).embedding:  # an image model's "input embeddings" are patch projections
        emb = next(iter(layers.embeddings(model)), None)
    return emb.num_embeddings if emb is not None else None


TORCHVISION = {"mnist": ("MNIST",), "fashion-mnist": ("FashionMNIST",), "fashionmnist": ("FashionMNIST",),
               "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz")}  # kind → what it keeps under ROOT


def data_paths(spec: str) -> list[tuple[str, str]]:
    """What ``--data spec`` reads from disk, as (what, path): a torchvision dataset's folder under ROOT, an image
    folder's splits (not the folder itself: a model may sit beside them), or the file."""
    kind, sep, root = spec.partition(":")
    if sep and kind.lower() in TORCHVISION:
        return [(name, str(Path(root or ".").expanduser() / name)) for name in TORCHVISION[kind.lower()]]
    if Path(spec).is_dir():
        return [(f"{split}/", str(Path(spec) / split)) for split in ("train", "val", "test")]
    return [("", spec)]


def load_data(spec: str | None, download: bool = False, input_shape: tuple[int, ...] | None = None,
              pre: Preprocessing | None = None, tokenizer: str | None = None, seq_len: int | None = None) -> Data:
    """Parse ``--data``: ``mnist:ROOT``, ``fashion-mnist:ROOT``, ``cifar10:ROOT``, a directory, a ``.npz``, or a
    text file (tokenised by the tokenizer in directory ``tokenizer``)."""
    if not spec:
        return Data(None, None)
    kind, sep, root = spec.partition(":")
    if sep and kind.lower() in TORCHVISION:
        kind = "fashion-mnist" if kind.lower() == "fashionmnist" else kind.lower()
        return _torchvision(kind, root or ".", download)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"--data {spec}: no such file; check the path")
        return _npz(path)
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"--data {spec}: no such file; check the path")
        return _text(path, tokenizer, seq_len)
    if path.is_dir():
        if not (path / "train").is_dir() or not ((path / "val").is_dir() or (path / "test").is_dir()):
            raise UsageError(f"--data {spec}: an image folder needs train/ and val/ subdirectories")
        return _image_folder(path, input_shape, pre)
    raise UsageError(f"--data {spec!r} is not understood; use mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, "
                     "an ImageFolder directory, an .npz file or a .txt file")


OUTPUT_BYTES = 128 << 20  # outputs held at once when labelling or checking (an LLM's logits: ~16 MB a sequence)


def calibration(data: Data, n: int, input_shape: tuple[int, ...] | None = None,
                model: torch.nn.Module | None = None, workers: int = 0, tokens: int | None = None,
                output_key: str | None = None) -> Samples:
    """``n`` train samples chosen with a fixed seed (:func:`too_few` says when they are too few); without
    data, seeded random inputs (images of ``input_shape``, or ``tokens`` random token ids named as ``model``'s
    forward takes them) labelled by ``model``. A forward that takes more than one input needs data."""
    gen = torch.Generator().manual_seed(SEED)
    if data.train is None:
        if tokens is not None:
            vocab = vocabulary(model) if model is not None else None
            if vocab is None:
                raise UsageError("--tokens needs a model that embeds token ids (no nn.Embedding found); use "
                                 "--input-shape for a model that takes float tensors")
            x = random_tokens(n, tokens, vocab, gen, model)
            what = f"{tokens} random tokens"
        elif input_shape is None:
            raise UsageError("no --data and no --input-shape; pass one (e.g. --input-shape 1,28,28 for a "
                             "structure-only run, or --tokens 128 for a token model)")
        else:
            forward = forward_of(model) if model is not None else None
            if forward is not None and not one_input_fits(forward):
                raise UsageError(f"the model's forward takes {forward.shown()} but --input-shape gives it one random "
                                 f"input: pass --data, an .npz of one array per parameter, {_named_arrays(forward)}")
            x = torch.randn((n, *input_shape), generator=gen)
            what = f"inputs of shape {tuple(input_shape)}"
        if model is None:
            return Samples(x, torch.zeros(n, dtype=torch.long))
        try:
            with torch.no_grad():
                first = call(model, as_input(batch_slice(x, 0, 1), model), output_key)
                size = max(1, min(64, OUTPUT_BYTES // max(1, first.numel() * first.element_size())))
                y = torch.cat([task.labels_from(first).cpu()] + [
                    task.labels_from(call(model, as_input(batch_slice(x, i, min(n, i + size)), model),
                                          output_key)).cpu() for i in range(1, n, size)])
        except task.OutputError as e:
            raise UsageError(str(e)) from None
        except Exception as e:
            if tokens is None and vocabulary(model) is not None:
                raise UsageError(f"{what} do not fit the model ({str(e).splitlines()[0][:120]}); it embeds token "
                                 "ids: pass --tokens T (sequence length) instead of --input-shape") from None
            raise UsageError(f"{what} do not fit the model ({str(e).splitlines()[0][:160]}); check "
                             + ("--tokens" if tokens is not None else "--input-shape (without the batch size, e.g. "
                                "1,28,28)")) from None
        return Samples(x, y)
    n = min(n, len(data.train))
    idx = torch.randperm(len(data.train), generator=gen)[:n].tolist()
    if isinstance(data.train, TensorDataset):
        x, y = data.train.tensors
        return Samples(x, y, rows=torch.tensor(idx))
    if isinstance(data.train, NamedDataset):
        return Samples(data.train.inputs, data.train.labels, rows=torch.tensor(idx))
    return Samples(dataset=data.train, indices=idx, workers=workers)


def too_few(data: Data, n: int) -> str | None:
    """The warning for ``n`` calibration samples of ``data`` too few to rely on (see :data:`FEW_CALIB`), naming
    ``--calib`` and the count to give; None when ``n`` is enough, or when the train split is too small itself."""
    if data.train is None:
        return None
    few, good, what = FEW_CALIB, GOOD_CALIB, "samples"
    if isinstance(data.train, TokenDataset):
        length = data.train.ids.shape[1]
        few, good, what = -(-FEW_CALIB_TOKENS // length), -(-GOOD_CALIB_TOKENS // length), "sequences"
    if n >= few or len(data.train) < few:
        return None
    return (f"--calib {n}: too few {what} for reliable scores and least-squares refits; give --calib "
            f"{min(good, len(data.train))} or more (default {DataOptions.calib})")


def eval_loader(data: Data, n: int | None = None, batch_size: int = 256, workers: int = 0) -> DataLoader | None:
    """The test split (first ``n`` samples of a seeded permutation when ``n`` is given)."""
    if data.test is None:
        return None
    ds = data.test
    if n is not None and n < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SEED))[:n].tolist()
        ds = Subset(ds, idx)
    if distributed.active():  # each process evaluates its share; measure.evaluate all-reduces the counts
        ds = Subset(ds, list(range(distributed.rank(), len(ds), distributed.world())))
    if isinstance(data.test, TokenDataset):  # logits are sequence × vocabulary per sample
        batch_size = max(1, min(batch_size, 2 ** 11 // data.test.ids.shape[1]))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers; write it like 1,28,28") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers, like 1,28,28")
    return shape
