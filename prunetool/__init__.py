"""prunetool: make trained PyTorch models physically smaller and faster, and prove it."""

__version__ = "0.2.0"

from . import layers  # noqa: E402
from .commands.bench import bench  # noqa: E402
from .commands.compress import compress  # noqa: E402
from .commands.export import export  # noqa: E402
from .commands.inspect import inspect  # noqa: E402
from .commands.lowrank import lowrank  # noqa: E402
from .commands.shrink import plan, shrink  # noqa: E402
from .commands.sparsify import sparsify  # noqa: E402
from .load import Checkpoint, load, save  # noqa: E402

__all__ = ["shrink", "plan", "lowrank", "compress", "sparsify", "inspect", "export", "bench", "load", "save",
           "Checkpoint",
           "layers", "__version__"]
