"""The sparse reparameterization engine: masks, budgets, policies and the sparsifier that binds them.

Layers: ``storage/`` (the storage protocol and its masked, sharded and CSR implementations;
``storage.build`` makes one per tensor, ``storage.convert``'s ``to_csr`` is the one place where
modules are swapped for CSR storage), ``layers/`` (the CSR modules), ``kernels/`` (compiled CPU
kernels), ``when`` (when the topology changes), ``policy`` and ``dropgrow`` (the policy contract
and the drop-allocate-grow base), ``policies/`` (one small file per method), ``budget`` and
``select`` (which tensors, at which density), ``draws`` (the random sampler), ``sparsifier``
(binds model, optimizer and policy), ``attach`` (its optimizer and gradient hooks), ``export``
(summary, masked state_dict, sparse tensors). Nothing here imports the models,
the configuration, the command line or the loop.

``POLICIES`` is the library's view of the one registry of methods (``policies/registry.py``):
each policy class registers itself with ``@register_policy``, and ``create_policy(name, ...)``,
the command line's methods and flags (``dynsparse.training.engine_adapter``) and the report's order derive from it.
"""
from dynsparse.sparse.budget import BUDGETS, erk_densities, make_densities
from dynsparse.sparse.dropgrow import DropGrow, allocate, cosine_fraction
from dynsparse.sparse.policies.deepr import DeepR
from dynsparse.sparse.policies.dsr import DSR
from dynsparse.sparse.policies.mest import MEST
from dynsparse.sparse.policies.pruning import GradualPruning
from dynsparse.sparse.policies.registry import POLICIES, REGISTRY, PolicySpec, create_policy, register_policy
from dynsparse.sparse.policies.rigl import RigL
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policies.snfs import SNFS
from dynsparse.sparse.policies.static import Static
from dynsparse.sparse.policy import Context, Needs, Policy, RewireEvent
from dynsparse.sparse.select import aliases, select_weights
from dynsparse.sparse.sparsifier import Sparsifier
from dynsparse.sparse.storage import SparseStorage
from dynsparse.sparse.storage.convert import to_csr
from dynsparse.sparse.storage.masked import SparseParam, count_for_density, keep_one
from dynsparse.sparse.when import AtEpochEnds, EveryStep, Never, Periodic, When

__all__ = ["AtEpochEnds", "BUDGETS", "Context", "DSR", "DeepR", "DropGrow", "EveryStep", "GradualPruning", "MEST",
           "Needs", "Never", "POLICIES", "Periodic", "Policy", "PolicySpec", "REGISTRY", "RewireEvent", "RigL",
           "SET", "SNFS", "SparseParam", "SparseStorage", "Sparsifier", "Static", "When",
           "aliases", "allocate", "cosine_fraction", "count_for_density", "create_policy",
           "erk_densities", "keep_one", "make_densities", "register_policy", "select_weights", "to_csr"]
