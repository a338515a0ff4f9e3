"""Static sparse: a fixed random mask for the whole of training."""
from __future__ import annotations

from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.sparsifier import Policy
from dynsparse.sparse.when import Never


@register_policy("static", help="static sparse: a fixed random mask", schedule="never")
class Static(Policy):
    when = Never()
