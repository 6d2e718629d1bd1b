"""Depth: whole residual blocks removed (transformer layers, CNN residual blocks whose shortcut is the identity).

A *block* is a child of an ``nn.ModuleList`` or ``nn.Sequential`` among at least two siblings of its class, with
layers of its own, called once per forward on the whole batch, that returns one tensor of its first input's shape.
Removing it (:class:`prunetool.layers.Skip`) passes that input on: for a residual block (``x + f(x)``) the residual
stream goes on without ``f``. Which blocks go is measured, not assumed: greedily, the block whose removal (with
those already removed) moves the model's outputs least from the dense ones (:func:`prunetool.recover.
output_divergence` on held-out calibration inputs), as BlockPruner does; ShortGPT's block influence (1 − the
cosine of a block's input and output, per position) is reported beside it.

A Hugging Face decoder loses the layers themselves: the layer list is rebuilt without them, the attention
layers' ``layer_idx`` renumbered and the config's ``num_hidden_layers`` (and ``layer_types``) follow, so the
result is a directory ``from_pretrained`` reads. Elsewhere the block is replaced by ``Skip``, which prunetool's
file records (``factored``: ``"skip"``) and a reload rebuilds.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import layers, width
from .batch import batch_len, batch_slice, batch_to, call, model_dtype, token_ids
from .cut import Fit
from .data import OUTPUT_BYTES, as_samples
from .groups import Consumer
from .layers import SKIPPED, Skip, clone, is_stack, replace, without
from .progress import QUIET, Bars
from .recover import mean_divergence, output_divergence


@dataclass
class Block:
    """A removable block: its path, its container's and its index there, and its ShortGPT block influence."""

    name: str
    stack: str
    index: int
    influence: float = 0.0


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None) if not args else None


def _influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − the mean cosine of ``x`` and ``y`` per position (features: dimension 1 of an image map, else the last)."""
    if x.dim() == 4:
        x, y = x.movedim(1, -1), y.movedim(1, -1)
    x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
    return float(1 - F.cosine_similarity(x, y, dim=-1).mean())


def find(model: nn.Module, probe, output_key: str | None = None) -> list[Block]:
    """The blocks of ``model`` that can be removed (see the module docstring), with their block influence on
    ``probe``."""
    candidates = {}
    for stack, container in model.named_modules():
        if not is_stack(container):
            continue
        children = list(container.named_children())
        classes = [type(m) for _, m in children]
        for i, (child, m) in enumerate(children):
            if classes.count(type(m)) >= 2 and any(True for _ in m.children()) and \
                    any(True for _ in m.parameters()) and not isinstance(m, Skip):
                candidates[f"{stack}.{child}" if stack else child] = (stack, i, m)
    seen: dict[str, list] = {name: [] for name in candidates}

    def hook(name):
        def record(module, args, kwargs, out):
            seen[name].append((_first_tensor(args, kwargs), out))
        return record

    with _hooked([m.register_forward_hook(hook(name), with_kwargs=True) for name, (_, _, m) in candidates.items()]), \
            torch.no_grad():
        call(model, probe, output_key)
    n = batch_len(probe)
    found = []
    for name, (stack, i, _) in candidates.items():
        if len(seen[name]) != 1:
            continue
        x, y = seen[name][0]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.shape[0] == n:
            found.append(Block(name, stack, i, _influence(x, y)))
    # blocks within blocks (a stage of residual blocks): only the innermost, so that no removal holds another
    return [b for b in found if not any(o.name.startswith(f"{b.name}.") for o in found)]


@contextmanager
def _hooked(handles: list):
    """Within the context, the hooks ``handles`` stay registered; leaving it removes them."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skipped(model: nn.Module, names: list[str]):
    """Within the context, the blocks ``names`` of ``model`` pass their input on."""
    saved = {name: model.get_submodule(name) for name in names}
    for name in names:
        replace(model, name, Skip())
    try:
        yield
    finally:
        for name, module in reversed(saved.items()):
            replace(model, name, module)


