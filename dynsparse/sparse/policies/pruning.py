"""Gradual magnitude pruning (Zhu & Gupta 2018), the paper's "compressed sparse" baseline.

``when`` (:class:`~dynsparse.sparse.when.AtEpochEnds`) says which epoch ends prune, and how many
times (``count`` = the original's ``--prune-iterations``). Each prune takes every tensor to the
sparsity its schedule gives after that prune, by removing its smallest-magnitude active entries
(or, with ``global_threshold``, i.e. ``--global-prune``, the globally smallest entries of all
tensors, in the same total number; the original's ``--threshold-prune`` does not select this: the
original ignored it in prune mode). Nothing is regrown, so sparsity never decreases.

Schedules, for final sparsity ``s`` after ``n`` prunes (``i`` = prunes done, 1..n):

* exponential (the original's default): ``s_i = 1 - (1 - s) ** (i / n)``, i.e. every prune removes
  the fraction ``1 - (1 - s) ** (1 / n)`` of the active entries;
* cubic (``--cubic-prune-schedule``): ``s_i = s * (1 - (1 - i / n) ** 3)``, i.e. the original's
  ``frac_i = 1 - (1 - s + s (1 - (i+1)/n)^3) / (1 - s + s (1 - i/n)^3)``.

Deviation: the original removed ``int(frac * active) + 1`` entries per prune, so the final
sparsity drifted from the target by up to one entry per prune; here every prune keeps exactly
``count_for_density(N, 1 - s_i)`` entries (the same count rule as the initial masks), so the
end state is exactly at the target.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policy import Context
from dynsparse.sparse.storage import Handles, SparseStorage
from dynsparse.sparse.storage.masked import count_for_density
from dynsparse.sparse.when import AtEpochEnds, When


def scheduled_sparsity(final: float, done: int, iterations: int, cubic: bool) -> float:
    """Sparsity after ``done`` of ``iterations`` prunes."""
    if done >= iterations:
        return final
    if cubic:
        return final * (1.0 - (1.0 - done / iterations) ** 3)
    return 1.0 - (1.0 - final) ** (done / iterations)


def keep_count(entries: int, sparsity: float) -> int:
    return max(count_for_density(entries, 1.0 - sparsity), 1)


@register_policy("prune", help="gradual magnitude pruning of a trained model (Zhu & Gupta 2017; --prune)",
                 schedule="epoch-ends", fields={"cubic": "cubic_prune_schedule", "global_threshold": "global_prune"},
                 context=("targets",), by_name=False)
class GradualPruning(DropGrow):
    def __init__(self, targets: Mapping[str, float], *, cubic: bool = False, global_threshold: bool = False,
                 when: When | None = None) -> None:
        for name, t in targets.items():
            if not 0.0 <= t < 1.0:
                raise DynsparseError(f"target sparsity of {name} must be in [0, 1), got {t}")
        super().__init__(when if when is not None else AtEpochEnds())
        self.targets = dict(targets)
        self.cubic, self.global_threshold = cubic, global_threshold

    def counts(self, ctx: Context) -> dict[str, int]:
        """Entries each tensor loses at the prune being made (the ``ctx.epoch_end_updates``-th)."""
        out = {}
        iterations = getattr(ctx.when, "count", 1)
        for name, sp in ctx.params.items():
            target = scheduled_sparsity(self.targets.get(name, 0.0), ctx.epoch_end_updates, iterations, self.cubic)
            out[name] = max(sp.num_active - keep_count(sp.num_entries, target), 0)
        return out

    def select_drops(self, ctx: Context, sps: list[SparseStorage]) -> list[Handles]:
        counts = self.counts(ctx)
        if not self.global_threshold:
            return [sp.lowest_active(sp.magnitude(), counts[sp.name]) for sp in sps]
        # global: the same total, taken where magnitudes are globally smallest (one entry kept per tensor)
        empty = Handles(torch.empty(0, dtype=torch.long, device=sps[0].device))
        chosen_sps = [sp for sp in sps if self.targets.get(sp.name, 0.0) > 0]
        total = sum(counts[sp.name] for sp in chosen_sps)
        mags = []
        for sp in chosen_sps:
            m = sp.fill_inactive(sp.magnitude(), math.inf)
            m[sp.largest_active(sp.magnitude())] = math.inf  # never empty a tensor
            mags.append(m)
        if not total:
            return [empty for _ in sps]
        flat = torch.cat(mags)
        total = min(total, int(torch.isfinite(flat).sum()))
        chosen = torch.topk(flat, total, largest=False, sorted=False).indices
        out, offset = {}, 0
        for sp, m in zip(chosen_sps, mags):
            # a position in a tensor's drop-side scores is a handle
            out[sp.name] = Handles(chosen[(chosen >= offset) & (chosen < offset + m.numel())] - offset)
            offset += m.numel()
        return [out.get(sp.name, empty) for sp in sps]

    def allocate(self, ctx: Context, sps: list[SparseStorage], dropped: list[int]) -> list[int]:
        return [0] * len(sps)
