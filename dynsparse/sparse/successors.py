"""DSR's successors in the same engine: RigL and sparse momentum (SNFS).

Both read the dense gradient, which this engine has at every step: the model keeps ordinary
dense weights (zero off the mask), so backward computes the gradient of every entry; the
sparsifier masks it only afterwards, in ``before_optimizer_step``. Counts are exact: every
update grows as many entries as it drops, never at positions it just dropped (the invariant all
dynamic methods here share), and new weights start at zero.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.policies import allocate
from dynsparse.sparse.masks import SparseParam
from dynsparse.sparse.sparsifier import Policy, Sparsifier


def cosine_fraction(initial: float, step: int, end_step: int) -> float:
    """``initial / 2 * (1 + cos(pi * step / end_step))``, the decay both papers use."""
    return initial / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))


def _grow_top(s: Sparsifier, sp: SparseParam, scores: torch.Tensor, count: int, exclude: torch.Tensor) -> int:
    """Activate the ``count`` inactive entries with the largest ``scores`` (not ``exclude``)."""
    free = ~sp.mask.view(-1)
    free[exclude] = False
    count = min(count, int(free.sum()))
    if count <= 0:
        return 0
    idx = torch.topk(scores.masked_fill(~free, -math.inf), count, sorted=False).indices
    s.activate(sp, idx, count)
    return count


def _entry_scores(sp: SparseParam, t: torch.Tensor) -> torch.Tensor:
    """|t| per mask entry (mean over a kernel slice at coarse granularity)."""
    t = t.abs()
    return t.reshape(-1) if sp.granularity == t.dim() else t.flatten(sp.granularity).mean(-1).reshape(-1)


class _Scheduled(Policy):
    """Updates every ``period`` training steps (None: the sparsifier's ``rewire_period_schedule``)
    until ``end_step``, with a cosine-decayed drop fraction."""

    def __init__(self, fraction: float, end_step: int, period: int | None = None) -> None:
        if period is not None and period < 1:
            raise DynsparseError(f"the update period must be >= 1 step, got {period}")
        self.update_period = period
        if not 0.0 < fraction < 1.0:
            raise DynsparseError(f"the drop fraction must be in (0, 1), got {fraction}")
        if end_step < 1:
            raise DynsparseError(f"the end step of topology updates must be >= 1, got {end_step}")
        self.fraction, self.end_step = fraction, end_step

    def due_at(self, s: Sparsifier, step: int) -> bool:
        period = self.update_period if self.update_period is not None else s.period(s.epoch)
        return step < self.end_step and step % period == 0

    def due(self, s: Sparsifier) -> bool:
        return self.due_at(s, s.step_count)


class RigL(_Scheduled):
    """RigL (Evci et al. 2020): every ``period`` steps until ``end_step``, each layer drops the
    fraction ``alpha_t = alpha / 2 (1 + cos(pi t / end_step))`` of its active entries with the
    smallest magnitude and grows as many where the dense gradient is largest. The gradient is
    read only at update steps. Per-layer densities stay fixed. Deviation from the RigL code: the
    entries just dropped are not candidates for regrowth."""

    name = "rigl"

    def __init__(self, fraction: float = 0.3, end_step: int = 10**9, period: int | None = None) -> None:
        super().__init__(fraction, end_step, period)
        self.grad_scores: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, s: Sparsifier) -> None:
        if self.due_at(s, s.step_count + 1):
            self.grad_scores = {n: _entry_scores(sp, sp.param.grad) for n, sp in s.params.items()
                                if sp.param.grad is not None}

    def update(self, s: Sparsifier) -> tuple[int, int]:
        frac = cosine_fraction(self.fraction, s.step_count, self.end_step)
        pruned = grown = 0
        for name, sp in s.params.items():
            k = int(frac * sp.num_active)
            if k == 0 or name not in self.grad_scores:
                continue
            idx = s.prune_smallest(sp, k)
            pruned += k
            grown += _grow_top(s, sp, self.grad_scores[name], k, idx)
        self.grad_scores = {}
        return pruned, grown

    def state_dict(self) -> dict:
        return {"fraction": self.fraction, "end_step": self.end_step, "period": self.update_period}

    def load_state_dict(self, state: Mapping) -> None:
        self.fraction, self.end_step = float(state["fraction"]), int(state["end_step"])
        self.update_period = state.get("period")


class SNFS(_Scheduled):
    """Sparse momentum (Dettmers & Zettlemoyer 2019): every ``period`` steps (the paper and the
    command line: once per epoch) until ``end_step``,
    each layer prunes the fraction ``p_t`` (cosine-decayed from ``fraction``) of its active entries
    with the smallest magnitude; the total pruned is regrown across layers in proportion to each
    layer's mean momentum magnitude over its active entries, and within a layer where the
    momentum magnitude is largest. Counts are exact (growth capped by free space, surplus passed
    on), so the sparsity never drifts (sparse_learning issue #22). The momentum is the policy's
    own dense exponential average of the gradient, ``m = beta m + g``, because the optimizer's
    momentum is kept zero off the mask here."""

    name = "snfs"

    def __init__(self, fraction: float = 0.5, end_step: int = 10**9, beta: float = 0.9,
                 period: int | None = None) -> None:
        super().__init__(fraction, end_step, period)
        self.beta = beta
        self.momentum: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, s: Sparsifier) -> None:
        for name, sp in s.params.items():
            g = sp.param.grad
            if g is None:
                continue
            m = self.momentum.get(name)
            self.momentum[name] = g.detach().clone() if m is None else m.mul_(self.beta).add_(g)

    def update(self, s: Sparsifier) -> tuple[int, int]:
        if not self.momentum:
            return 0, 0
        frac = cosine_fraction(self.fraction, s.step_count, self.end_step)
        sps = list(s.params.values())
        scores = [_entry_scores(sp, self.momentum[sp.name]) for sp in sps]
        means = torch.stack([(sc * sp.mask.view(-1)).sum() / max(sp.num_active, 1) for sc, sp in zip(scores, sps)])
        importance = means.tolist()
        pruned_idx, pruned = [], []
        for sp in sps:
            k = min(int(frac * sp.num_active), sp.num_active - 1)
            pruned_idx.append(s.prune_smallest(sp, k) if k > 0 else torch.empty(0, dtype=torch.long, device=sp.mask.device))
            pruned.append(max(k, 0))
        total = sum(pruned)
        capacity = [sp.num_entries - sp.num_active - k for sp, k in zip(sps, pruned)]
        weights = [round(1e9 * v) for v in importance]  # allocate() takes integer weights
        targets = allocate(weights, total, capacity)
        grown = sum(_grow_top(s, sp, sc, t, idx) for sp, sc, t, idx in zip(sps, scores, targets, pruned_idx))
        return total, grown

    def state_dict(self) -> dict:
        return {"fraction": self.fraction, "end_step": self.end_step, "beta": self.beta, "period": self.update_period,
                "momentum": {n: t.clone() for n, t in self.momentum.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.fraction, self.end_step, self.beta = float(state["fraction"]), int(state["end_step"]), float(state["beta"])
        self.update_period = state.get("period")
        self.momentum = {n: t.clone() for n, t in state["momentum"].items()}
