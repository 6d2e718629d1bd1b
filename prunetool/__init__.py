"""prunetool: make trained PyTorch models physically smaller and faster, and prove it."""

__version__ = "0.1.0"

from .api import plan, shrink  # noqa: E402
from .bench import bench  # noqa: E402
from .load import Checkpoint, load, save  # noqa: E402
from .lowrank import lowrank  # noqa: E402
from .redundancy import inspect  # noqa: E402
from .sparsify import sparsify  # noqa: E402

__all__ = ["shrink", "plan", "lowrank", "sparsify", "inspect", "bench", "load", "save", "Checkpoint", "__version__"]
