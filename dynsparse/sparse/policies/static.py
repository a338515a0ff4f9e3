"""Static sparse: a fixed random mask for the whole of training."""
from __future__ import annotations

from dynsparse.sparse.sparsifier import Policy
from dynsparse.sparse.when import Never


class Static(Policy):
    when = Never()
