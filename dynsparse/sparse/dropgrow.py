"""The drop-and-grow base that every dynamic policy specializes.

``DropGrow.update`` runs one topology change in six steps, each an overridable method
(after ``prepare(ctx)``, where a policy reads what this update needs, e.g. its drop fraction):

1. ``drop_count(ctx, sp)`` - how many entries of each tensor to drop;
2. ``drop_scores(ctx, sp)`` - which are least useful (default: magnitude);
   (``select_drops`` combines 1-2 for all tensors at once; threshold rules override it);
3. drop them (their weights are zeroed with the masks after the update);
4. ``allocate(ctx, sps, dropped)`` - how many each tensor grows (default: what it dropped);
5. ``grow_scores(ctx, sp)`` - where to grow (default None: uniformly at random);
6. grow, never at an entry just dropped, new weights zero (or ``--big-new-weights``).

SET is this base with a count rule; RigL is SET with gradient grow scores; SNFS is RigL with
momentum scores and a momentum-proportional allocation; DSR is a threshold drop with a
survivor-proportional allocation; DeepR drops sign flips. A new method overrides only what
differs (docs/extending.md).
"""
from __future__ import annotations

import math

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.policy import Context, Policy
from dynsparse.sparse.storage import GrowScores, Handles, SparseStorage
from dynsparse.sparse.when import Periodic, When


class DropGrow(Policy):
    """The six steps of the module docstring. Required: how many to drop (``drop_count``), or the
    drops of all tensors at once (``select_drops``), or the whole ``update``: a subclass that
    overrides none of them is refused when built, not left to drop nothing. Every other step
    has the documented default."""

    def __init__(self, when: When | None = None) -> None:
        cls = type(self)
        if (cls.drop_count is DropGrow.drop_count and cls.select_drops is DropGrow.select_drops
                and cls.update is DropGrow.update):
            raise TypeError(f"{cls.__name__} must override drop_count (or select_drops, or update)")
        self.when = when if when is not None else Periodic(100)

    # ---- the steps ----------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        """Optional: read what this update needs before anything is dropped. Default: nothing."""

    def drop_count(self, ctx: Context, sp: SparseStorage) -> int:
        """Required unless ``select_drops`` is overridden: how many active entries ``sp`` drops."""
        raise NotImplementedError(f"{type(self).__name__} must override drop_count or select_drops")

    def drop_scores(self, ctx: Context, sp: SparseStorage) -> torch.Tensor:
        """Optional: drop-side scores, the lowest dropped first. Default: magnitude."""
        return sp.magnitude()

    def select_drops(self, ctx: Context, sps: list[SparseStorage]) -> list[Handles]:
        """Drop-side handles to drop, per tensor (all active). Default: the ``drop_count`` lowest
        ``drop_scores`` of each tensor."""
        return [sp.lowest_active(self.drop_scores(ctx, sp), self.drop_count(ctx, sp)) for sp in sps]

    def allocate(self, ctx: Context, sps: list[SparseStorage], dropped: list[int]) -> list[int]:
        """Optional: how many entries each tensor grows. Default: what it dropped."""
        return list(dropped)

    def grow_scores(self, ctx: Context, sp: SparseStorage) -> GrowScores | None:
        """Optional: grow-side scores, the highest grown first. Default None: uniformly at random."""
        return None

    # ---- the pipeline -------------------------------------------------------------------
    def update(self, ctx: Context) -> tuple[int, int]:
        self.prepare(ctx)
        sps = list(ctx.params.values())
        drops = [sp.drop(idx) for sp, idx in zip(sps, self.select_drops(ctx, sps))]
        dropped = [d.count for d in drops]
        grown = 0
        for sp, count, gone in zip(sps, self.allocate(ctx, sps, dropped), drops):
            scores = self.grow_scores(ctx, sp)
            if scores is not None and not isinstance(scores, GrowScores):
                raise DynsparseError(f"{type(self).__name__}.grow_scores returned a {type(scores).__name__}: return "
                                     "GrowScores (sp.dense_scores(t) for a tensor shaped like the weight) or None")
            new = sp.grow_random(count, gone, ctx.generator) if scores is None else sp.grow_top(scores, count, gone)
            grown += ctx.grow(sp, new)
        for sp in sps:  # CSR storage moves values and optimizer state now; masks are already done
            ctx.commit(sp)
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


def allocate_proportionally(sps: list[SparseStorage], dropped: list[int], weights: list[float]) -> list[int]:
    """Regrow everything dropped, shared over tensors in proportion to ``weights`` and capped by
    each tensor's free space (excluding the entries it just dropped)."""
    capacity = [sp.num_free - k for sp, k in zip(sps, dropped)]
    return allocate(weights, sum(dropped), capacity)


def allocate_by_survivors(policy, ctx: Context, sps: list[SparseStorage], dropped: list[int]) -> list[int]:
    """The ``allocate`` step of SET and DSR (``allocate = allocate_by_survivors``): with
    ``policy.scaling`` (the original's ``--rewire-scaling``) everything dropped is regrown across
    tensors in proportion to their surviving entries; without it each tensor regrows what it dropped."""
    if not policy.scaling:
        return list(dropped)
    return allocate_proportionally(sps, dropped, [sp.num_active for sp in sps])


def cosine_fraction(initial: float, step: int, end_step: int) -> float:
    """``initial / 2 * (1 + cos(pi * step / end_step))``, the decay RigL and SNFS use."""
    return initial / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))
