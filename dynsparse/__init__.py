"""dynsparse: parameter-efficient training by dynamic sparse reparameterization.

A few lines turn any model and optimizer into DSR (or SET, DeepR, static sparse) training::

    from dynsparse import DSR, Sparsifier
    sparsifier = Sparsifier(model, optimizer, policy=DSR(n_prune=600), densities=0.1)
    ...
    loss.backward()
    sparsifier.before_optimizer_step()
    optimizer.step()
    sparsifier.step()
"""
from __future__ import annotations

__version__ = "0.1.0"

from dynsparse.errors import DynsparseError
from dynsparse.models import create_model, sparse_parameter_names
from dynsparse.sparse import DSR, SET, DeepR, Sparsifier, Static, create_policy

__all__ = ["DSR", "SET", "DeepR", "DynsparseError", "Sparsifier", "Static", "__version__", "create_model",
           "create_policy", "sparse_parameter_names"]
