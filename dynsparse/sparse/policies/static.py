"""Static sparse: a fixed random mask for the whole of training."""
from __future__ import annotations

from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policy import Context, Policy
from dynsparse.sparse.when import Never


@register_policy("static", help="static sparse: a fixed random mask", schedule="never")
class Static(Policy):
    when = Never()

    def update(self, ctx: Context) -> tuple[int, int]:
        return 0, 0  # never asked (``when`` is Never); a direct call changes nothing
