"""Options grouped as the CLI and the Python API share them: one small dataclass per concern.

Each field is written once here, with its default and, through :func:`option`, the flag and help text the
command line offers it under (:mod:`prunetool.flags` builds the Typer commands from them); the Python API's
keyword functions (``prunetool.shrink(...)`` and the others) take their defaults from these classes and fill
them back from their keywords (:func:`from_keywords`). ``check()`` refuses a nonsensical value with a one-line
:class:`UsageError` that names the flag and the fix, before any work starts.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Mapping

from .errors import UsageError

DEFAULT_CRITERION = "obs"  # with --compensate lstsq; mrs ranks for the other compensations
DEFAULT_COMPENSATION = "lstsq"
CRITERIA = ("mrs", "mrp", "taylor", "obs", "l1", "l2", "fp", "random")
DATA_CRITERIA = ("mrs", "mrp", "taylor", "obs")
COMPENSATIONS = ("mean", "lstsq", "none")
SCOPES = ("layer", "global")
ALLOCATIONS = ("sensitivity", "uniform")
AXES = ("units", "blocks", "hidden", "heads")  # what a target may remove: units in layers, whole blocks, the hidden
# size, a number of attention heads in every layer
OPTIMIZERS = ("sgd", "adam")
FINETUNE_LR = 1e-3
RECOVER_LR = 1e-4  # Fashion-MNIST ResNet-20 at 3x fewer MACs, 60 s: 1e-4 lost 1.95 pp where 1e-3 lost 2.66
# with mixup, ResNet-20 at 2x fewer MACs, 60 s: 1e-4 reached 92.55% where 3e-4 reached 92.39% (dense 92.99%)
LATENCY_BATCHES = (1, 32)
# bytes of cached activations kept on the device, and the size of batches: 1.5 GiB keeps vit_b_16's shrink
# within 3 GB beyond the model and the data (docs/BENCHMARKS.md, engine)
DEFAULT_CALIB_MEMORY = 3 * 2 ** 29
DEFAULT_ROWS = 16  # least-squares rows per input of a layer (sampled output positions; docs/BENCHMARKS.md)
# Token positions are far less alike than a conv's neighbouring pixels: a language model's refit needs more of
# them (perplexity +16.8% at 16 rows, +11.8% at 64, +11.5% at 256 on samples/kjv_llama at ratio 0.3)
DEFAULT_TOKEN_ROWS = 64
DEFAULT_SEQ_LEN = 128  # tokens per sequence cut from a text file
DEFAULT_ATOL = 1e-4  # ONNX / pt2 parity: max |exported − PyTorch| ≤ atol + rtol · max |PyTorch|
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class Flag:
    """How the command line offers an option: its flag (or a positional argument's metavar, ``CKPT``) and help.
    ``text`` names how the value is written when not as itself (a kind of :data:`prunetool.flags.TEXT`: ``size``
    for 1.5G, ``ints`` for 1,32, ``shape``, ``json``, ...); ``negative`` is the switch that turns a yes/no option
    off (``--no-onnx``); ``short`` a one-letter spelling (``-q``)."""

    name: str
    help: str
    text: str | None = None
    negative: str | None = None
    short: str | None = None


def option(default=MISSING, flag: str | None = None, help: str = "", *, factory=MISSING, text: str | None = None,
           negative: str | None = None, short: str | None = None, api: str | None = None, parts: str | None = None):
    """A field of an option dataclass: its default, and the :class:`Flag` the command line offers it under (none:
    the command line does not offer it). ``api``: the Python API's keyword for it where that is not the field's
    name; ``parts``: the field is a dataclass of its own whose fields have flags (:data:`PARTS`)."""
    meta = {"flag": Flag(flag, help, text, negative, short) if flag else None, "api": api, "parts": parts}
    return field(default=default, default_factory=factory, metadata=meta)


def flag_of(f) -> Flag | None:
    """The :class:`Flag` of a dataclass field (None: not on the command line)."""
    return f.metadata.get("flag")


def from_keywords(cls, keywords: Mapping, **fixed):
    """``cls`` from the Python API's keyword arguments: each field from the keyword of its name (or of its ``api``
    name), a field without a keyword at its default; ``fixed`` values win."""
    given = {}
    for f in fields(cls):
        key = f.metadata.get("api") or f.name
        if f.name not in fixed and key in keywords:
            given[f.name] = keywords[key]
    return cls(**given, **fixed)


@dataclass
class Source:
    """The model to compress: a checkpoint path, an ``nn.Module`` or a loaded :class:`Checkpoint`."""

    checkpoint: object = option(flag="CKPT", help="Checkpoint: a state_dict (.pt/.pth/.safetensors, with --arch), "
                                "prunetool output, or a pickled module.", api="model")
    arch: str | None = option(None, "--arch", "Architecture as MODULE:CALLABLE, e.g. torchvision.models:resnet18.")
    arch_kwargs: dict = option(flag="--arch-kwargs", help="JSON keyword arguments for --arch, e.g. "
                               "'{\"num_classes\": 10}'.", factory=dict, text="json")
    unsafe_pickle: bool = option(False, "--unsafe-pickle", "Allow unpickling a whole nn.Module (runs code from the "
                                 "file).")
    trust_remote_code: bool = option(False, "--trust-remote-code", "Allow a Hugging Face directory's own model code "
                                     "(auto_map) to run.")


# The flags of data.Preprocessing (how an image folder's pictures become inputs), by field: data.py keeps that
# dataclass beside the transforms it drives, below this module.
PREPROCESSING = {
    "preset": Flag("--preset", "Preprocessing of an image folder by name: imagenet (resize 256, crop 224, ImageNet "
                   "mean and std)."),
    "resize": Flag("--resize", "Image folder: resize the shorter side to this many pixels."),
    "crop": Flag("--crop", "Image folder: centre crop to this many pixels."),
    "mean": Flag("--mean", "Image folder: per-channel mean to subtract, e.g. 0.485,0.456,0.406.", text="floats"),
    "std": Flag("--std", "Image folder: per-channel standard deviation to divide by, e.g. 0.229,0.224,0.225.",
                text="floats"),
}
PARTS = {"preprocessing": PREPROCESSING}  # option(parts=...): the flags of a field that is a dataclass of its own


@dataclass
class DataOptions:
    """Where calibration and evaluation samples come from."""

    data: object = option(None, "--data", "mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, an ImageFolder dir, an .npz "
                          "(images, or input_ids for token models) or a text file (.txt, tokenised for a language "
                          "model).")  # a --data spec or a Data object
    calib: int = option(1000, "--calib", "Calibration samples from the train split (fixed seed).")
    eval: int | None = option(None, "--eval", "Evaluate on this many test samples (default: all).")
    input_shape: tuple[int, ...] | None = option(None, "--input-shape", "Input shape without batch, e.g. 1,28,28 "
                                                 "(needed without --data, unless the checkpoint records it).",
                                                 text="shape")
    download: bool = option(False, "--download", "Download a torchvision dataset into ROOT if it is missing.")
    memory: int = option(DEFAULT_CALIB_MEMORY, "--calib-memory", "Memory for cached activations and batches of the "
                         "calibration passes (e.g. 512M, 4G); beyond it, caches go to a temporary file (TMPDIR) on "
                         "the CPU, or to host memory in float16 from a GPU.", text="size")
    rows: int | None = option(None, "--calib-rows", "Least-squares rows per input of a layer for compensation, drawn "
                              "as output positions of each calibration sample (default "
                              f"{DEFAULT_ROWS} for images, {DEFAULT_TOKEN_ROWS} for token sequences).")
    workers: int = option(0, "--workers", "Data-loading worker processes for image folders.")
    preprocessing: object = option(None, parts="preprocessing")  # a data.Preprocessing for image folders
    tokens: int | None = option(None, "--tokens", "Token models without --data: random sequences of this many token "
                                "ids (below the vocabulary size).")  # a structure-only run of a token model
    seq_len: int | None = option(None, "--seq-len", f"Text --data: tokens per sequence (default {DEFAULT_SEQ_LEN}).")
    tokenizer: str | None = option(None, "--tokenizer", "Text --data: the tokenizer directory (default: the model's "
                                   "Hugging Face directory).")
    output_key: str | None = option(None, "--output-key", "Which entry of a structured output (ModelOutput, dict, "
                                    "tuple) holds the logits (default: 'logits', else the first tensor).")

    def check(self) -> None:
        if self.calib < 1:
            raise UsageError(f"--calib {self.calib} must be at least 1")
        if self.tokens is not None and self.tokens < 1:
            raise UsageError(f"--tokens {self.tokens} must be at least 1 (tokens per random sequence)")
        if self.tokens is not None and self.input_shape is not None:
            raise UsageError("--tokens and --input-shape both describe random inputs; give one (--tokens for a "
                             "model that takes token ids)")
        if self.seq_len is not None and self.seq_len < 2:
            raise UsageError(f"--seq-len {self.seq_len} must be at least 2 (a token and the one it predicts)")
        if self.eval is not None and self.eval < 1:
            raise UsageError(f"--eval {self.eval} must be at least 1 (leave it out to evaluate the whole test split)")
        if self.memory < 2 ** 20:
            raise UsageError(f"--calib-memory {self.memory} bytes is too small; give at least 1 MB, e.g. 2G")
        if self.rows is not None and self.rows < 1:
            raise UsageError(f"--calib-rows {self.rows} must be at least 1")
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers} must be 0 or more")
        if self.preprocessing is not None:
            self.preprocessing.check()


KERNEL_MULTIPLE = 8  # channels ONNX Runtime's CPU convolutions keep blocked at (NCHWc; AVX-512 too: ops.ConvOp)
FIDELITY = {"agreement": "agreement", "miou": "miou", "error": "output error"}  # --fidelity → task metric


@dataclass
class Measurement:
    """What is measured before and after: accuracy and loss on the test split, and latency at these batch
    sizes (empty: no latency)."""

    evaluate: bool = option(True, api="measure")
    latency_batches: tuple[int, ...] = option(LATENCY_BATCHES, "--latency-batches", "Batch sizes at which latency is "
                                              "measured before and after.", text="ints")
    device: str = option("cpu", "--device", "Device for scoring, evaluation and latency: cpu or cuda.")
    gate_batch: int | None = None  # the batch a --min-speedup gate reads: measured again while too noisy
    # weights stay in host memory; each call onloads its own to the device (precision.Compute)
    offload: bool = option(False, "--offload", "With --device cuda: keep the weights in host memory and move each "
                           "layer's to the GPU as it runs (a model larger than the GPU; slower).")
    fidelity: str | None = option(None, "--fidelity", "Without labelled test data, how the cut model is compared with "
                                  "the dense one: agreement (top-1 of class logits), miou (argmax maps of N×C×H×W "
                                  "logits) or error (relative output error); default: by the output's shape.")

    def check(self) -> None:
        if any(b < 1 for b in self.latency_batches):
            raise UsageError(f"--latency-batches {','.join(map(str, self.latency_batches))}: batch sizes must be "
                             "at least 1")
        if self.fidelity is not None and self.fidelity not in FIDELITY:
            raise UsageError(f"--fidelity {self.fidelity!r}: choose agreement, miou or error")


@dataclass
class Outputs:
    """Files a command writes; all are staged and moved into place together once every check passed."""

    out: str | None = option(None, "--out", "Output checkpoint, .safetensors or .pt (default: <stem>.{suffix}"
                             ".safetensors beside the input); for a Hugging Face model directory, a directory "
                             "(default: <dir>.{suffix}, or <dir>.{suffix}.safetensors when its config cannot hold "
                             "the result).")  # {suffix}: the command's (flags.command)
    onnx: str | None = option(None, "--onnx", "Also export the result to ONNX here, checked against onnxruntime.")
    pt2: str | None = option(None, "--pt2", "Also export the result with torch.export here (.pt2), reloaded and "
                             "checked.")
    json: str | None = option(None, "--json", "Write the report as JSON here.")
    summary_md: str | None = option(None, "--summary-md", "Write a Markdown summary (for $GITHUB_STEP_SUMMARY) "
                                    "here.")
    atol: float = option(DEFAULT_ATOL, "--onnx-atol", "Parity of --onnx/--pt2: absolute part of the tolerance.")
    rtol: float = option(DEFAULT_RTOL, "--onnx-rtol", "Parity of --onnx/--pt2: part relative to the largest |output|; "
                         "max |exported − PyTorch| ≤ max(atol + rtol·max|y|, 4 × the model's float32 noise, measured "
                         "against float64).")
    out_fallback: str | None = None  # written instead of a Hugging Face directory ``out`` that cannot hold the cut
    inputs: dict[str, str] = field(default_factory=dict)  # more files the run reads (the options file): never written

    def paths(self) -> dict[str, str]:
        """Flag → path of every output asked for."""
        names = {"out": "--out", "onnx": "--onnx", "pt2": "--pt2", "json": "--json", "summary_md": "--summary-md"}
        return {names[k]: getattr(self, k) for k in names if getattr(self, k) is not None}

    def check(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise UsageError("--onnx-atol and --onnx-rtol must be 0 or more")


@dataclass
class Recovery:
    """What happens after each cut: BatchNorm recalibration and fine-tuning."""

    finetune_epochs: int = option(0, "--finetune-epochs", "Fine-tune this many epochs on the train split of --data "
                                  "after the cut.")
    lr: float | None = option(None, "--lr", "Learning rate (Adam or SGD): fine-tuning's (default 1e-3) and "
                              "--recover's (default 1e-4, measured better for label-free recovery).")
    batch_size: int = option(128, "--batch-size", "Fine-tuning batch size.")
    optimizer: str = option("adam", "--optimizer", "Fine-tuning optimizer: sgd (momentum 0.9) or adam.")
    distill: bool = option(False, "--distill", "Fine-tune against the original model as teacher (KL on logits + CE).")
    recover: float = option(0.0, "--recover", "Label-free recovery: train the cut model towards the original's "
                            "outputs for this many seconds, on the inputs of --data's train split (labels unread) or "
                            "the calibration samples (--lr, Adam), e.g. 60.")
    mixup: bool = option(True, "--mixup", "With --recover: train on mixtures of pairs of inputs, which the original "
                         "model labels (floating-point inputs; token ids are used as they are).", negative="--no-mixup")
    recalibrate_bn: bool | None = option(None, "--recalibrate-bn", "Re-estimate BatchNorm statistics on the "
                                         "calibration data after every cut (default: when the model has BatchNorm).",
                                         negative="--no-recalibrate-bn", api="recalibrate")

    @property
    def finetune_lr(self) -> float:
        return FINETUNE_LR if self.lr is None else self.lr

    @property
    def recover_lr(self) -> float:
        return RECOVER_LR if self.lr is None else self.lr

    def check(self) -> None:
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs {self.finetune_epochs} must be 0 or more")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr {self.lr} must be positive")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if not self.recover >= 0:
            raise UsageError(f"--recover {self.recover} must be 0 or more seconds")
        if self.distill and self.finetune_epochs < 1:
            raise UsageError("--distill needs --finetune-epochs N")


def default_criterion(compensate: str) -> str:
    """The criterion measured best with ``compensate``: obs ranks what the least-squares refit repairs, so with
    another compensation mrs."""
    return DEFAULT_CRITERION if compensate == "lstsq" else "mrs"


@dataclass
class ShrinkOptions:
    """How many units go, ranked how, and what replaces them."""

    criterion: str | None = option(None, "--criterion", "Unit score: obs (what the least-squares refit repairs "
                                   "best, greedy structured OBS; the default with --compensate lstsq), mrs (the "
                                   "default otherwise), mrp, taylor, l1, l2, fp or random.")
    ratio: float = option(0.5, "--ratio", "Fraction of units removed: from every prunable layer (--scope layer) or of "
                          "all units (--scope global), in [0, 1).")
    compensate: str = option(DEFAULT_COMPENSATION, "--compensate", "What replaces removed units: lstsq, mean or none.")
    scope: str = option("layer", "--scope", "layer: the same ratio in every layer; global: units ranked across layers "
                        "(scores normalised per layer).")
    max_layer_ratio: float = option(0.9, "--max-layer-ratio", "With --scope global or a --target-*, no layer loses "
                                    "more than this fraction.")
    target_params: float | None = option(None, "--target-params", "Pick the ratio that keeps at most this fraction of "
                                         "the parameters, e.g. 0.5.")
    target_macs: float | None = option(None, "--target-macs", "Pick the ratio that keeps at most this fraction of the "
                                       "MACs.")
    target_latency: float | None = option(None, "--target-latency", "Keep at most this fraction of the latency at "
                                          "batch 1 where the model ships: ONNX Runtime on the CPU (PyTorch eager "
                                          "with --device cuda or when it does not export), measured against the "
                                          "dense model, e.g. 0.6.")
    allocation: str | None = option(None, "--allocation", "How a --target-params/--target-macs/--target-latency is "
                                    "shared across "
                                    "layers: sensitivity (the default with a target: each layer loses what costs the "
                                    "least measured divergence after compensation) or uniform (one ratio in every "
                                    "layer).")
    round_to: int | None = option(None, "--round-to", "Keep unit counts at multiples of N (hardware-friendly widths). "
                                  "Default 1; with --target-latency, or a size target shared by sensitivity on "
                                  "convolutions, multiples of 8 (the widths ONNX Runtime's CPU convolutions run "
                                  "fastest) are measured too and kept where they do best.")
    schedule: list[float] | None = option(None, "--schedule", "Cumulative ratios pruned step by step, re-scoring each "
                                          "time, e.g. 0.1,0.2,0.4,0.6 (fine-tuning between steps).", text="ratios")
    drop_blocks: int = option(0, "--drop-blocks", "Remove this many whole residual blocks (transformer layers, CNN "
                              "blocks whose shortcut is the identity) before any unit, each time the one whose "
                              "removal moves the outputs least; --ratio 0 removes blocks alone.")
    drop_heads: int = option(0, "--drop-heads", "Remove this many attention heads (key/value groups, where heads "
                             "share them) from every attention layer, the least important by the criterion, before "
                             "the other units; at a long context the time goes with the heads kept, e.g. 1.")
    hidden: float = option(0.0, "--hidden", "Hugging Face pre-norm decoders (Llama, Mistral, Qwen2, ...): remove this "
                           "fraction of the residual stream's channels (the hidden size) through the embedding, every "
                           "norm, every projection and the head, before any unit, e.g. 0.1.")
    rotate: bool = option(True, "--rotate", "With --hidden: first turn the stream onto its principal directions "
                          "(SliceGPT's rotation, one for the whole model) so that those removed carry the least "
                          "energy; --no-rotate removes the channels of least energy as they are.",
                          negative="--no-rotate")
    axes: tuple[str, ...] | None = option(None, "--axes", "What a --target-params/--target-macs/--target-latency may "
                                          "remove: units "
                                          "(neurons, channels, heads; the default), blocks (whole residual blocks), "
                                          "hidden (the hidden size, as --hidden), heads (attention heads in every "
                                          "layer, as --drop-heads) or several, e.g. units,blocks,hidden: how many "
                                          "blocks, heads and how much of the hidden size go is then chosen by "
                                          "measuring cuts on held-out calibration samples, units filling the rest.",
                                          text="names")
    drop_experts: float = option(0.0, "--drop-experts", "Mixture-of-experts models: fraction of each block's experts "
                                 "removed, those the calibration data routes least to (the same number in every "
                                 "block, never below its top-k).")
    free_widths: bool = option(False, "--free-widths", "Hugging Face input: cut every layer to its own unit count, "
                               "without rounding head and MLP counts to ones the family's config holds (the same in "
                               "every layer, heads that divide the width); written as prunetool's own file, which "
                               "from_pretrained cannot read.")

    def __post_init__(self):
        if self.criterion is None:
            self.criterion = default_criterion(self.compensate)

    @property
    def targeted(self) -> bool:
        """Whether a size or latency target picks what goes (rather than ``ratio``)."""
        return any(t is not None for t in (self.target_params, self.target_macs, self.target_latency))

    @property
    def measured(self) -> str:
        """The flags given by which what goes is decided by measuring the model (whole blocks, experts, timings),
        which a dry run does not do; empty when none is."""
        return " and ".join(flag for flag, given in (
            ("--drop-blocks", self.drop_blocks > 0), ("--drop-experts", self.drop_experts > 0),
            ("--drop-heads", self.drop_heads > 0),
            ("--hidden", self.hidden > 0),
            ("--target-latency", self.target_latency is not None), ("--axes blocks", self.plans_blocks),
            ("--axes hidden", self.plans_hidden), ("--axes heads", self.plans_heads)) if given)

    @property
    def plans_blocks(self) -> bool:
        """Whether the number of whole blocks removed is chosen by measurement (``--axes`` names blocks)."""
        return "blocks" in (self.axes or ())

    @property
    def plans_hidden(self) -> bool:
        """Whether the fraction of the hidden size removed is chosen by measurement (``--axes`` names hidden)."""
        return "hidden" in (self.axes or ())

    @property
    def plans_heads(self) -> bool:
        """Whether the attention heads removed from every layer are counted by measurement (``--axes`` names
        heads)."""
        return "heads" in (self.axes or ())

    @property
    def plans(self) -> bool:
        """Whether ``--axes`` asks for a plan (anything beside units)."""
        return self.plans_blocks or self.plans_hidden or self.plans_heads

    @property
    def rounding(self) -> int:
        """The multiple unit counts are kept at (``--round-to``, default 1)."""
        return self.round_to or 1

    @property
    def roundings(self) -> tuple[int, ...]:
        """The multiples a target may measure: the one given; without ``--round-to``, 1 and :data:`KERNEL_MULTIPLE`
        (widths the kernels like: at one latency they keep more; at one size they can diverge less, and they run
        faster where the model ships) under an allocation, and under a latency with one ratio (a size target
        measures the further one only where some group's kernels block channels by it)."""
        if self.round_to is not None or not (self.allocating or (self.target_latency is not None and
                                                                 not self.schedule)):
            return (self.rounding,)
        return (1, KERNEL_MULTIPLE)

    @property
    def allocating(self) -> bool:
        """Whether the units removed per layer come from :mod:`prunetool.allocate` (a target, no schedule)."""
        return self.targeted and not self.schedule and (self.allocation or "sensitivity") == "sensitivity"

    def check(self) -> None:
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.compensate not in COMPENSATIONS:
            raise UsageError(f"unknown compensation {self.compensate!r}; choose one of {', '.join(COMPENSATIONS)}")
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio} is outside [0, 1); give the fraction of units to remove, e.g. 0.5")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown scope {self.scope!r}; choose layer or global")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise UsageError(f"--max-layer-ratio {self.max_layer_ratio} is outside (0, 1)")
        targets = (("--target-params", self.target_params), ("--target-macs", self.target_macs),
                   ("--target-latency", self.target_latency))
        for flag, value in targets:
            if value is not None and not 0.0 < value <= 1.0:
                raise UsageError(f"{flag} {value} is outside (0, 1]; give the fraction of the original to keep, "
                                 "e.g. 0.5")
        given = [flag for flag, value in targets if value is not None]
        if len(given) > 1:
            raise UsageError(f"give one target, not {' and '.join(given)}")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to} must be a positive integer")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r}; choose sensitivity or uniform")
        if self.allocation is not None and not self.targeted:
            raise UsageError(f"--allocation {self.allocation} shares a target across layers: give --target-params, "
                             "--target-macs or --target-latency (--ratio removes the same fraction everywhere)")
        if self.allocation == "sensitivity" and self.schedule:
            raise UsageError("--allocation sensitivity does not combine with --schedule; drop one")
        if self.drop_blocks < 0:
            raise UsageError(f"--drop-blocks {self.drop_blocks} must be 0 or more (a number of blocks)")
        if self.drop_heads < 0:
            raise UsageError(f"--drop-heads {self.drop_heads} must be 0 or more (heads per attention layer)")
        if self.axes is not None:
            self._check_axes()
        if not 0.0 <= self.hidden < 1.0:
            raise UsageError(f"--hidden {self.hidden} is outside [0, 1); give the fraction of the hidden size to "
                             "remove, e.g. 0.1")
        if not 0.0 <= self.drop_experts < 1.0:
            raise UsageError(f"--drop-experts {self.drop_experts} is outside [0, 1); give the fraction of experts to "
                             "remove, e.g. 0.25")
        if self.schedule is not None:
            steps = self.schedule
            if not steps or any(not 0.0 <= r < 1.0 for r in steps) or steps != sorted(steps):
                raise UsageError(f"--schedule {','.join(map(str, steps))} must be increasing ratios in [0, 1)")

    def _check_axes(self) -> None:
        given = ",".join(self.axes)
        unknown = [a for a in self.axes if a not in AXES]
        if unknown or not self.axes:
            raise UsageError(f"--axes {given}: {'unknown axis ' + unknown[0] if unknown else 'no axis'}; give units, "
                             "blocks, hidden, heads or several, e.g. units,blocks,hidden")
        if not self.plans:
            return
        if not self.targeted:
            raise UsageError(f"--axes {given} chooses how many blocks, heads or how much of the hidden size go to meet "
                             "--target-params, --target-macs or --target-latency; give one of them (or --drop-blocks "
                             "N, --hidden F)")
        if self.target_latency is not None and "units" not in self.axes:
            raise UsageError(f"--axes {given} with --target-latency: units meet the latency beside what else the plan "
                             f"removes; add units (--axes units,{given}), or give --target-params")
        if self.plans_hidden and "units" not in self.axes:
            raise UsageError(f"--axes {given}: the hidden size is chosen against units filling the rest of the "
                             "target; add units (e.g. --axes units,hidden), or give --hidden F")
        if self.plans_heads and "units" not in self.axes:
            raise UsageError(f"--axes {given}: the heads are counted against units filling the rest of the target; "
                             "add units (e.g. --axes units,heads), or give --drop-heads N")
        if self.drop_heads and self.plans_heads:
            raise UsageError(f"--axes {given} counts the heads itself; drop --drop-heads {self.drop_heads}, or heads "
                             "from --axes")
        if self.drop_blocks and self.plans_blocks:
            raise UsageError(f"--axes {given} chooses the number of blocks itself; drop --drop-blocks "
                             f"{self.drop_blocks}, or --axes")
        if self.hidden:
            raise UsageError(f"--axes {given} does not combine with --hidden {self.hidden:g}; add hidden to --axes "
                             "(with units) to choose it, or drop one" if not self.plans_hidden else
                             f"--axes {given} chooses the hidden size itself; drop --hidden {self.hidden:g}, or hidden "
                             "from --axes")
        if self.drop_experts or self.schedule:
            raise UsageError(f"--axes {given} does not combine with --drop-experts or --schedule yet; drop one")