def choose(model: nn.Module, blocks: list[Block], inputs, count: int, output_key: str | None = None,
           bars: Bars = QUIET, metric: str | None = None, refit: "Refit | None" = None
           ) -> tuple[list[str], list[dict[str, float]]]:
    """``count`` blocks removed greedily, each time the one whose removal (with those before it) gives the least
    divergence from the dense outputs on ``inputs`` — with ``refit``, after its compensation, on its held-out
    samples (:meth:`Refit.cost`); and each round's divergences. ``model`` is left as it was (the trials run on a
    copy sharing its weights)."""
    measured = refit is not None and refit.active  # the refit compares on its own held-out samples
    if not measured:
        with torch.no_grad():
            want = call(model, inputs, output_key)
    model = clone(model, share=True)
    removed: list[str] = []
    rounds = []
    for _ in bars.track(range(count), "choosing the blocks to remove"):
        costs = {}
        for b in blocks:
            if b.name in removed:
                continue
            if measured:
                costs[b.name] = refit.cost(model, removed + [b.name])
                continue
            with skipped(model, removed + [b.name]), torch.no_grad():
                got = call(model, inputs, output_key)
                costs[b.name] = max(0.0, float(output_divergence(got, want, token_ids(inputs), metric)))
        best = min(costs, key=costs.get)
        removed.append(best)
        rounds.append({k: round(v, 6) for k, v in costs.items()})
    return removed, rounds


def _decoder_layers(model: nn.Module, stack: str) -> bool:
    """Whether ``stack`` is a Hugging Face model's list of ``num_hidden_layers`` layers."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    layers = model.get_submodule(stack)
    return is_stack(layers) and isinstance(n, int) and len(layers) == n and hasattr(config, "to_dict")


def remove(model: nn.Module, blocks: list[Block], names: list[str], record: dict[str, int | str] | None = None
           ) -> dict[str, int | str]:
    """Remove the blocks ``names`` of ``model`` (a copy whose modules are its own: the config is copied before it
    changes). Returns the structural record (:func:`prunetool.layers.refactor`) after the removal: ``record``
    (the model's so far, e.g. lowrank's factorisations) without the entries inside removed blocks, renamed where a
    decoder's layers were renumbered, and the blocks replaced by :class:`Skip` (name → ``"skip"``)."""
    by_name = {b.name: b for b in blocks}
    inside = [f"{name}." for name in names]
    record = {k: v for k, v in (record or {}).items() if not any(k.startswith(p) for p in inside)}
    stacks: dict[str, list[Block]] = {}
    for name in names:
        stacks.setdefault(by_name[name].stack, []).append(by_name[name])
    decoders = [stack for stack in stacks if _decoder_layers(model, stack)]
    if len(decoders) > 1:  # the config's one layer count cannot say which stack lost which layers
        raise ValueError(f"layers of {len(decoders)} stacks ({', '.join(decoders)}) would go; one config holds their "
                         "count")
    for stack, gone in stacks.items():
        if stack not in decoders:
            for b in gone:
                replace(model, b.name, Skip())
                record[b.name] = SKIPPED
            continue
        old = model.get_submodule(stack)
        kept = [i for i in range(len(old)) if i not in {b.index for b in gone}]
        replace(model, stack, without(old, kept))
        moved = {f"{stack}.{i}.": f"{stack}.{j}." for j, i in enumerate(kept) if i != j}
        record = {next((new + k[len(o):] for o, new in moved.items() if k.startswith(o)), k): v
                  for k, v in record.items()}
        for new_index, layer in enumerate(model.get_submodule(stack)):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new_index
        _shrink_config(model, kept)
    return record


def _shrink_config(model: nn.Module, kept: list[int]) -> None:
    """Every module's config (one object, shared) replaced by a copy with only the ``kept`` layers."""
    old = model.config
    new = copy.deepcopy(old)
    new.num_hidden_layers = len(kept)
    types = getattr(old, "layer_types", None)
    if isinstance(types, list) and len(types) > max(kept, default=0):
        new.layer_types = [types[i] for i in kept]
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new


# --- compensation -----------------------------------------------------------------------------------------------

ABSORB_SAMPLES = 256  # calibration samples a refit reads
ABSORB_CHECK = 64  # more, held out of the refit: it is kept only where their divergence falls
ABSORB_BATCH = 16


