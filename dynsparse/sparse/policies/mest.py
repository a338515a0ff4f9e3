"""MEST's elastic mutation (Yuan et al., NeurIPS 2021): SET with a drop score that adds the gradient.

The worked example of docs/extending.md: one class over SET, one step overridden."""
from __future__ import annotations

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policy import Context, Needs
from dynsparse.sparse.storage import SparseStorage
from dynsparse.sparse.when import When


@register_policy("mest", help="MEST elastic mutation (Yuan et al. 2021): drop by |w| + lam |grad|, grow at random",
                 schedule="periodic-until-end", fields={"fraction": "drop_fraction"}, flag="--mest")
class MEST(SET):
    """Every update, each layer drops the fraction ``fraction`` of its active entries with the
    smallest ``|w| + lam * |grad w|`` and regrows as many at random (no dense gradient needed:
    only the active entries' gradients are read, at update steps). ``lam`` is ours to choose
    (default 1.0), not a value from the paper. SET without the ``+ 1``, ``drop_scores`` overridden."""

    needs = Needs("active_grad", at="update")

    def __init__(self, fraction: float = 0.3, lam: float = 1.0, when: When | None = None) -> None:
        if not 0.0 < fraction < 1.0:
            raise DynsparseError(f"the drop fraction must be in (0, 1), got {fraction}")
        super().__init__(fraction, when=when, extra=0)
        self.lam = lam

    def drop_scores(self, ctx: Context, sp: SparseStorage) -> torch.Tensor:
        grad = ctx.signals.get(sp.name)
        return sp.magnitude() if grad is None else sp.magnitude() + self.lam * grad
