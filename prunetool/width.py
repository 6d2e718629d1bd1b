"""Width of the residual stream: hidden-size channels removed from a pre-norm decoder (Llama, Mistral, Qwen2, ...).

The *stream* of such a model is written by the token embedding and by each sub-block's last projection (the
*writers*: ``o_proj``, ``down_proj``), and read only through RMSNorms: every layer that reads it (the *readers*:
``q/k/v_proj``, ``gate/up_proj``, ``lm_head``) reads a norm's output. :func:`find` establishes that on a probe
forward, and refuses a model where anything else touches the stream (a LayerNorm's mean, a position embedding,
a reader outside a norm).

Removing ``r`` of its ``d`` channels (:func:`slice_stream`):

1. Each norm's weight is folded into its readers (``R ← R·diag(w)``, the norm's weight becomes 1): exact.
2. The stream is turned by an orthogonal ``Q`` (``rotate``, the default): the eigenvectors of the normalised
   stream's second moment ``Σ x̂x̂ᵀ`` (``x̂ = x / rms(x)`` at every norm's input, over the calibration tokens),
   largest first. ``E ← E·Q``, a writer ``W ← Qᵀ·W`` (its bias ``Qᵀ·b``), a reader ``R ← R·Q``; an RMSNorm
   without weight is unchanged by an orthogonal turn, so the model is still exact. This is SliceGPT's rotation,
   with one ``Q`` for the whole network: no adapter joins the residual paths, and the result is the family's own
   architecture with a smaller ``hidden_size``. Without ``rotate``, ``Q`` orders the channels by their energy.
3. The last ``r`` directions go: ``E[:, :d']``, writers' rows, readers' columns.
4. An RMSNorm over ``d' = d − r`` channels divides by ``√(|x_kept|²/d')`` where the dense one divided by
   ``√(|x|²/d)``; each norm's weight becomes the mean over the calibration tokens of ``√(d/d' · (1 − f))``,
   ``f`` the share of that token's energy at the norm's input that the removed directions carried. A channel no writer
   ever writes carries none, and is removed with outputs unchanged (up to the norm's epsilon).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import layers, ops
from .batch import batch_to, call, model_dtype
from .calls import NeverCalled, Stop
from .cut import Fit
from .data import as_samples
from .groups import Consumer
from .progress import QUIET, Bars

STREAM_BATCH = 8  # calibration samples per forward while the stream's statistics are gathered


class NotAStream(Exception):
    """The model's residual stream is not one that :func:`slice_stream` can narrow (the reason)."""


@dataclass
class Stream:
    """The residual stream of width ``width``: the embedding, each RMSNorm and the layers reading its output
    (by name), the writers, and whether the head shares the embedding's tensor."""

    width: int
    embedding: str
    norms: dict[str, list[str]] = field(default_factory=dict)
    writers: list[str] = field(default_factory=list)
    tied: bool = False


def _is_rms_norm(module: nn.Module, width: int) -> float | None:
    """The epsilon of ``module`` when it computes ``x / √(mean(x²) + ε) · w`` over a last dimension of ``width``
    (measured on random inputs, whatever its class), else None."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (width,) or getattr(module, "bias", None) is not None \
            or any(True for _ in module.children()):
        return None
    eps = next((v for a in ("variance_epsilon", "eps") if isinstance(v := getattr(module, a, None), float)), 1e-6)
    x = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype) * 3
    with torch.no_grad():
        try:
            got = module(x)
        except Exception:
            return None
        want = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * w.float()
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    same = isinstance(got, torch.Tensor) and got.shape == x.shape and torch.allclose(got.float(), want, atol=tol,
                                                                                     rtol=tol)
    return eps if same else None


def _linear(m: nn.Module) -> bool:
    """A torch ``Linear`` (weight out × in) or a subclass of it."""
    return layers.op_of(m) is ops.LINEAR


def _key(t: torch.Tensor) -> tuple:
    """Where a tensor's values live: a view of a norm's output over all its positions has the same key."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.shape[-1], t.stride()[-1]


def find(model: nn.Module, probe, output_key: str | None = None) -> Stream:
    """The residual stream of a Hugging Face pre-norm decoder, established on ``probe``; :class:`NotAStream` with
    the reason where the model is not one."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None)
    get_embedding = getattr(model, "get_input_embeddings", None)
    if not isinstance(width, int) or get_embedding is None:
        raise NotAStream("the hidden size is narrowed in Hugging Face decoders (a config with hidden_size)")
    embedding = get_embedding()
    names = {m: n for n, m in model.named_modules()}
    if not layers.kind_of(embedding).embedding or getattr(embedding, "embedding_dim", None) != width:
        raise NotAStream("no token embedding of the hidden size")
    norms = {names[m]: m for m in model.modules() if _is_rms_norm(m, width) is not None}
    if not norms:
        raise NotAStream("no norm over the hidden size computes x·rsqrt(mean(x²) + ε)·w, an RMSNorm (LayerNorm's "
                         "mean and Gemma's 1 + w are not handled yet)")
    outputs: dict[tuple, str] = {}
    reads: dict[str, str | None] = {}  # layer → the norm whose output it reads
    alive = []  # the norms' outputs held until the end: no later tensor may take their memory and their key

    def produced(name: str, out: torch.Tensor) -> None:
        alive.append(out)
        outputs[_key(out)] = name

    handles = [m.register_forward_hook(lambda mod, a, out, n=n: produced(n, out)) for n, m in norms.items()]
    linears = {n: m for n, m in model.named_modules() if _linear(m)}
    # resolved when the layer reads: a norm that runs later may be given memory this input had
    handles += [m.register_forward_pre_hook(lambda mod, a, n=n: reads.__setitem__(n, outputs.get(_key(a[0]))))
                for n, m in linears.items() if m.in_features == width]
    try:
        with torch.no_grad():
            call(model, probe, output_key)
    finally:
        for h in handles:
            h.remove()
    stream = Stream(width, names[embedding], {n: [] for n in norms})
    for n, norm in reads.items():
        if norm is None:
            if linears[n].out_features != width:
                raise NotAStream(f"{n} reads the stream without a norm before it")
            continue
        stream.norms[norm].append(n)
    read = {r for rs in stream.norms.values() for r in rs}
    stream.writers = [n for n, m in linears.items() if m.out_features == width and n not in read]
    head = getattr(model, "get_output_embeddings", lambda: None)()
    stream.tied = head is not None and head.weight is embedding.weight
    owned = {f"{stream.embedding}.weight"} | {f"{n}.weight" for n in norms} | \
        {f"{n}.{a}" for n in stream.writers + sorted(read) for a in ("weight", "bias")}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in owned and width in p.shape:
            raise NotAStream(f"{name} {tuple(p.shape)} holds the hidden size outside an embedding, an RMSNorm or a "
                             "projection")
    if not stream.writers:
        raise NotAStream("no layer writes the stream")
    return stream


@contextmanager
def _norm_inputs(model: nn.Module, stream: Stream, take):
    """Within it, every norm's input goes to ``take(norm name, x)`` (x: tokens × d, float64)."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(
        lambda mod, a, n=n: take(n, a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in stream.norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _passes(model: nn.Module, samples, device: str, output_key: str | None, bars: Bars, what: str):
    samples = as_samples(samples)
    dtype = model_dtype(model)
    with torch.no_grad():
        for xb, _, _ in bars.track(samples.batches(STREAM_BATCH), what, total=-(-len(samples) // STREAM_BATCH)):
            call(model, batch_to(xb, device, dtype), output_key)


def basis(model: nn.Module, stream: Stream, samples, rotate: bool = True, device: str = "cpu",
          output_key: str | None = None, bars: Bars = QUIET) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream's directions, most energy first (d × d, orthogonal: eigenvectors of the normalised stream's
    second moment with ``rotate``, else the channels ordered by energy), and their energies."""
    moment = torch.zeros(stream.width, stream.width, dtype=torch.float64)

    def take(_, x):
        nonlocal moment
        x = x / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30).sqrt()  # x̂: every token counts alike
        moment += (x.T @ x).cpu()

    with _norm_inputs(model, stream, take):
        _passes(model, samples, device, output_key, bars, "the residual stream's directions")
    if not rotate:
        energy, order = torch.sort(moment.diagonal(), descending=True, stable=True)
        return torch.eye(stream.width, dtype=torch.float64)[:, order], energy
    energy, vectors = torch.linalg.eigh(moment)
    return vectors.flip(-1), energy.flip(-1)


def norm_scales(model: nn.Module, stream: Stream, directions: torch.Tensor, kept: int, samples, device: str = "cpu",
                output_key: str | None = None, bars: Bars = QUIET) -> dict[str, float]:
    """Each norm's weight after the stream keeps its first ``kept`` ``directions``: the calibration tokens' mean of
    ``√(d/d' · (1 − f))``, ``f`` the share of a token's energy at the norm's input the other directions carry."""
    sums = {n: 0.0 for n in stream.norms}
    count = {n: 0 for n in stream.norms}
    removed = directions[:, kept:]

    def take(n, x):
        total = x.pow(2).sum(-1).clamp_min(1e-30)
        lost = (x @ removed.to(x.device)).pow(2).sum(-1)
        share = (1 - lost / total).clamp_min(0)
        sums[n] += float((share * stream.width / kept).sqrt().sum())
        count[n] += share.numel()

    with _norm_inputs(model, stream, take):
        _passes(model, samples, device, output_key, bars, "the norms' scales")
    return {n: sums[n] / max(count[n], 1) for n in stream.norms}


def slice_stream(model: nn.Module, stream: Stream, directions: torch.Tensor, kept: int,
                 scales: dict[str, float] | None = None, rotated: bool = True) -> None:
    """Narrow ``model``'s stream (in place: a copy whose tensors are its own) to its first ``kept`` ``directions``
    (d × d orthogonal; without ``rotated``, a permutation of the channels), each norm's weight multiplied by its
    ``scales`` entry (1 where None). A turned stream has its norms folded into their readers first, and a head tied
    to the embedding gets its own tensor; channels only reordered keep the norms' weights and the tie. ``kept``
    equal to the width changes no output (up to rounding)."""
    modules = dict(model.named_modules())
    q = directions[:, :kept]  # d × d': the kept directions
    if not rotated:  # channels kept in their own order
        q = q[:, q.argmax(0).argsort()]
    embedding = modules[stream.embedding]
    head = model.get_output_embeddings() if stream.tied else None

    def turn(t: torch.Tensor, dim: int) -> torch.Tensor:  # dim: the tensor's hidden-size dimension
        m = t.detach().double().movedim(dim, -1)
        return (m @ q.to(m.device)).movedim(-1, dim).to(t.dtype).contiguous()

    def put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))

    if head is not None and rotated:  # the head's columns get the final norm's weight, the embedding's do not
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    put(embedding, "weight", turn(embedding.weight, 1))
    for norm, readers in stream.norms.items():
        w = modules[norm].weight.detach().double()
        for r in readers:
            reader = modules[r]
            if head is not None and not rotated and reader is head:
                continue  # the embedding's tensor, turned above
            matrix = reader.weight.detach().double()
            if rotated:
                matrix = matrix * w.to(matrix.device)  # out × d: R·diag(w), each column by its channel's weight
            put(reader, "weight", turn(matrix.to(reader.weight.dtype), 1))
        weight = turn(modules[norm].weight, 0) if not rotated else torch.ones(kept, dtype=w.dtype).to(
            modules[norm].weight)
        put(modules[norm], "weight", (weight * (scales or {}).get(norm, 1.0)).to(modules[norm].weight.dtype))
    for n in stream.writers:
        writer = modules[n]
        put(writer, "weight", turn(writer.weight, 0))
        if writer.bias is not None:
            put(writer, "bias", turn(writer.bias, 0))
    if head is not None and not rotated:
        head.weight = embedding.weight
    for m in modules.values():
        if _linear(m) or m is embedding:
            layers.kind_of(m).sync(m, {stream.width: kept})
    for n in stream.norms:
        if isinstance(getattr(modules[n], "hidden_size", None), int):
            modules[n].hidden_size = kept
    _narrow_config(model, stream.width, kept)
    layers.clear_caches(model)


def _narrow_config(model: nn.Module, width: int, kept: int) -> None:
    """Every module's config (one object, shared) replaced by a copy with ``hidden_size`` ``kept`` and the head
    size written out (a family that derives it from the width would change it)."""
    old = model.config
    new = copy.deepcopy(old)
    heads = getattr(old, "num_attention_heads", None)
    if getattr(old, "head_dim", None) is None and isinstance(heads, int) and heads and width % heads == 0:
        new.head_dim = width // heads
    new.hidden_size = kept
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new


def asked_width(width: int, fraction: float) -> int:
    """The channels left when ``fraction`` of ``width`` go, before any rounding."""
    return width - math.floor(fraction * width + 1e-9)


def kept_width(config, fraction: float, multiple: int = 1) -> int:
    """The channels left when ``fraction`` of ``config.hidden_size`` go: the largest count at most that, at a
    ``multiple``, that the family's config accepts (Llama's validates that the hidden size is a multiple of the head
    count, whatever its ``head_dim``); :class:`NotAStream` where none does."""
    asked = asked_width(config.hidden_size, fraction)
    for kept in range(asked - asked % multiple, 0, -multiple):
        trial = copy.deepcopy(config)
        trial.hidden_size = kept
        try:
            getattr(trial, "validate", lambda: None)()
        except Exception:  # the family's own validation: its message is not ours to parse
            continue
        return kept
    raise NotAStream(f"no hidden size of at most {asked} channels is one the model's config accepts")


HEAD_CHUNK = 2 ** 22  # output elements computed at once when a reader's dense outputs are recomputed (a head's)


def _add_rows(fit: Fit, reader: nn.Module, dense_reader: nn.Module, x: torch.Tensor, x_dense: torch.Tensor) -> None:
    """One batch of ``reader``'s refit: its inputs ``x`` in the narrowed model against ``dense_reader``'s outputs on
    its own inputs ``x_dense`` (by its forward itself: the pass's hooks stay out), token rows in chunks (a head's
    outputs over a large vocabulary are never whole)."""
    x, x_dense = x.reshape(-1, x.shape[-1]), x_dense.reshape(-1, x_dense.shape[-1])  # tokens × d', tokens × d
    op, step = fit.c.op, max(1, HEAD_CHUNK // fit.w2d.shape[0])  # w2d: outputs × inputs
    fit.add_chunks(op.rows({}, reader.weight, x, None), lambda i, j: op.targets(dense_reader.forward(x_dense[i:j])),
                   step)


def refit_readers(small: nn.Module, dense: nn.Module, stream: Stream, samples, device: str = "cpu",
                  output_key: str | None = None, bars: Bars = QUIET) -> int:
    """Refit every reader of ``small``'s narrowed stream by least squares (:class:`prunetool.cut.Fit`, its ridge
    pulling towards the weights as they are) so that its outputs on ``small``'s inputs match the same reader's
    outputs in ``dense``; norm by norm in the order the forward reaches them, so each fit sees the inputs the ones
    before it left. Each pass stops where the readers of the norm being refit are called, before they run; their
    dense outputs are computed from the dense inputs in chunks. Returns the number of readers refit."""
    order: list[str] = []
    modules = dict(small.named_modules())
    handles = [modules[n].register_forward_hook(lambda mod, a, o, n=n: order.append(n) if n not in order else None)
               for n in stream.norms]
    samples = as_samples(samples)
    first, _ = samples.take(1)
    try:
        with torch.no_grad():
            call(small, batch_to(first, device, model_dtype(small)), output_key)
    finally:
        for h in handles:
            h.remove()
    dense_modules = dict(dense.named_modules())
    embedding = modules[stream.embedding]
    done = 0
    for norm in bars.track(order, "refitting the stream's readers", total=len(order)):
        fits, box, handles = {}, {}, []

        def keep(key: str, x: torch.Tensor, wanted: list[str]) -> None:
            box[key] = x
            if all(k in box for k in wanted):
                raise Stop  # each model's pass ends before its readers of this norm run: the rest is not needed

        for r in stream.norms[norm]:
            reader = modules[r]
            if reader.weight is embedding.weight:  # a head still tied (channels as they are): the tie stays
                continue
            op = layers.op_of(reader)
            c = Consumer(r, reader, weight="weight", dim=op.in_dim, op=op, new_bias=False,
                         bias="bias" if reader.bias is not None else None)
            fits[r] = Fit(reader, c, None)
        if not fits:
            continue
        ours, theirs = list(fits), [f"dense {r}" for r in fits]
        for r in fits:  # the readers' inputs; the dense outputs are computed from them, chunk by chunk
            handles.append(modules[r].register_forward_pre_hook(lambda m, a, r=r: keep(r, a[0], ours)))
            handles.append(dense_modules[r].register_forward_pre_hook(
                lambda m, a, r=r: keep(f"dense {r}", a[0], theirs)))
        try:
            with torch.no_grad():
                for xb, _, _ in samples.batches(STREAM_BATCH):
                    box.clear()
                    for model in (dense, small):
                        try:
                            call(model, batch_to(xb, device, model_dtype(model)), output_key)
                        except Stop:
                            pass
                    for r, fit in fits.items():
                        if r not in box or f"dense {r}" not in box:
                            raise NeverCalled(f"{r} did not run on a calibration batch: its refit has no inputs")
                        _add_rows(fit, modules[r], dense_modules[r], box[r], box[f"dense {r}"])
        finally:
            for h in handles:
                h.remove()
        for fit in fits.values():
            if not fit.bias_only:
                fit.solve()
                done += 1
    return done
