"""SET as the original implements it (Mocanu et al. 2018, magnitude variant)."""
from __future__ import annotations

from collections.abc import Mapping

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow, allocate_by_survivors, cosine_fraction
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policy import Context
from dynsparse.sparse.storage import SparseStorage
from dynsparse.sparse.storage.masked import keep_one
from dynsparse.sparse.when import When


@register_policy("set", help="SET (Mocanu et al. 2018; --rewire): drop by magnitude, grow at random",
                 fields={"fraction": "rewire_fraction", "scaling": "rewire_scaling"})
class SET(DropGrow):
    """Every rewire period, each tensor drops its ``int(f * active) + 1`` smallest-magnitude
    active entries and regrows as many at uniformly random inactive positions of the same tensor,
    never the positions just dropped. Per-layer densities never change. Like the original this is
    pure magnitude pruning, not Mocanu's "smallest positive / largest negative" rule.
    With ``scaling`` (the original's ``--rewire-scaling`` without ``--threshold-prune``) the total
    dropped is regrown across tensors in proportion to their surviving entries, as DSR regrows.
    Deviation: a tensor keeps at least one entry (the original could empty a 1-entry tensor).

    The parameters that make its successors: ``extra`` (the original SET's ``+ 1`` in the drop
    count; RigL and MEST drop ``int(f * active)``) and ``cosine`` (``f`` decayed as
    ``f / 2 (1 + cos(pi t / end_step))`` at update step ``t``, ``end_step`` from the schedule, as
    RigL and SNFS decay it). A policy whose ``needs`` is the dense gradient for growth leaves a
    tensor that has none (it got no gradient) as it is."""

    def __init__(self, fraction: float = 0.1, scaling: bool = False, when: When | None = None, *,
                 extra: int = 1, cosine: bool = False) -> None:
        if not 0.0 <= fraction < 1.0:
            raise DynsparseError(f"rewire fraction must be in [0, 1), got {fraction}")
        super().__init__(when)
        self.fraction, self.scaling, self.extra, self.cosine = fraction, scaling, extra, cosine
        self.frac = fraction  # the fraction of the update being made

    def prepare(self, ctx: Context) -> None:
        if self.cosine:
            self.frac = cosine_fraction(self.fraction, ctx.step, getattr(ctx.when, "end_step", None) or 10**9)

    def drop_count(self, ctx: Context, sp: SparseStorage) -> int:
        if self.needs is not None and self.needs.what == "grad_scores" and sp.name not in ctx.signals:
            return 0  # grows by the gradient, and this tensor has none
        return keep_one(sp.num_active, int(self.frac * sp.num_active) + self.extra)

    allocate = allocate_by_survivors

    def state_dict(self) -> dict:
        # the decayed schedule's start is checkpointed (RigL's and SNFS's checkpoints always held
        # it); plain SET and MEST take their fraction from the command line on a resume, as before
        return {"fraction": self.fraction} if self.cosine else {}

    def load_state_dict(self, state: Mapping) -> None:
        if "fraction" in state:
            self.fraction = float(state["fraction"])
