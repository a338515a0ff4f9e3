"""The drop-and-grow base that every dynamic policy specializes.

``DropGrow.update`` runs one topology change in six steps, each an overridable method
(after ``prepare(s)``, where a policy reads what this update needs, e.g. its drop fraction):

1. ``drop_count(s, sp)`` - how many entries of each tensor to drop;
2. ``drop_scores(s, sp)`` - which are least useful (default: magnitude);
   (``select_drops`` combines 1-2 for all tensors at once; threshold rules override it);
3. drop them (their weights are zeroed with the masks after the update);
4. ``allocate(s, sps, dropped)`` - how many each tensor grows (default: what it dropped);
5. ``grow_scores(s, sp)`` - where to grow (default None: uniformly at random);
6. grow, never at an entry just dropped, new weights zero (or ``--big-new-weights``).

SET is this base with a count rule; RigL is SET with gradient grow scores; SNFS is RigL with
momentum scores and a momentum-proportional allocation; DSR is a threshold drop with a
survivor-proportional allocation; DeepR drops sign flips. A new method overrides only what
differs (docs/extending.md).
"""
from __future__ import annotations

import math

import torch

from dynsparse.sparse.masks import SparseParam
from dynsparse.sparse.sparsifier import Policy, Sparsifier
from dynsparse.sparse.when import Periodic, When


class DropGrow(Policy):
    def __init__(self, when: When | None = None) -> None:
        self.when = when if when is not None else Periodic(100)

    # ---- the steps ----------------------------------------------------------------------
    def prepare(self, s: Sparsifier) -> None:
        """Read what this update needs before anything is dropped."""

    def drop_count(self, s: Sparsifier, sp: SparseParam) -> int:
        return 0

    def drop_scores(self, s: Sparsifier, sp: SparseParam) -> torch.Tensor:
        return sp.magnitude()

    def select_drops(self, s: Sparsifier, sps: list[SparseParam]) -> list[torch.Tensor]:
        """Flat indices to drop, per tensor (all active)."""
        return [sp.lowest_active(self.drop_scores(s, sp), self.drop_count(s, sp)) for sp in sps]

    def allocate(self, s: Sparsifier, sps: list[SparseParam], dropped: list[int]) -> list[int]:
        return list(dropped)

    def grow_scores(self, s: Sparsifier, sp: SparseParam) -> torch.Tensor | None:
        return None

    # ---- the pipeline -------------------------------------------------------------------
    def update(self, s: Sparsifier) -> tuple[int, int]:
        self.prepare(s)
        sps = list(s.params.values())
        drops = self.select_drops(s, sps)
        for sp, idx in zip(sps, drops):
            sp.drop(idx)
        dropped = [idx.numel() for idx in drops]
        grown = 0
        for sp, count, idx in zip(sps, self.allocate(s, sps, dropped), drops):
            scores = self.grow_scores(s, sp)
            new = sp.grow_random(count, idx, s.generator) if scores is None else sp.grow_top(scores, count, idx)
            grown += s.grow(sp, new)
        for sp in sps:  # CSR storage moves values and optimizer state now; masks are already done
            sp.commit(s.optimizer)
        return sum(dropped), grown


def allocate(weights: list[float], total: int, capacity: list[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties to the
    lower index), never above ``capacity``; what a full tensor cannot take goes to the others."""
    out = [0] * len(weights)
    open_ = [i for i, c in enumerate(capacity) if c > 0]
    remaining = min(total, sum(max(c, 0) for c in capacity))
    while remaining > 0 and open_:
        wsum = sum(weights[i] for i in open_)
        shares = {i: (remaining * weights[i] / wsum if wsum else remaining / len(open_)) for i in open_}
        base = {i: math.floor(shares[i]) for i in open_}
        left = remaining - sum(base.values())
        for i in sorted(open_, key=lambda i: (-(shares[i] - base[i]), i))[:left]:
            base[i] += 1
        for i in open_:
            take = min(base[i], capacity[i] - out[i])
            out[i] += take
            remaining -= take
        open_ = [i for i in open_ if out[i] < capacity[i]]
    return out


def allocate_proportionally(sps: list[SparseParam], dropped: list[int], weights: list[float]) -> list[int]:
    """Regrow everything dropped, shared over tensors in proportion to ``weights`` and capped by
    each tensor's free space (excluding the entries it just dropped)."""
    capacity = [sp.num_free - k for sp, k in zip(sps, dropped)]
    return allocate(weights, sum(dropped), capacity)


def cosine_fraction(initial: float, step: int, end_step: int) -> float:
    """``initial / 2 * (1 + cos(pi * step / end_step))``, the decay RigL and SNFS use."""
    return initial / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))
