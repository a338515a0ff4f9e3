"""The sparse reparameterization engine: masks, budgets, policies and the sparsifier that binds them.

Registered policies (``create_policy(name, **kwargs)``): static, dsr, set, deepr, rigl, snfs, prune.
"""
from dynsparse.errors import unknown_choice
from dynsparse.sparse.budget import BUDGETS, erk_densities, make_densities
from dynsparse.sparse.masks import SparseParam
from dynsparse.sparse.policies import DSR, SET, DeepR, Static, allocate
from dynsparse.sparse.pruning import GradualPruning
from dynsparse.sparse.sparsifier import Policy, RewireEvent, Sparsifier
from dynsparse.sparse.successors import SNFS, RigL

POLICIES: dict[str, type[Policy]] = {"static": Static, "dsr": DSR, "set": SET, "deepr": DeepR, "rigl": RigL,
                                     "snfs": SNFS, "prune": GradualPruning}


def create_policy(name: str, **kwargs) -> Policy:
    """A policy by name; unknown names raise with the sorted valid names."""
    if name not in POLICIES:
        raise unknown_choice("method", name, POLICIES)
    return POLICIES[name](**kwargs)


__all__ = ["BUDGETS", "DSR", "POLICIES", "SET", "SNFS", "DeepR", "GradualPruning", "Policy", "RewireEvent", "RigL",
           "SparseParam", "Sparsifier", "Static", "allocate", "create_policy", "erk_densities", "make_densities"]
