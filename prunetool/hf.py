"""Hugging Face directories in and out: ``config.json`` with ``*.safetensors``, as ``save_pretrained`` writes them.

In (:func:`load_dir`): the class named by the config's ``architectures`` from ``transformers`` (code shipped in
the directory only with ``trust_remote_code``), weights in the file's dtypes, attention through SDPA (the kernel
trace follows into heads), no key/value cache. The checkpoint's architecture is :func:`build` with the config as
its arguments, so prunetool's own file of a cut model rebuilds the same class.

Out (:func:`write_dir`): the config is updated to the cut model's widths, read off the model by
:func:`config_for`. Which config entry sets which tensor dimension is *measured*, not assumed: each width entry
(``intermediate_size``, ``num_attention_heads``, ...) is moved by one on a model built on the meta device and the
dimensions that move with it are recorded as ``dim = a · entry + b``. The cut model's dimensions then give each
entry's new value; the result holds only if one value explains every layer (uniform widths) and a model built
from the new config has exactly the cut model's tensors. A family whose config cannot express the change (BERT
and GPT-2 derive the head size from the model width, so fewer heads change nothing a config can say; widths that
differ per layer) is refused with the reason, and the command writes prunetool's own file instead. Biases the
compensation added are kept by switching on the config's bias flag (``attention_bias``, ``mlp_bias``) where the
family has one; the biases that flag also creates elsewhere are zero, and count in the written model's parameters
(and in the size a --target-params search meets: :meth:`Widths.flag_biases`).
The written directory is read back with ``from_pretrained`` (:func:`read_back`) and must give identical outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import layers
from .checkpoint import Checkpoint, cast_state
from .cut import plan_cut, top
from .errors import UsageError
from .groups import Group, Trace

BUILD = "prunetool.hf:build"
WIDTH_ENTRIES = ("intermediate_size", "n_inner", "num_attention_heads", "num_key_value_heads", "n_head",
                 "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "encoder_attention_heads",
                 "decoder_attention_heads", "moe_intermediate_size", "shared_expert_intermediate_size",
                 "hidden_dim", "d_ff", "num_heads", "n_heads", "num_local_experts", "num_experts")
BIAS_FLAGS = ("attention_bias", "mlp_bias", "qkv_bias", "use_bias", "bias")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")


class NotRepresentable(Exception):
    """The cut model's widths cannot be written as a config of its family."""


def is_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


@contextlib.contextmanager
def quiet():
    """transformers without its progress bars and advisory logging."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _class(config, where: str, trust_remote_code: bool):
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls, name
    if auto_map:
        if not trust_remote_code:
            raise UsageError(f"{where} needs the model code shipped with it (auto_map in config.json); pass "
                             "--trust-remote-code if you trust that code")
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        ref = next((v for k, v in auto_map.items() if k.startswith("AutoModelFor")), None) or \
            next(iter(auto_map.values()))
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        return get_class_from_dynamic_module(ref, where), ref
    raise UsageError(f"{where}: config.json names architectures {names or 'none'}, which transformers "
                     f"{transformers.__version__} does not have; upgrade transformers or fix the config")


def _from_config(cls, config):
    try:
        return cls._from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):
        return cls._from_config(config, attn_implementation="eager")


def build(architecture: str, config: dict, trust_remote_code: bool = False) -> nn.Module:
    """The model of class ``architecture`` for ``config`` (a config's dict), with fresh weights."""
    import transformers

    with quiet():
        cfg = transformers.AutoConfig.for_model(**config)
        cfg.use_cache = False
        cls, _ = _class(cfg, "the recorded config", trust_remote_code) if architecture not in dir(transformers) \
            else (getattr(transformers, architecture), architecture)
        return _from_config(cls, cfg).eval()


def load_dir(path, trust_remote_code: bool = False):
    """A :class:`prunetool.load.Checkpoint` for a Hugging Face model directory."""
    path = Path(path)
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{path} is a Hugging Face model directory: install transformers "
                         "(pip install transformers)") from None
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise UsageError(f"{path} has config.json but no *.safetensors weights; save it with save_pretrained")
    if not any(p.suffix == ".safetensors" for p in weights):
        raise UsageError(f"{path} holds only pickled *.bin weights; convert them to safetensors "
                         "(model.save_pretrained(dir, safe_serialization=True))")
    with quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise UsageError(f"{path}/config.json cannot be read ({str(e).splitlines()[0][:160]}); fix the "
                             "config") from None
        cls, name = _class(config, str(path), trust_remote_code)
        original = config.to_dict()
        try:
            model = _pretrained(cls, path, trust_remote_code)
        except Exception as e:
            raise UsageError(f"{path} does not load as {name} ({str(e).splitlines()[0][:160]}); check the "
                             "directory") from None
    model.config.use_cache = False
    model.eval()
    digest = hashlib.sha256()
    for p in weights:  # in pieces: a shard read whole would be a second copy of it in memory
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    dtypes = {k: v.dtype for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    kwargs = {"architecture": name, "config": _plain(original)}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    tokenizer = str(path) if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "vocab.txt", "tokenizer.model")) else None
    record = {}  # what prunetool wrote beside the weights (history, input shape): read, never required
    if (path / "prunetool.json").is_file():
        try:
            record = json.loads((path / "prunetool.json").read_text())
        except (ValueError, UnicodeDecodeError):
            warnings.warn(f"{path}/prunetool.json is not valid JSON; ignored (the model itself loaded)")
    return Checkpoint(model, BUILD, kwargs, path=str(path), sha256=digest.hexdigest(),
                      file_bytes=sum(p.stat().st_size for p in weights), dtypes=dtypes, tokenizer=tokenizer,
                      record=record if isinstance(record, dict) else {})


