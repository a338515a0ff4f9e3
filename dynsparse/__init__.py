"""dynsparse: parameter-efficient training by dynamic sparse reparameterization.

A few lines turn any model and optimizer into DSR (or SET, DeepR, RigL, SNFS, static sparse,
gradual pruning) training::

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
from dynsparse.sparse import (BUDGETS, DSR, POLICIES, SET, SNFS, AtEpochEnds, DeepR, DropGrow, EveryStep,
                              GradualPruning, MEST, Never, Periodic, Policy, RigL, Sparsifier, Static, When, create_policy,
                              erk_densities, make_densities, register_policy)

__all__ = ["AtEpochEnds", "BUDGETS", "DSR", "DeepR", "DropGrow", "DynsparseError", "EveryStep", "GradualPruning",
           "MEST", "Never", "POLICIES", "Periodic", "Policy", "RigL", "SET", "SNFS", "Sparsifier", "Static", "When",
           "__version__", "create_model", "create_policy", "erk_densities", "make_densities", "register_policy",
           "sparse_parameter_names"]