DEFAULT_MAX_LAYER_ERROR = 0.02  # lowrank's default cap on a layer's relative output error (docs/BENCHMARKS.md)
DEFAULT_HOLD = 0.5  # points of calibration accuracy lowrank's default rule keeps, with labelled data
SEARCHES = ("allocate", "greedy")


@dataclass
class LowrankOptions:
    """Which layers are factored and at which rank.

    The rule: a fixed ``rank``, an ``energy`` share, Heitmann's plain elbow (``raw_elbow``), a budget
    (``target_params``, ``target_macs``, ``max_drop``: ranks chosen across layers together), or by default (and
    with ``elbow``) the elbow of each layer's spectrum (whitened by its inputs when there is data) capped so that
    no layer loses more than ``max_layer_error`` of its output energy, and with labelled data raised where needed
    to hold the calibration accuracy within :data:`DEFAULT_HOLD` points. ``data_aware=None``: whitened whenever
    there is data.
    """

    rank: int | None = option(None, "--rank", "Factor every chosen layer at this rank.")
    energy: float | None = option(None, "--energy", "Smallest rank keeping this fraction of Σσ², e.g. 0.9.")
    layers: str | None = option(None, "--layers", "Comma-separated globs of layer names (default: every Linear and "
                                "Conv2d but the output heads, which are factored only when named exactly).")
    data_aware: bool | None = option(None, "--data-aware", "Factor W·C^½ (C: calibration input covariance) instead "
                                     "of W (default: with --data).", negative="--no-data-aware")
    max_drop: float | None = option(None, "--max-drop", "Search the lowest ranks keeping the calibration accuracy "
                                    "within this many points, and hold the test accuracy drop to it as a budget "
                                    "(needs --data).")
    elbow: bool = option(False, "--elbow", "The elbow of each layer's residual curve, the default rule: on the "
                         "spectrum whitened by --data, capped by --max-layer-error, held within 0.5 points of the "
                         "calibration accuracy when --data has labels.")
    raw_elbow: bool = option(False, "--raw-elbow", "Heitmann's plain elbow of each layer's weight spectrum, uncapped "
                             "and without the data (the paper's rule; it can cost accuracy).")
    target_params: float | None = option(None, "--target-params", "Ranks chosen across layers together to keep at "
                                         "most this fraction of the parameters, e.g. 0.5.")
    target_macs: float | None = option(None, "--target-macs", "Ranks chosen across layers together to keep at most "
                                       "this fraction of the MACs.")
    max_layer_error: float = option(DEFAULT_MAX_LAYER_ERROR, "--max-layer-error", "Default rule: the elbow, raised "
                                    "until a layer loses at most this share of its output energy (measured on the "
                                    "calibration data).")
    search: str = option("allocate", "--search", "How a budget chooses ranks: allocate (one sensitivity pass, few "
                         "evaluations) or greedy (AIMET's per-layer candidates, for comparison).")

    @property
    def method(self) -> str:
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        if self.raw_elbow:
            return "elbow"
        if self.target_params is not None or self.target_macs is not None or self.max_drop is not None:
            return "budget"
        return "auto"

    def check(self) -> None:
        given = [f for f, v in (("--rank", self.rank), ("--energy", self.energy), ("--elbow", self.elbow or None),
                                ("--raw-elbow", self.raw_elbow or None), ("--target-params", self.target_params),
                                ("--target-macs", self.target_macs)) if v is not None]
        if len(given) > 1:
            raise UsageError(f"give one of --rank, --energy, --elbow, --raw-elbow, --target-params and "
                             f"--target-macs, not {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank {self.rank} must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"--energy {self.energy} is outside (0, 1]; e.g. 0.9 keeps 90% of Σσ²")
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"--max-drop {self.max_drop} must be 0 or more percentage points")
        for flag, value in (("--target-params", self.target_params), ("--target-macs", self.target_macs)):
            if value is not None and not 0.0 < value <= 1.0:
                raise UsageError(f"{flag} {value} is outside (0, 1]; give the fraction of the original to keep, "
                                 "e.g. 0.5")
        if not 0.0 < self.max_layer_error < 1.0:
            raise UsageError(f"--max-layer-error {self.max_layer_error} is outside (0, 1); e.g. 0.05 lets a layer "
                             "lose 5% of its output energy")
        if self.search not in SEARCHES:
            raise UsageError(f"unknown --search {self.search!r}; choose allocate or greedy")


