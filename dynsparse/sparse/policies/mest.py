"""MEST's elastic mutation (Yuan et al., NeurIPS 2021): SET with a drop score that adds the gradient.

The worked example of docs/extending.md: one class over the drop-and-grow base."""
from __future__ import annotations

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow
from dynsparse.sparse.masks import SparseParam, keep_one
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.sparsifier import Sparsifier
from dynsparse.sparse.when import When


@register_policy("mest", help="MEST elastic mutation (Yuan et al. 2021): drop by |w| + lam |grad|, grow at random",
                 schedule="periodic-until-end", fields={"fraction": "drop_fraction"}, flag="--mest")
class MEST(DropGrow):
    """Every update, each layer drops the fraction ``fraction`` of its active entries with the
    smallest ``|w| + lam * |grad w|`` and regrows as many at random (no dense gradient needed:
    only the active entries' gradients are read, at update steps). ``lam`` is ours to choose
    (default 1.0), not a value from the paper."""

    def __init__(self, fraction: float = 0.3, lam: float = 1.0, when: When | None = None) -> None:
        if not 0.0 < fraction < 1.0:
            raise DynsparseError(f"the drop fraction must be in (0, 1), got {fraction}")
        super().__init__(when)
        self.fraction, self.lam = fraction, lam
        self.grads: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, s: Sparsifier) -> None:
        if self.when.due(s.step_count + 1, s.epoch):  # read the gradient only before an update
            self.grads = {n: sp.scores(sp.param.grad) for n, sp in s.params.items() if sp.param.grad is not None}

    def drop_count(self, s: Sparsifier, sp: SparseParam) -> int:
        return keep_one(sp.num_active, int(self.fraction * sp.num_active))

    def drop_scores(self, s: Sparsifier, sp: SparseParam) -> torch.Tensor:
        grad = self.grads.pop(sp.name, None)
        return sp.magnitude() if grad is None else sp.magnitude() + self.lam * grad