def _pretrained(cls, path, trust_remote_code):
    try:
        return cls.from_pretrained(path, dtype="auto", attn_implementation="sdpa",
                                   trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as e:
        if "sdpa" not in str(e).lower() and "attn" not in str(e).lower():
            raise
        return cls.from_pretrained(path, dtype="auto", attn_implementation="eager",
                                   trust_remote_code=trust_remote_code)


def _plain(config: dict) -> dict:
    """The config as JSON would carry it (dtype objects as names)."""
    return json.loads(json.dumps(config, default=lambda v: str(v).replace("torch.", "")))


def is_hf(ckpt) -> bool:
    return getattr(ckpt, "arch", None) == BUILD


# --- writing -----------------------------------------------------------------------------------------------

_BUILT: dict[tuple, dict[str, tuple[int, ...]]] = {}  # meta-device builds, by architecture and config


def _meta(architecture: str, config: dict, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of ``architecture`` built from ``config`` on the meta device (remembered: the rounding,
    the dependencies and the writer ask for the same builds)."""
    key = (architecture, json.dumps(_plain(config), sort_keys=True), trust_remote_code)
    if key not in _BUILT:
        with torch.device("meta"), quiet():
            model = build(architecture, config, trust_remote_code)
        _BUILT[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return dict(_BUILT[key])


def _effective(config: dict, entry: str):
    value = config.get(entry)
    if entry == "n_inner" and value is None and isinstance(config.get("n_embd"), int):
        return 4 * config["n_embd"]  # GPT-2: None means 4 × the width
    return value


def dependencies(architecture: str, config: dict, trust_remote_code: bool = False) -> dict:
    """For each width entry of the config: the tensor dimensions it sets, as ``(key, dim) → (a, b)`` with
    ``size = a · value + b`` (measured on meta-device builds)."""
    base = _meta(architecture, config, trust_remote_code)
    out = {}
    for entry in WIDTH_ENTRIES:
        v0 = _effective(config, entry)
        if not isinstance(v0, int) or isinstance(v0, bool):
            continue
        for v1 in (v0 + 1, 2 * v0):
            try:
                moved = _meta(architecture, {**config, entry: v1}, trust_remote_code)
            except Exception:
                continue
            deps = {}
            for key, shape in base.items():
                other = moved.get(key)
                if other is None or len(other) != len(shape):
                    continue
                for d, (s0, s1) in enumerate(zip(shape, other)):
                    if s0 != s1:
                        a = (s1 - s0) / (v1 - v0)
                        deps[(key, d)] = (a, s0 - a * v0)
            if deps:
                out[entry] = deps
            break
    return out


def pinned(architecture: str, config: dict, trust_remote_code: bool = False) -> dict:
    """``config`` with ``head_dim`` written out where the family reads it but derives it from the width when it is
    missing (Qwen2, Mixtral, Granite): the same model, whose head count can then change alone."""
    width, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if config.get("head_dim") is not None or not isinstance(width, int) or not isinstance(heads, int) or width % heads:
        return config
    candidate = {**config, "head_dim": width // heads}
    try:
        if _meta(architecture, candidate, trust_remote_code) != _meta(architecture, config, trust_remote_code):
            return config
        more = {"num_attention_heads": 2 * heads}
        if _meta(architecture, {**candidate, **more}, trust_remote_code) == \
                _meta(architecture, {**config, **more}, trust_remote_code):
            return config  # the family does not read it
    except Exception:
        return config
    return candidate


DEPTH_ENTRIES = ("num_hidden_layers", "layer_types")
WIDTH_OF_STREAM = ("hidden_size", "head_dim", "tie_word_embeddings")


def with_structure(model: nn.Module, config: dict) -> dict:
    """``config`` (a dense model's, as a dict) with what removing whole layers (:mod:`prunetool.depth`) or
    narrowing the residual stream (:mod:`prunetool.width`) changed in ``model``'s own config: the layer count and
    per-layer types; the hidden size, with the head size written out and the head's tie to the embedding. Each
    under the key the dict uses (GPT-2: ``n_layer`` for ``num_hidden_layers``)."""
    own = getattr(model, "config", None)
    aliases = getattr(type(own), "attribute_map", {}) or {}
    for key in DEPTH_ENTRIES:
        stored = aliases.get(key, key)
        value = getattr(own, key, None)
        if stored in config and value is not None and value != config[stored]:
            config = {**config, stored: value}
    width = aliases.get("hidden_size", "hidden_size")
    if isinstance(getattr(own, "hidden_size", None), int) and config.get(width) not in (None, own.hidden_size):
        for key in WIDTH_OF_STREAM:
            value = getattr(own, key, None)
            if value is not None:
                config = {**config, aliases.get(key, key): value}
    tied = getattr(own, "tie_word_embeddings", None)
    if isinstance(tied, bool) and config.get("tie_word_embeddings", tied) != tied:  # the head was untied
        config = {**config, "tie_word_embeddings": tied}
    return config


def config_for(model: nn.Module, architecture: str, config: dict, trust_remote_code: bool = False
               ) -> tuple[dict, list[str]]:
    """The config of ``model`` (a cut model of ``architecture`` built from ``config``), and the keys of the zero
    biases a bias flag adds; raises :class:`NotRepresentable` with the reason when there is none."""
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = with_structure(model, config)
    config = pinned(architecture, config, trust_remote_code)
    return _config(state, _meta(architecture, config, trust_remote_code),
                   dependencies(architecture, config, trust_remote_code), architecture, config, trust_remote_code)


def _config(state: dict[str, tuple[int, ...]], base: dict, dependencies: dict, architecture: str, config: dict,
            trust_remote_code: bool) -> tuple[dict, list[str]]:
    """:func:`config_for` on a model's tensor shapes (``state``), given the dense model's (``base``) and the
    config's :func:`dependencies`."""
    new = dict(config)
    explained = set()
    for entry, deps in dependencies.items():
        values = {}
        for (key, d), (a, b) in deps.items():
            if key in state and a:
                value = (state[key][d] - b) / a
                values.setdefault(value, []).append(key)
                explained.add((key, d))
        if len(values) > 1:
            (v1, k1), (v2, k2) = list(values.items())[:2]
            raise NotRepresentable(f"{entry} would be {_show(v1)} for {k1[0]} but {_show(v2)} for {k2[0]} "
                                   "(widths differ per layer)")
        if values:
            value = next(iter(values))
            if value != int(value) or value < 1:
                raise NotRepresentable(f"{entry} would be {value:g} for {next(iter(values.values()))[0]}")
            if int(value) != _effective(config, entry):
                new[entry] = int(value)
    for key, shape in state.items():
        old = base.get(key)
        if old is not None and old != shape:
            dims = [d for d, (a, b) in enumerate(zip(old, shape)) if a != b and (key, d) not in explained]
            if dims:
                raise NotRepresentable(f"no {architecture} config entry sets dimension {dims[0]} of {key} "
                                       f"({old[dims[0]]} → {shape[dims[0]]}): the family's config cannot express "
                                       "this cut")
    try:
        built = _meta(architecture, new, trust_remote_code)
    except Exception as e:  # the family's config validates its widths (Llama: the width a multiple of the heads)
        changed = ", ".join(f"{k} {config.get(k)} → {v}" for k, v in new.items() if config.get(k) != v)
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()[:120]
        raise NotRepresentable(f"{architecture}'s config refuses {changed} ({why})") from None
    added = []
    extra = [k for k in state if k not in built]
    if extra:
        for flag in BIAS_FLAGS:
            if isinstance(config.get(flag), bool) and not config[flag]:
                trial = _meta(architecture, {**new, flag: True}, trust_remote_code)
                if any(k in trial for k in extra):
                    new[flag], built = True, trial
                    extra = [k for k in state if k not in built]
        if extra:
            raise NotRepresentable(f"the cut added {extra[0]}, which {architecture}'s config cannot hold")
        added = [k for k in built if k not in state]
        if any(not k.endswith(".bias") for k in added):
            raise NotRepresentable(f"the config would add {added[0]}, which is not a bias")
    for key, shape in built.items():
        if key in state and state[key] != shape:
            raise NotRepresentable(f"a {architecture} built from the new config has {key} of shape {shape}, the "
                                   f"cut model {state[key]}")
    return new, added


def _show(v: float) -> str:
    return f"{v:g}"


MAX_TRIALS = 24  # unit counts tried per set of coupled groups before it is kept whole


@dataclass
class Rounded:
    """Groups whose unit count was moved to one the family's config can hold, and why."""

    entries: list[str]  # the config entries their widths set
    groups: list[str]
    units: int
    asked: list[int]  # units the selection kept, per group
    kept: int  # units kept in every group
    reason: str

    def describe(self) -> str:
        asked = sorted(set(self.asked))
        asked_text = str(asked[0]) if len(asked) == 1 else f"{asked[0]}–{asked[-1]}"
        where = self.groups[0] + (f" and {len(self.groups) - 1} like it" if len(self.groups) > 1 else "")
        sized = f" ({', '.join(self.entries)})" if self.entries else ""
        return f"{where}{sized}: {self.kept} of {self.units} units kept in each (asked {asked_text}): {self.reason}"


class Widths:
    """The unit counts a Hugging Face family's config can hold, for the groups of a trace of ``model``.

    Groups whose tensors one config entry sizes (every layer's MLP: ``intermediate_size``; every layer's heads:
    ``num_attention_heads`` with ``num_key_value_heads``) keep the same count, and that count must give a config
    the family accepts and a model built from it with the cut's shapes (:func:`config_for`): BERT and GPT-2 derive
    the head size from the width, so their heads stay whole; Llama wants the width a multiple of the heads. Each
    count is tried on meta-device builds, nearest to what the selection asked first."""

    def __init__(self, model: nn.Module, graph: Trace, architecture: str, config: dict,
                 trust_remote_code: bool = False):
        self.graph, self.architecture, self.config, self.trust = graph, architecture, config, trust_remote_code
        self.config = config = pinned(architecture, config, trust_remote_code)
        self.state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.base = _meta(architecture, config, trust_remote_code)
        self.deps = dependencies(architecture, config, trust_remote_code)
        self.classes = self._classes(graph.groups)
        self.tried: dict[tuple, str | None] = {}  # (class, units kept) → why the config refuses it, None if it holds
        self.no_bias = self._forbid_new_biases(graph.groups)
        self._flag_biases: dict[tuple, int] = {}

    def _forbid_new_biases(self, groups: list[Group]) -> list[str]:
        """Mark the consumers the compensation may not give a bias: those whose bias no config of the family
        holds (Qwen3's MLP has no bias flag); returns their roles. Checked once per role
        (``layers.N.mlp.down_proj``)."""
        verdict: dict[str, bool] = {}
        forbidden = []
        for g in groups:
            for c in g.consumers:
                if c.bias is not None or f"{c.name}.bias" in self.state:
                    continue
                role = re.sub(r"\.\d+(?=\.|$)", ".N", c.name)
                if role not in verdict:
                    weight = self.state.get(f"{c.name}.{c.weight}")
                    verdict[role] = weight is not None and self._holds(
                        {**self.state, f"{c.name}.bias": (weight[c.op.out_dim],)})
                if not verdict[role]:
                    c.new_bias = False
                    forbidden.append(role)
        return sorted(set(forbidden))

    def flag_biases(self, state: dict[str, tuple[int, ...]]) -> int:
        """The parameters of the zero biases a bias flag adds when a cut of these tensor shapes (``state``, with
        the biases the compensation gives) is written (``mlp_bias`` gives ``gate``/``up`` one where ``down`` got
        one); 0 where the shapes hold no config. Cached: a search asks for the same counts again."""
        key = tuple(sorted(state.items()))
        if key not in self._flag_biases:
            try:
                new, added = _config(state, self.base, self.deps, self.architecture, self.config, self.trust)
                built = _meta(self.architecture, new, self.trust) if added else {}
                self._flag_biases[key] = sum(math.prod(built[k]) for k in added)
            except Exception:  # NotRepresentable, or a family's build refusing the flag: no bias to count
                self._flag_biases[key] = 0
        return self._flag_biases[key]

    def _holds(self, state: dict) -> bool:
        try:
            _config(state, self.base, self.deps, self.architecture, self.config, self.trust)
            return True
        except NotRepresentable:
            return False

    def _classes(self, groups: list[Group]) -> list[tuple[list[str], list[Group]]]:
        """Groups coupled by the config entries sizing their tensors, with those entries."""
        owner: dict[str, int] = {}
        members: list[tuple[set, list]] = []
        for g in groups:
            tensors = {(f"{p.name}.{p.weight}", p.dim) for p in g.producers} | \
                {(f"{c.name}.{c.weight}", c.dim) for c in g.consumers}
            entries = {e for e, deps in self.deps.items() if tensors & deps.keys()}
            joined = sorted({owner[e] for e in entries if e in owner})
            if not joined:
                members.append((set(entries), [g]))
                target = len(members) - 1
            else:
                target = joined[0]
                for other in joined[1:]:
                    members[target][0].update(members[other][0])
                    members[target][1].extend(members[other][1])
                    members[other] = (set(), [])
                members[target][0].update(entries)
                members[target][1].append(g)
            for e in members[target][0]:
                owner[e] = target
        out, loose = [], {}
        for entries, gs in members:
            if gs and entries:
                out.append((sorted(entries), gs))
            elif gs:  # no entry sizes them: kept whole, reported together by size
                loose.setdefault(gs[0].units, []).extend(gs)
        return out + [([], gs) for gs in loose.values()]

    def ties(self) -> tuple[list[list[str]], list[str]]:
        """The groups :meth:`round` gives one count (sets of two or more names), and those it keeps whole (no
        config entry sets their width)."""
        tied, whole = [], []
        for entries, groups in self.classes:
            if not _one_count(groups):
                continue
            if not entries:
                whole += [g.name for g in groups]
            elif len(groups) > 1:
                tied.append([g.name for g in groups])
        return tied, whole

    def refusal(self, groups: list[Group], kept: int) -> str | None:
        """Why the config cannot hold ``groups`` cut to ``kept`` units each (the rest of the model whole); None
        when it can."""
        key = (tuple(g.name for g in groups), kept)
        if key not in self.tried:
            keep = {g.name: torch.arange(kept if g.name in key[0] else g.units) for g in self.graph.groups}
            state = dict(self.state)
            for (name, attr, dim), drop in plan_cut(self.graph, keep).drops.items():
                k = f"{name}.{attr}"
                if k in state and drop:
                    state[k] = state[k][:dim] + (state[k][dim] - len(drop),) + state[k][dim + 1:]
            try:
                _config(state, self.base, self.deps, self.architecture, self.config, self.trust)
                self.tried[key] = None
            except NotRepresentable as e:
                self.tried[key] = str(e)
        return self.tried[key]

    def round(self, keep: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
              whole: frozenset = frozenset()) -> tuple[dict[str, torch.Tensor], list[Rounded]]:
        """``keep`` with every set of coupled groups at one unit count the config holds (the highest-scored units
        kept), and what was moved; groups named in ``whole`` (kept whole after a misread) keep their set whole."""
        out, moved = dict(keep), []
        for entries, groups in self.classes:
            asked = [len(keep[g.name]) for g in groups]
            if all(a == g.units for a, g in zip(asked, groups)) or not _one_count(groups):
                continue  # nothing cut, layers of different sizes or grouped convs (prunetool's own file if need be)
            n = groups[0].units
            if not entries:
                kept, reason = n, f"no {self.architecture} config entry sets their width"
            elif any(g.name in whole for g in groups):
                kept, reason = n, "one of them is kept whole (misread) and the config gives every layer one width"
            else:
                kept, reason = self._nearest(groups, round(sum(asked) / len(asked)), n)
            if all(a == kept for a in asked):
                continue
            for g in groups:
                out[g.name] = keep[g.name] if len(keep[g.name]) == kept else top(scores[g.name], g.blocks, kept)
            moved.append(Rounded(entries, [g.name for g in groups], n, asked, kept, reason))
        return out, moved

    def _nearest(self, groups: list[Group], asked: int, units: int) -> tuple[int, str]:
        """The unit count nearest ``asked`` the config holds (ties: the larger), and why ``asked`` was refused."""
        first = self.refusal(groups, asked) if 1 <= asked <= units else "out of range"
        if first is None:
            return asked, "the same count in every layer (the config holds one width)"
        candidates = sorted(range(1, units + 1), key=lambda k: (abs(k - asked), -k))
        for k in [k for k in candidates if k != asked][:MAX_TRIALS]:
            if k == units or self.refusal(groups, k) is None:
                return k, f"{asked} refused ({first})"
        return units, f"{asked} refused ({first}); no count near it is held"


def _one_count(groups: list[Group]) -> bool:
    """Whether :meth:`Widths.round` can give ``groups`` one count: the same size, no grouped conv among them."""
    return len({g.units for g in groups}) == 1 and not any(g.blocks > 1 for g in groups)


def write_dir(model: nn.Module, ckpt, dest: str | Path, source: str | None = None) -> None:
    """Write ``model`` (cut from ``ckpt``, a Hugging Face checkpoint) as a model directory at ``dest`` that
    ``from_pretrained`` reads; tokenizer and generation files are copied from ``source``. Raises
    :class:`NotRepresentable` when its config cannot hold it."""
    kwargs = ckpt.arch_kwargs
    architecture, config = kwargs["architecture"], kwargs["config"]
    trust = bool(kwargs.get("trust_remote_code"))
    new, added = config_for(model, architecture, config, trust)
    out = layers.clone(model, share=True)
    modules = dict(out.named_modules())
    for key in added:  # the zero biases a bias flag creates beside the ones the compensation added
        mname, _, attr = key.rpartition(".")
        module = modules[mname]
        weight = getattr(module, "weight")
        setattr(module, attr, nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype)))
    import transformers

    with quiet():
        cfg = transformers.AutoConfig.for_model(**new)
    for attr in ("_attn_implementation_internal", "_attn_implementation"):
        with contextlib.suppress(Exception):
            setattr(cfg, attr, getattr(model.config, attr))
    out.config = cfg
    with torch.no_grad():  # written in the source's dtypes
        dtypes = cast_state({k: v for k, v in out.state_dict().items()}, ckpt.dtypes)
        for key, t in list(out.named_parameters()) + list(out.named_buffers()):
            if key in dtypes and t.dtype != dtypes[key].dtype:  # a new tensor: ``out`` shares them with ``model``
                mname, _, attr = key.rpartition(".")
                module = out.get_submodule(mname)
                new = dtypes[key]
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    module._buffers[attr] = new
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with quiet():
        out.save_pretrained(dest, safe_serialization=True)
    if source is not None:
        for f in Path(source).iterdir():
            if f.is_file() and f.name != "config.json" and not any(f.match(p) for p in WEIGHT_FILES):
                shutil.copy2(f, dest / f.name)


def read_back(dest: str | Path, ckpt) -> nn.Module:
    """The directory loaded as a user will: ``from_pretrained`` of its class, in the file's dtypes. It can hold more
    parameters than the model written (the zero biases a bias flag adds, see :func:`config_for`), so a report
    measures this model, not the one in memory."""
    kwargs = ckpt.arch_kwargs
    with quiet():
        config = __import__("transformers").AutoConfig.from_pretrained(dest, trust_remote_code=bool(
            kwargs.get("trust_remote_code")))
        cls, _ = _class(config, str(dest), bool(kwargs.get("trust_remote_code")))
        model = _pretrained(cls, dest, bool(kwargs.get("trust_remote_code")))
    model.config.use_cache = False
    return model.eval()