PLANS = ("shrink", "lowrank", "shrink+lowrank", "lowrank+shrink")


@dataclass
class CompressOptions:
    """One budget for shrink and lowrank together: each plan reaches it (two steps split it evenly), the best
    calibration accuracy within ``max_drop`` wins."""

    target_params: float | None = option(None, "--target-params", "Keep at most this fraction of the parameters, "
                                         "e.g. 0.5.")
    target_macs: float | None = option(None, "--target-macs", "Keep at most this fraction of the MACs, e.g. 0.5.")
    max_drop: float | None = option(None, "--max-drop", "Choose among the plans within this calibration accuracy "
                                    "drop, and hold the test drop to it as a budget.")
    plans: tuple[str, ...] = option(PLANS, "--plans", "The plans tried (each reaches the target; two steps split it "
                                    "evenly).", text="names")

    def check(self) -> None:
        if (self.target_params is None) == (self.target_macs is None):
            raise UsageError("compress needs one of --target-params and --target-macs, e.g. --target-macs 0.5")
        value = self.target_params if self.target_params is not None else self.target_macs
        if not 0.0 < value < 1.0:
            raise UsageError(f"--target-{'params' if self.target_params is not None else 'macs'} {value} is outside "
                             "(0, 1); give the fraction of the original to keep, e.g. 0.5")
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"--max-drop {self.max_drop} must be 0 or more percentage points")
        unknown = [p for p in self.plans if p not in PLANS]
        if unknown or not self.plans:
            raise UsageError(f"--plans {','.join(self.plans)}: choose among {', '.join(PLANS)}")


@dataclass
class SparsifyOptions:
    """Iterative magnitude pruning: the share of weights pruned per round, the rounds, rewinding."""

    imp: float = option(0.3, "--imp", "Fraction of each layer's remaining weights pruned per round.")
    rounds: int = option(3, "--rounds", "Pruning rounds.")
    finetune_epochs: int = option(1, "--finetune-epochs", "Retraining epochs after each round.")
    rewind: bool = option(False, "--rewind", "Rewind surviving weights to those after the first round's retraining.")

    def check(self) -> None:
        if not 0.0 < self.imp < 1.0:
            raise UsageError(f"--imp {self.imp} is outside (0, 1); e.g. 0.3 prunes 30% of the remaining weights per "
                             "round")
        if self.rounds < 1:
            raise UsageError(f"--rounds {self.rounds} must be at least 1")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs {self.finetune_epochs} must be 0 or more")


@dataclass
class Budgets:
    """What a CI step demands; a missed budget exits 1 (the outputs are still written)."""

    max_drop: float | None = option(None, "--max-drop", "Budget: accuracy drop in percentage points (without labels: "
                                    "of agreement with the dense model).")
    min_speedup: float | None = option(None, "--min-speedup", "Budget: measured latency speed-up at --speedup-batch "
                                       "must reach this.")
    speedup_batch: int = option(1, "--speedup-batch", "Batch size at which --min-speedup is measured.")
    max_params: float | None = option(None, "--max-params", "Budget: parameters after, as a count (> 1) or a fraction "
                                      "of the original (≤ 1).")

    def check(self) -> None:
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"--max-drop {self.max_drop} must be 0 or more percentage points")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise UsageError(f"--min-speedup {self.min_speedup} must be positive, e.g. 1.5")
        if self.speedup_batch < 1:
            raise UsageError(f"--speedup-batch {self.speedup_batch} must be at least 1")
        if self.max_params is not None and not self.max_params > 0:
            raise UsageError(f"--max-params {self.max_params} must be positive: a count, or a fraction ≤ 1")


