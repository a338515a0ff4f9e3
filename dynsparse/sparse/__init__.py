"""The sparse reparameterization engine: masks, policies and the sparsifier that binds them."""
from dynsparse.sparse.masks import SparseParam
from dynsparse.sparse.policies import DSR, POLICIES, SET, DeepR, Static, allocate, create_policy
from dynsparse.sparse.sparsifier import Policy, RewireEvent, Sparsifier

__all__ = ["DSR", "POLICIES", "SET", "DeepR", "Policy", "RewireEvent", "SparseParam", "Sparsifier",
           "Static", "allocate", "create_policy"]