def _writers(model: nn.Module, path: str, probe, output_key: str | None,
             stream: set[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The linear layers of the block at ``path`` that write the residual stream, with their names in the block, in
    the order it calls them on ``probe``: those named in ``stream`` (a pre-norm decoder's writers, full names, such as
    ``o_proj`` and ``down_proj``) where it is given, else the last linear layer it calls (a transformer layer's MLP
    output projection)."""
    order: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: order.append((name, mod)))
               for name, m in model.get_submodule(path).named_modules()
               if (op := layers.op_of(m)) is not None and not op.channels_first and not layers.kind_of(m).atomic
               and isinstance(getattr(m, "weight", None), torch.Tensor)]
    with _hooked(handles), torch.no_grad():
        call(model, probe, output_key)
    if stream:
        seen: dict[str, nn.Module] = {}
        for name, m in order:
            if f"{path}.{name}" in stream:
                seen.setdefault(name, m)
        if seen:
            return list(seen.items())
    return order[-1:]


def _stream(out) -> torch.Tensor:
    """A block's output tensor (a Hugging Face layer may return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _runs(blocks: list[Block], gone: set[str]) -> list[tuple[list[Block], Block | None, Block | None]]:
    """Each run of consecutive removed blocks of one stack, with the kept block before it and after it."""
    out = []
    by_stack: dict[str, list[Block]] = {}
    for b in blocks:
        by_stack.setdefault(b.stack, []).append(b)
    for members in by_stack.values():
        members = sorted(members, key=lambda b: b.index)
        run: list[Block] = []
        for i, b in enumerate(members + [None]):
            if b is not None and b.name in gone:
                run.append(b)
                continue
            if run:
                kept_before = [m for m in members[:i - len(run)] if m.name not in gone]
                out.append((run, kept_before[-1] if kept_before else None, b))
            run = []
    return out


class HeldOut:
    """Calibration samples split into a part to fit on (``part``) and a part held out of the blocks' refits
    (``held``, with ``dense``'s outputs on it, ``want``): :data:`ABSORB_SAMPLES` and :data:`ABSORB_CHECK` of them,
    fewer held out where a large vocabulary's outputs would not fit in :data:`OUTPUT_BYTES`. How a cut model is
    compared with the dense one (:meth:`divergence`, ``metric`` as :func:`output_divergence` reads it). ``rows``: the
    held samples' positions among the calibration samples, which a plan's trials leave out of every fit."""

    def __init__(self, dense: nn.Module, samples, output_key: str | None = None, device: str = "cpu",
                 metric: str | None = None):
        self.dense, self.output_key, self.metric = dense, output_key, metric
        x, _ = as_samples(samples).take(ABSORB_SAMPLES + ABSORB_CHECK)
        x = batch_to(x, device, model_dtype(dense))
        n = batch_len(x)
        with torch.no_grad():
            first = call(dense, batch_slice(x, 0, 1), output_key)
        # one sample at least (the check needs outputs to compare); no more than the dense outputs and one batch of
        # the cut model's fit in OUTPUT_BYTES (a large vocabulary's logits are big)
        check = max(1, min(ABSORB_CHECK, n // 4, OUTPUT_BYTES // (2 * max(1, first.numel() * first.element_size()))))
        self.part, self.held = batch_slice(x, 0, n - check), batch_slice(x, n - check, n)
        self.rows = (n - check, n)
        with torch.no_grad():
            self.want = _outputs(dense, self.held, output_key)

    def divergence(self, model: nn.Module) -> float:
        """``model``'s divergence from the dense outputs on the held-out samples."""
        return _divergence(model, self.held, self.want, self.output_key, self.metric)


class Refit(HeldOut):
    """Compensation of removed blocks by refitting the last linear layer (the *writer*) of kept blocks:

    - for each run of consecutive removed blocks, the writer of the kept block before it (after it, for a run at
      the start of its stack) so that the residual stream after that block matches the dense stream after the run
      (it learns to write also what the run wrote, as far as that is linear in its inputs);
    - then (``follow``), in order, the writer of every later kept block of the stack, so that the stream after it
      matches the dense stream after the same block (what is left of the error is taken up block by block).

    A block's writers are, in a pre-norm decoder (:func:`prunetool.width.find`), its attention and MLP output
    projections, in call order; elsewhere its last linear layer. In a pre-norm decoder, the readers of the stream
    after the first removed block are then refit to give the dense readers' outputs
    (:func:`prunetool.width.refit_readers`).

    ``lstsq``: ridge least squares on the writer's inputs; ``mean``: its bias moves by the mean of what is missing
    (where it has a bias); anything else refits nothing. The writers are refit in the order of their blocks (a
    refit changes the inputs of those after it). Each refit is kept only when it lowers the divergence of
    the outputs (:func:`output_divergence`, ``metric`` as it) on calibration samples held out of the refits
    (:data:`ABSORB_CHECK` of them; :data:`ABSORB_SAMPLES` are fitted)."""

    def __init__(self, dense: nn.Module, blocks: list[Block], samples, compensate: str,
                 output_key: str | None = None, device: str = "cpu", metric: str | None = None):
        super().__init__(dense, samples, output_key, device, metric)
        self.blocks, self.compensate, self.device = blocks, compensate, device
        try:  # a pre-norm decoder: each block's writers (attention's and the MLP's), and the stream's readers
            self.stream: width.Stream | None = width.find(dense, batch_slice(self.held, 0, 1), output_key)
        except width.NotAStream:
            self.stream = None

    @property
    def active(self) -> bool:
        return self.compensate in ("lstsq", "mean")

    def cost(self, model: nn.Module, names: list[str]) -> float:
        """The held-out divergence of ``model`` without the blocks ``names``, the kept block before each run refit
        (no later ones): what the greedy choice compares. ``model`` is left as it was."""
        trial = clone(model, share=True)
        with skipped(trial, names):
            if self.active:
                self.apply(trial, names, follow=False)
            return self.divergence(trial)

    def apply(self, small: nn.Module, names: list[str], follow: bool = True, bars: Bars = QUIET) -> list[dict]:
        """Refit ``small`` (a copy of the dense model with the blocks ``names`` skipped, :func:`skipped`); one
        record per refit, naming the removed blocks it compensates."""
        if not self.active or not names:
            return []
        gone = set(names)
        jobs: list[tuple[Block, str, list[str]]] = []  # (kept block refit, dense block whose stream it matches, why)
        for run, before, after in _runs(self.blocks, gone):
            host = before or after
            if host is not None:
                jobs.append((host, run[-1].name if before else host.name, [b.name for b in run]))
        refit = {host.name for host, _, _ in jobs}
        for b in sorted(self.blocks, key=lambda b: (b.stack, b.index)) if follow else []:
            earlier = [o.name for o in self.blocks if o.stack == b.stack and o.index < b.index and o.name in gone]
            if b.name not in gone and b.name not in refit and earlier:
                jobs.append((b, b.name, earlier))
        jobs.sort(key=lambda job: (job[0].stack, job[0].index))
        records = []
        writers = set(self.stream.writers) if self.stream else None
        for host, target, compensates in bars.track(jobs, "refitting the blocks after those removed"):
            found = _writers(small, host.name, batch_slice(self.held, 0, 2), self.output_key, writers)
            if not found:
                records.append({"blocks": compensates, "refit": None, "kept": False,
                                "why": f"{host.name} calls no linear layer"})
            records += [self._one(small, host, target, compensates, name, writer) for name, writer in found]
        if follow and self.stream is not None and self.compensate == "lstsq":
            records.append(self._readers(small, names, bars))
        return records

    def _readers(self, small: nn.Module, names: list[str], bars: Bars) -> dict:
        """Refit the readers of a pre-norm decoder's stream after the first removed block (the kept blocks' query,
        key, value, gate and up projections, and the head) to give the dense model's readers' outputs
        (:func:`prunetool.width.refit_readers`); kept where the held-out divergence falls."""
        first: dict[str, int] = {}  # each stack's first removed block
        for b in self.blocks:
            if b.name in names:
                first[b.stack] = min(first.get(b.stack, b.index), b.index)
        before = [b.name + "." for b in self.blocks if b.stack in first and b.index < first[b.stack]]
        modules = dict(small.named_modules())
        norms = {n: rs for n, rs in self.stream.norms.items() if n in modules and not n.startswith(tuple(before))}
        readers = [modules[r] for rs in norms.values() for r in rs]
        saved = _parameters(readers)
        record = {"blocks": names, "refit": f"the stream's {len(readers)} readers after them", "kept": False,
                  "divergence_before": self.divergence(small)}
        width.refit_readers(small, self.dense, dataclasses.replace(self.stream, norms=norms), self.part, self.device,
                            self.output_key, bars)
        return self._judged(small, record, saved)

    def _judged(self, small: nn.Module, record: dict, saved: dict[nn.Module, dict[str, nn.Parameter]]) -> dict:
        """``record`` with ``small``'s held-out divergence after a refit, which is undone (``saved``: the refit
        modules' own parameters before it, :func:`_parameters`) unless the divergence fell."""
        record["divergence_after"] = self.divergence(small)
        record["kept"] = record["divergence_after"] < record["divergence_before"]
        if not record["kept"]:
            for module, params in saved.items():
                for k, v in params.items():
                    setattr(module, k, v)
        return record

    def _one(self, small: nn.Module, host: Block, target: str, compensates: list[str], name: str,
             writer: nn.Module) -> dict:
        """Refit ``writer`` (``name`` in the block ``host``) so that the stream after ``host`` matches the dense
        stream after ``target``; kept where the held-out divergence falls."""
        record = {"blocks": compensates, "refit": f"{host.name}.{name}" if name else host.name, "kept": False}
        saved = _parameters([writer])
        record["divergence_before"] = self.divergence(small)
        fit = _fit_run(small, self.dense, small.get_submodule(host.name), writer, self.dense.get_submodule(target),
                       self.part, self.compensate, self.output_key)
        if fit is None:
            why = "too wide to refit" if self.compensate == "lstsq" else "mean compensation moves only a bias"
            return record | {"why": "not refit: its output is not one row per position of the stream, or it has no "
                                    f"bias ({why})"}
        fit.solve()
        return self._judged(small, record, saved)


def _parameters(modules: list[nn.Module]) -> dict[nn.Module, dict[str, nn.Parameter]]:
    """Each module's own parameters as they are (a refit replaces them: :meth:`Refit._judged` puts them back)."""
    return {m: dict(m.named_parameters(recurse=False)) for m in modules}


def absorb(small: nn.Module, dense: nn.Module, blocks: list[Block], names: list[str], samples, compensate: str,
           output_key: str | None = None, device: str = "cpu", metric: str | None = None,
           bars: Bars = QUIET) -> list[dict]:
    """Compensate the removal of the blocks ``names`` from ``small`` (a copy of ``dense`` with those blocks
    skipped, :func:`skipped`): :class:`Refit`, every refit; one record per refit."""
    return Refit(dense, blocks, samples, compensate, output_key, device, metric).apply(small, names, bars=bars)


def _outputs(model: nn.Module, inputs, output_key) -> torch.Tensor:
    return torch.cat([call(model, batch_slice(inputs, i, i + ABSORB_BATCH), output_key)
                      for i in range(0, batch_len(inputs), ABSORB_BATCH)])


def _divergence(model, inputs, want, output_key, metric) -> float:
    """The divergence of ``model``'s outputs from ``want`` on ``inputs``, batch by batch (weighted by size)."""
    pairs = ((batch_slice(inputs, i, i + ABSORB_BATCH), want[i:i + ABSORB_BATCH])
             for i in range(0, batch_len(inputs), ABSORB_BATCH))
    return round(mean_divergence(model, pairs, output_key, metric), 6)


def _fit_run(small, dense, host: nn.Module, writer: nn.Module, target: nn.Module, part, compensate: str,
             output_key) -> Fit | None:
    """The normal equations of ``writer``'s refit: its inputs in ``small`` against its outputs plus what the stream
    after ``host`` lacks of the dense stream after ``target`` (``dense``'s); None where they cannot be set up."""
    op = layers.op_of(writer)
    c = Consumer("writer", writer, weight="weight", dim=op.in_dim, op=op, new_bias=False,
                 bias="bias" if getattr(writer, "bias", None) is not None else None)
    fit = Fit(writer, c, None)
    if fit.bias_only and not fit.fit_bias:  # too wide to refit (MAX_FIT_INPUTS) and no bias to move
        return None
    if compensate == "mean":
        if not fit.fit_bias:
            return None
        fit.bias_only = True  # E[z − W·x]: the bias moves by the mean of what is missing
    box: dict[str, torch.Tensor] = {}
    handles = [target.register_forward_hook(lambda m, a, o: box.__setitem__("want", _stream(o))),
               host.register_forward_hook(lambda m, a, o: box.__setitem__("got", _stream(o))),
               writer.register_forward_hook(lambda m, a, o: box.update(x=a[0], y=o))]
    with _hooked(handles):
        for i in range(0, batch_len(part), ABSORB_BATCH):
            xb = batch_slice(part, i, i + ABSORB_BATCH)
            with torch.no_grad():
                call(dense, xb, output_key)
                call(small, xb, output_key)
            y = op.targets(box["y"])  # positions × outputs
            missing = box["want"] - box["got"]
            if missing.numel() != y.numel():
                return None
            fit.add(op.rows({}, writer.weight, box["x"], None), y + missing.reshape(y.shape))
    return fit