@dataclass
class BenchOptions:
    """What ``bench`` times, and how often."""

    paths: list[str] = option(flag="CKPT...", help="Checkpoints to compare; ratios are to the first.")
    batch_sizes: tuple[int, ...] = option(LATENCY_BATCHES, "--batch-sizes", "Comma-separated batch sizes.",
                                          text="ints")
    threads: int | None = option(None, "--threads", "Intra-op threads for PyTorch and onnxruntime.")
    onnx: bool = option(True, "--onnx", "Also time onnxruntime (CPU).", negative="--no-onnx")
    warmup: int = option(5, "--warmup", "Untimed runs first.")
    runs: int = option(50, "--runs", "Timed runs of each checkpoint at most, in up to 7 alternating rounds (about 1 s "
                       "per checkpoint); a speed-up is the median of paired rounds (onnxruntime: of the best of 7 "
                       "fresh sessions, one a round), marked noisy when they disagree by over ±20%.")
    output_key: str | None = option(None, "--output-key", "Which entry of a structured output the ONNX export keeps "
                                    "(default: 'logits', else the first tensor); unused with --no-onnx.")


@dataclass
class InspectOptions:
    """The pictures ``inspect`` draws, and where they go."""

    html: str | None = option(None, "--html", "Write one self-contained HTML page with every picture.")
    plots: str | None = option(None, "--plots", "Write the pictures as PNG files into this folder.")


@dataclass
class CommandLine:
    """Switches of the command line alone (the Python API says the same with ``progress=``, ``latency_batches=()``
    and :func:`prunetool.plan`)."""

    quiet: bool = option(False, "--quiet", "No progress bars and no tables; print the summary line.", short="-q")
    no_progress: bool = option(False, "--no-progress", "No progress bars and no colour, even on a terminal.")
    no_latency: bool = option(False, "--no-latency", "Do not measure latency.")
    dry_run: bool = option(False, "--dry-run", "Print the groups found, what is protected and why, and the size each "
                           "ratio would give; write nothing but --json.")
