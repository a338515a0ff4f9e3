"""What the training loop and the run call on a sparsifier, as a no-op base: dense training.

The loop calls ``set_epoch``, ``before_optimizer_step``, ``step`` and ``end_epoch``; the run
calls ``drain_events``, ``metrics``, ``param_counts``, ``totals``, ``state_dict`` and ``restore``.
:class:`~dynsparse.sparse.Sparsifier` implements them all; :class:`NoSparsity` (dense training)
and :class:`~dynsparse.training.tied_weights.TiedModel` implement what they need on top of this base.
"""
from __future__ import annotations

from collections.abc import Mapping


class NoSparsity:
    """Dense training: every hook does nothing."""

    after_update = None  # called after each topology change (the distributed consistency check)

    def set_epoch(self, epoch: int) -> None:
        pass

    def before_optimizer_step(self) -> None:
        pass

    def step(self) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def drain_events(self) -> list:
        return []

    def metrics(self) -> dict:
        return {}

    def totals(self) -> dict[str, int]:
        return {}

    def param_counts(self) -> dict[str, int]:
        return {"sparse": 0, "sparse_total": 0, "tied": 0}

    def state_dict(self) -> dict | None:
        return None

    def restore(self, state: Mapping | None, *, exact: bool) -> None:
        pass
