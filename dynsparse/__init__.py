"""dynsparse: parameter-efficient training by dynamic sparse reparameterization."""
from __future__ import annotations

__version__ = "0.1.0"

from dynsparse.errors import DynsparseError

__all__ = ["DynsparseError", "__version__"]
