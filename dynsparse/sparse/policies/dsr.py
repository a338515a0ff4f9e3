"""Dynamic sparse reparameterization (Mostafa & Wang 2019, Algorithm 1)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow, allocate_by_survivors
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policy import Context
from dynsparse.sparse.storage import Handles, SparseStorage
from dynsparse.sparse.when import When


@register_policy("dsr", help="dynamic sparse reparameterization (Mostafa & Wang 2019; --rewire --threshold-prune)",
                 fields={"n_prune": "n_prune_params", "scaling": "rewire_scaling"})
class DSR(DropGrow):
    """Every rewire period: drop every active entry whose magnitude is below the global threshold
    H (keeping at least one entry per tensor), then regrow exactly as many entries as were dropped,
    shared over tensors in proportion to their surviving entries (``scaling=True``, the paper's
    ``--rewire-scaling``) or per tensor as many as it dropped (``scaling=False``), at uniformly
    random free positions that exclude the ones just dropped. Then adapt H: halve it when more than
    ``(1 + tolerance) * n_prune`` entries were dropped, double it when fewer than
    ``(1 - tolerance) * n_prune``. H starts at 1e-3.

    Deviations: the proportional shares use largest-remainder rounding with capacity caps (exact
    and deterministic) where the original fixed its rounding error on one random tensor in a loop;
    when a tensor would lose every entry, the largest-magnitude one is kept (the original kept the
    one with the lowest index).
    """

    def __init__(self, n_prune: int = 600, scaling: bool = True, threshold: float = 1e-3,
                 tolerance: float = 0.1, when: When | None = None) -> None:
        if n_prune < 1:
            raise DynsparseError(f"--n-prune-params must be >= 1, got {n_prune}")
        super().__init__(when)
        self.n_prune, self.scaling, self.threshold, self.tolerance = n_prune, scaling, threshold, tolerance

    def select_drops(self, ctx: Context, sps: list[SparseStorage]) -> list[Handles]:
        mags = [sp.magnitude() for sp in sps]
        below = [sp.active_below(m, self.threshold) for sp, m in zip(sps, mags)]
        counts = torch.stack([b.sum() for b in below]).tolist()  # one host sync for all tensors
        out = []
        for sp, m, b, k in zip(sps, mags, below, counts):
            if k == sp.num_active:  # never empty a tensor: keep its largest entry
                b[sp.largest_active(m)] = False
                k -= 1
            # positions of the drop-side flags are handles; the count is known: no device sync
            out.append(Handles(torch.nonzero_static(b, size=k).view(-1)))
        return out

    allocate = allocate_by_survivors

    def update(self, ctx: Context) -> tuple[int, int]:
        dropped, grown = super().update(ctx)
        if dropped > (1 + self.tolerance) * self.n_prune:
            self.threshold /= 2
        elif dropped < (1 - self.tolerance) * self.n_prune:
            self.threshold *= 2
        return dropped, grown

    def metrics(self) -> dict:
        return {"threshold": self.threshold}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: Mapping) -> None:
        self.threshold = float(state["threshold"])
