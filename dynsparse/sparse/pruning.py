"""Gradual magnitude pruning (Zhu & Gupta 2018), the paper's "compressed sparse" baseline.

``iterations`` prunes, one at the end of epoch ``start``, ``start + frequency``, ... Each prune
takes every tensor to the sparsity its schedule gives after that prune, by removing its
smallest-magnitude active entries (or, with ``global_threshold``, i.e. ``--global-prune``, the
globally smallest entries of all tensors, in the same total number; the original's
``--threshold-prune`` does not select this: the original ignored it in prune mode). Nothing is regrown, so sparsity never decreases.

Schedules, for final sparsity ``s`` after ``n`` prunes (``i`` = prunes done, 1..n):

* exponential (the original's default): ``s_i = 1 - (1 - s) ** (i / n)``, i.e. every prune removes
  the fraction ``1 - (1 - s) ** (1 / n)`` of the active entries;
* cubic (``--cubic-prune-schedule``): ``s_i = s * (1 - (1 - i / n) ** 3)``, i.e. the original's
  ``frac_i = 1 - (1 - s + s (1 - (i+1)/n)^3) / (1 - s + s (1 - i/n)^3)``.

Deviation: the original removed ``int(frac * active) + 1`` entries per prune, so the final
sparsity drifted from the target by up to one entry per prune; here every prune keeps exactly
``int((1 - s_i) * N + 0.1)`` entries (the same count rule as the initial masks), so the end
state is exactly at the target.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.sparsifier import Policy, Sparsifier


def scheduled_sparsity(final: float, done: int, iterations: int, cubic: bool) -> float:
    """Sparsity after ``done`` of ``iterations`` prunes."""
    if done >= iterations:
        return final
    if cubic:
        return final * (1.0 - (1.0 - done / iterations) ** 3)
    return 1.0 - (1.0 - final) ** (done / iterations)


def keep_count(entries: int, sparsity: float) -> int:
    return max(int((1.0 - sparsity) * entries + 0.1), 1)


class GradualPruning(Policy):
    name = "prune"

    def __init__(self, targets: Mapping[str, float], *, iterations: int = 1, start_epoch: int = 20,
                 frequency: int = 2, cubic: bool = False, global_threshold: bool = False) -> None:
        if iterations < 1 or frequency < 1 or start_epoch < 0:
            raise DynsparseError("pruning needs --prune-iterations >= 1, --prune-epoch-frequency >= 1 and "
                                 "--start-pruning-after-epoch >= 0")
        for name, t in targets.items():
            if not 0.0 <= t < 1.0:
                raise DynsparseError(f"target sparsity of {name} must be in [0, 1), got {t}")
        self.targets = dict(targets)
        self.iterations, self.start_epoch, self.frequency = iterations, start_epoch, frequency
        self.cubic, self.global_threshold = cubic, global_threshold
        self.done = 0

    def due_at_epoch_end(self, s: Sparsifier) -> bool:
        e = s.epoch
        return e >= self.start_epoch and (e - self.start_epoch) % self.frequency == 0 and self.done < self.iterations

    def counts(self, s: Sparsifier) -> dict[str, int]:
        """Entries each tensor must lose at the next prune."""
        out = {}
        for name, sp in s.params.items():
            target = scheduled_sparsity(self.targets.get(name, 0.0), self.done + 1, self.iterations, self.cubic)
            out[name] = max(sp.num_active - keep_count(sp.num_entries, target), 0)
        return out

    def update(self, s: Sparsifier) -> tuple[int, int]:
        counts = self.counts(s)
        self.done += 1
        if not self.global_threshold:
            for name, k in counts.items():
                if k:
                    s.prune_smallest(s.params[name], k)
            return sum(counts.values()), 0
        # global: the same total, taken where magnitudes are globally smallest (one entry kept per tensor)
        sps = [sp for n, sp in s.params.items() if self.targets.get(n, 0.0) > 0]
        total = sum(counts[sp.name] for sp in sps)
        mags = []
        for sp in sps:
            m = sp.magnitude().masked_fill(~sp.mask.view(-1), math.inf)
            m[torch.argmax(m.masked_fill(~sp.mask.view(-1), -1.0))] = math.inf  # never empty a tensor
            mags.append(m)
        if not total:
            return 0, 0
        flat = torch.cat(mags)
        total = min(total, int(torch.isfinite(flat).sum()))
        chosen = torch.topk(flat, total, largest=False, sorted=False).indices
        offset = 0
        for sp, m in zip(sps, mags):
            mine = chosen[(chosen >= offset) & (chosen < offset + m.numel())] - offset
            s.prune(sp, mine, mine.numel())
            offset += m.numel()
        return total, 0

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: Mapping) -> None:
        self.done = int(state["done"])


def mnist_output_layer_targets(target_fc: float) -> tuple[float, float]:
    """The original's special case for ``mnist_mlp`` above 0.9 sparsity: the 10x100 output layer
    is pruned to 0.9 (keeping 100 weights) and the other two layers take up the difference, so
    the total budget is that of ``target_fc`` over all three. Returns (hidden, output) targets."""
    total = 784 * 300 + 300 * 100 + 100 * 10
    available = (1.0 - target_fc) * total - 100
    return 1.0 - available / (784 * 300 + 300 * 100), 0.9
