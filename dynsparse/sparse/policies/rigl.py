"""RigL (Evci et al. 2020): SET with gradient grow scores and a cosine-decayed drop fraction."""
from __future__ import annotations

from dynsparse.errors import DynsparseError
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policy import Context, Needs
from dynsparse.sparse.storage import GrowScores, SparseStorage
from dynsparse.sparse.when import Periodic, When


@register_policy("rigl", help="RigL (Evci et al. 2020): drop by magnitude, grow by gradient",
                 cost="dense-grad-at-updates", schedule="periodic-until-end", fields={"fraction": "drop_fraction"})
class RigL(SET):
    """At each update step ``t`` (``when``: every ``period`` steps until ``end_step``), each
    layer drops the fraction ``alpha_t = alpha / 2 (1 + cos(pi t / end_step))`` of its active
    entries with the smallest magnitude and grows as many where the dense gradient is largest.
    The gradient is read only at update steps. Per-layer densities stay fixed. Deviation from
    the RigL code: the entries just dropped are not candidates for regrowth.

    SET (:class:`~dynsparse.sparse.policies.set.SET`) with one step overridden, ``grow_scores``;
    its defaults are the paper's (drop fraction 0.3 cosine-decayed, no ``+ 1``, every 100 steps
    until 75% of training)."""

    needs = Needs("grad_scores", at="update")

    def __init__(self, fraction: float = 0.3, when: When | None = None) -> None:
        if not 0.0 < fraction < 1.0:
            raise DynsparseError(f"the drop fraction must be in (0, 1), got {fraction}")
        # the paper: every 100 steps until 75% of training (the sparsifier's total_steps)
        super().__init__(fraction, when=when if when is not None else Periodic(100, end_fraction=0.75),
                         extra=0, cosine=True)

    def grow_scores(self, ctx: Context, sp: SparseStorage) -> GrowScores | None:
        return ctx.signals.get(sp.name)
