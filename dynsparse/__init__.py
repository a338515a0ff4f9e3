"""dynsparse: parameter-efficient training by dynamic sparse reparameterization.

One line turns any model and optimizer into DSR (or SET, DeepR, RigL, SNFS, MEST, static
sparse, gradual pruning) training; the loop that calls ``optimizer.step()`` stays as it is::

    from dynsparse import RigL, Sparsifier
    sparsifier = Sparsifier(model, optimizer, policy=RigL(), densities=0.1, total_steps=steps)
"""
from __future__ import annotations

__version__ = "0.1.0"

from dynsparse.errors import DynsparseError
from dynsparse.models import create_model, sparse_parameter_names
from dynsparse.sparse import (
    BUDGETS,
    DSR,
    MEST,
    POLICIES,
    SET,
    SNFS,
    AtEpochEnds,
    DeepR,
    DropGrow,
    EveryStep,
    GradualPruning,
    Never,
    Periodic,
    Policy,
    RigL,
    Sparsifier,
    Static,
    When,
    create_policy,
    erk_densities,
    make_densities,
    register_policy,
    select_weights,
    to_csr,
)
from dynsparse.sparse.inference import sparse_inference
from dynsparse.training.deploy import export_run, load_model, load_sparse

__all__ = ["AtEpochEnds", "BUDGETS", "DSR", "DeepR", "DropGrow", "DynsparseError", "EveryStep", "GradualPruning",
           "MEST", "Never", "POLICIES", "Periodic", "Policy", "RigL", "SET", "SNFS", "Sparsifier", "Static", "When",
           "__version__", "create_model", "create_policy", "erk_densities", "export_run", "load_model",
           "load_sparse", "make_densities", "register_policy", "select_weights", "sparse_inference",
           "sparse_parameter_names", "to_csr"]
