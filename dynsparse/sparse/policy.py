"""The policy protocol (which connections change, and when) and the record of one change."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynsparse.sparse.when import Never, When

if TYPE_CHECKING:  # annotations only: the sparsifier imports this module
    from dynsparse.sparse.sparsifier import Sparsifier


@dataclass(frozen=True)
class RewireEvent:
    step: int
    epoch: int
    pruned: int
    grown: int
    threshold: float | None
    densities: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pruned": self.pruned, "grown": self.grown,
                "threshold": self.threshold, "densities": self.densities}


class Policy:
    """Which connections to drop and grow, and ``when`` (a :class:`~dynsparse.sparse.when.When`).
    ``update`` returns (dropped, grown). Most policies derive from
    :class:`~dynsparse.sparse.dropgrow.DropGrow` and override one or two of its steps."""

    when: When = Never()
    record_events = True  # False for policies that update every step (DeepR): totals only

    def attach(self, s: Sparsifier) -> None:
        """Called once the sparsifier's masks are applied (e.g. DeepR records signs)."""

    def wants_dense_grad(self, s: Sparsifier) -> bool:
        """Whether ``before_optimizer_step`` of the coming step reads the gradient *off* the mask
        (RigL before an update, SNFS every step). Gradients are masked as they are accumulated;
        only then is the off-mask part set aside for this policy."""
        return False

    def before_optimizer_step(self, s: Sparsifier) -> None:
        """Per-step hook before the gradients are masked (while ``when`` is active)."""

    def update(self, s: Sparsifier) -> tuple[int, int]:
        return 0, 0

    def metrics(self) -> dict:
        """Scalars worth logging (e.g. DSR's threshold)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass
