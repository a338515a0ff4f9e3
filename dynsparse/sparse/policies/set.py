"""SET as the original implements it (Mocanu et al. 2018, magnitude variant)."""
from __future__ import annotations

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow, allocate_proportionally
from dynsparse.sparse.masks import SparseParam, keep_one
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.sparsifier import Sparsifier
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
    Deviation: a tensor keeps at least one entry (the original could empty a 1-entry tensor)."""

    def __init__(self, fraction: float = 0.1, scaling: bool = False, when: When | None = None) -> None:
        if not 0.0 <= fraction < 1.0:
            raise DynsparseError(f"rewire fraction must be in [0, 1), got {fraction}")
        super().__init__(when)
        self.fraction, self.scaling = fraction, scaling

    def drop_count(self, s: Sparsifier, sp: SparseParam) -> int:
        return keep_one(sp.num_active, int(self.fraction * sp.num_active) + 1)

    def allocate(self, s: Sparsifier, sps: list[SparseParam], dropped: list[int]) -> list[int]:
        if not self.scaling:
            return list(dropped)
        return allocate_proportionally(sps, dropped, [sp.num_active for sp in sps])
