"""One small file per policy; each overrides only the steps of the drop-and-grow base that differ,
and registers itself with ``@register_policy`` (``registry.py``).

The import order below is the registration order, which is the report's order of methods: the
paper's (pruning, DSR), the successors that score growth (RigL, SNFS, MEST), then SET, DeepR and
static sparsity. A method imported elsewhere (a user's plugin) registers after these.
"""
# isort: off
from dynsparse.sparse.policies import pruning, dsr, rigl, snfs, mest, set, deepr, static  # noqa: F401
# isort: on
