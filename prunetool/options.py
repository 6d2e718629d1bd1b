"""Options grouped as the CLI and the Python API share them: one small dataclass per concern.

The CLI fills these from flags (and config files); ``prunetool.shrink(...)`` and the other API functions fill
them from keyword arguments. ``check()`` refuses a nonsensical value with a one-line :class:`UsageError` that
names the flag and the fix, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError

DEFAULT_CRITERION = "mrs"
DEFAULT_COMPENSATION = "lstsq"
CRITERIA = ("mrs", "mrp", "taylor", "l1", "l2", "fp", "random")
DATA_CRITERIA = ("mrs", "mrp", "taylor")
COMPENSATIONS = ("mean", "lstsq", "none")
SCOPES = ("layer", "global")
OPTIMIZERS = ("sgd", "adam")
LATENCY_BATCHES = (1, 32)
# bytes of cached activations kept on the device, and the size of batches: 1.5 GiB keeps vit_b_16's shrink
# within 3 GB beyond the model and the data (docs/BENCHMARKS.md, engine)
DEFAULT_CALIB_MEMORY = 3 * 2 ** 29
DEFAULT_ROWS = 16  # least-squares rows per input of a layer (sampled output positions; docs/BENCHMARKS.md)
# Token positions are far less alike than a conv's neighbouring pixels: a language model's refit needs more of
# them (perplexity +16.8% at 16 rows, +11.8% at 64, +11.5% at 256 on samples/kjv_llama at ratio 0.3)
DEFAULT_TOKEN_ROWS = 64
DEFAULT_ATOL = 1e-4  # ONNX / pt2 parity: max |exported − PyTorch| ≤ atol + rtol · max |PyTorch|
DEFAULT_RTOL = 1e-4


@dataclass
class Source:
    """The model to compress: a checkpoint path, an ``nn.Module`` or a loaded :class:`Checkpoint`."""

    checkpoint: object
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    unsafe_pickle: bool = False
    trust_remote_code: bool = False  # a Hugging Face directory's own model code may run


@dataclass
class DataOptions:
    """Where calibration and evaluation samples come from."""

    data: object = None  # a --data spec or a Data object
    calib: int = 1000
    eval: int | None = None
    input_shape: tuple[int, ...] | None = None
    download: bool = False
    memory: int = DEFAULT_CALIB_MEMORY
    rows: int | None = None  # None: DEFAULT_ROWS for images, DEFAULT_TOKEN_ROWS for token sequences
    workers: int = 0
    preprocessing: object = None  # a data.Preprocessing for image folders
    tokens: int | None = None  # structure-only run of a token model: sequences of this many random ids
    seq_len: int | None = None  # tokens per sequence cut from a text file
    tokenizer: str | None = None  # the directory of the tokenizer for a text file (default: the model's directory)
    output_key: str | None = None  # the entry of a structured output that holds the logits

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


@dataclass
class Measurement:
    """What is measured before and after: accuracy and loss on the test split, and latency at these batch
    sizes (empty: no latency)."""

    evaluate: bool = True
    latency_batches: tuple[int, ...] = LATENCY_BATCHES
    device: str = "cpu"
    gate_batch: int | None = None  # the batch a --min-speedup gate reads: measured again while too noisy
    offload: bool = False  # weights stay in host memory; each call onloads its own to the device (precision.Compute)

    def check(self) -> None:
        if any(b < 1 for b in self.latency_batches):
            raise UsageError(f"--latency-batches {','.join(map(str, self.latency_batches))}: batch sizes must be "
                             "at least 1")


@dataclass
class Outputs:
    """Files a command writes; all are staged and moved into place together once every check passed."""

    out: str | None = None
    onnx: str | None = None
    pt2: str | None = None
    json: str | None = None
    summary_md: str | None = None
    atol: float = DEFAULT_ATOL  # parity of --onnx / --pt2 with PyTorch
    rtol: float = DEFAULT_RTOL
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

    finetune_epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"
    distill: bool = False
    recalibrate_bn: bool | None = None  # None: when the model has BatchNorm

    def check(self) -> None:
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs {self.finetune_epochs} must be 0 or more")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr} must be positive")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if self.distill and self.finetune_epochs < 1:
            raise UsageError("--distill needs --finetune-epochs N")


@dataclass
class ShrinkOptions:
    """How many units go, ranked how, and what replaces them."""

    criterion: str = DEFAULT_CRITERION
    ratio: float = 0.5
    compensate: str = DEFAULT_COMPENSATION
    scope: str = "layer"
    max_layer_ratio: float = 0.9
    target_params: float | None = None
    target_macs: float | None = None
    round_to: int = 1
    schedule: list[float] | None = None

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
        for flag, value in (("--target-params", self.target_params), ("--target-macs", self.target_macs)):
            if value is not None and not 0.0 < value <= 1.0:
                raise UsageError(f"{flag} {value} is outside (0, 1]; give the fraction of the original to keep, "
                                 "e.g. 0.5")
        if self.target_params is not None and self.target_macs is not None:
            raise UsageError("give one of --target-params and --target-macs, not both")
        if self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to} must be a positive integer")
        if self.schedule is not None:
            steps = self.schedule
            if not steps or any(not 0.0 <= r < 1.0 for r in steps) or steps != sorted(steps):
                raise UsageError(f"--schedule {','.join(map(str, steps))} must be increasing ratios in [0, 1)")


DEFAULT_MAX_LAYER_ERROR = 0.02  # lowrank's default cap on a layer's relative output error (docs/BENCHMARKS.md)
SEARCHES = ("allocate", "greedy")


@dataclass
class LowrankOptions:
    """Which layers are factored and at which rank.

    The rule: a fixed ``rank``, an ``energy`` share, Heitmann's plain ``elbow``, a budget (``target_params``,
    ``target_macs``, ``max_drop``: ranks chosen across layers together), or by default the elbow of each layer's
    spectrum (whitened by its inputs when there is data) capped so that no layer loses more than
    ``max_layer_error`` of its output energy. ``data_aware=None``: whitened whenever there is data.
    """

    rank: int | None = None
    energy: float | None = None
    layers: str | None = None
    data_aware: bool | None = None
    max_drop: float | None = None
    elbow: bool = False
    target_params: float | None = None
    target_macs: float | None = None
    max_layer_error: float = DEFAULT_MAX_LAYER_ERROR
    search: str = "allocate"

    @property
    def method(self) -> str:
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        if self.elbow:
            return "elbow"
        if self.target_params is not None or self.target_macs is not None or self.max_drop is not None:
            return "budget"
        return "auto"

    def check(self) -> None:
        given = [f for f, v in (("--rank", self.rank), ("--energy", self.energy), ("--elbow", self.elbow or None),
                                ("--target-params", self.target_params), ("--target-macs", self.target_macs))
                 if v is not None]
        if len(given) > 1:
            raise UsageError(f"give one of --rank, --energy, --elbow, --target-params and --target-macs, not "
                             f"{' and '.join(given)}")
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

    target_params: float | None = None
    target_macs: float | None = None
    max_drop: float | None = None
    plans: tuple[str, ...] = PLANS

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

    imp: float = 0.3
    rounds: int = 3
    finetune_epochs: int = 1
    rewind: bool = False

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

    max_drop: float | None = None
    min_speedup: float | None = None
    speedup_batch: int = 1
    max_params: float | None = None

    def check(self) -> None:
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"--max-drop {self.max_drop} must be 0 or more percentage points")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise UsageError(f"--min-speedup {self.min_speedup} must be positive, e.g. 1.5")
        if self.speedup_batch < 1:
            raise UsageError(f"--speedup-batch {self.speedup_batch} must be at least 1")
        if self.max_params is not None and not self.max_params > 0:
            raise UsageError(f"--max-params {self.max_params} must be positive: a count, or a fraction ≤ 1")
