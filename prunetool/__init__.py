"""prunetool: make trained PyTorch models physically smaller and faster, and prove it."""

__version__ = "0.1.0"

from .api import shrink  # noqa: E402
from .load import Checkpoint, load, save  # noqa: E402

__all__ = ["shrink", "load", "save", "Checkpoint", "__version__"]
