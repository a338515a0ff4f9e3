"""RigL (Evci et al. 2020): SET with gradient grow scores and a cosine-decayed drop fraction."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow, cosine_fraction
from dynsparse.sparse.masks import SparseParam
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.sparsifier import Sparsifier
from dynsparse.sparse.when import Periodic, When


@register_policy("rigl", help="RigL (Evci et al. 2020): drop by magnitude, grow by gradient",
                 cost="dense-grad-at-updates", schedule="periodic-until-end", fields={"fraction": "drop_fraction"})
class RigL(DropGrow):
    """At each update step ``t`` (``when``: every ``period`` steps until ``end_step``), each
    layer drops the fraction ``alpha_t = alpha / 2 (1 + cos(pi t / end_step))`` of its active
    entries with the smallest magnitude and grows as many where the dense gradient is largest.
    The gradient is read only at update steps. Per-layer densities stay fixed. Deviation from
    the RigL code: the entries just dropped are not candidates for regrowth."""

    def __init__(self, fraction: float = 0.3, when: When | None = None) -> None:
        if not 0.0 < fraction < 1.0:
            raise DynsparseError(f"the drop fraction must be in (0, 1), got {fraction}")
        # the paper: every 100 steps until 75% of training (the sparsifier's total_steps)
        super().__init__(when if when is not None else Periodic(100, end_fraction=0.75))
        self.fraction = fraction
        self.frac = fraction
        self.grow_signal: dict[str, torch.Tensor] = {}  # grow scores per tensor, read for the next update

    @property
    def end_step(self) -> int:
        return getattr(self.when, "end_step", None) or 10**9

    def wants_dense_grad(self, s: Sparsifier) -> bool:
        return self.when.due(s.step_count + 1, s.epoch)

    def before_optimizer_step(self, s: Sparsifier) -> None:
        if self.when.due(s.step_count + 1, s.epoch):
            signal = {n: sp.gradient_scores() for n, sp in s.params.items()}
            self.grow_signal = {n: g for n, g in signal.items() if g is not None}

    def prepare(self, s: Sparsifier) -> None:
        self.frac = cosine_fraction(self.fraction, s.step_count, self.end_step)

    def drop_count(self, s: Sparsifier, sp: SparseParam) -> int:
        return int(self.frac * sp.num_active) if sp.name in self.grow_signal else 0

    def grow_scores(self, s: Sparsifier, sp: SparseParam) -> torch.Tensor | None:
        return self.grow_signal.get(sp.name)

    def update(self, s: Sparsifier) -> tuple[int, int]:
        out = super().update(s)
        self.grow_signal = {}
        return out

    def state_dict(self) -> dict:
        return {"fraction": self.fraction}

    def load_state_dict(self, state: Mapping) -> None:
        self.fraction = float(state["fraction"])
