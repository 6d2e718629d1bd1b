"""prunetool: make trained PyTorch models physically smaller and faster, and prove it."""

from .version import __version__

from . import layers, ops
from .commands.bench import bench
from .commands.compress import compress
from .commands.export import export
from .commands.inspect import inspect
from .commands.lowrank import lowrank
from .commands.shrink import plan, shrink
from .commands.sparsify import sparsify
from .load import Checkpoint, load, save

__all__ = ["shrink", "plan", "lowrank", "compress", "sparsify", "inspect", "export", "bench", "load", "save",
           "Checkpoint",
           "layers", "ops", "__version__"]
