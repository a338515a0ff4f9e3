"""When a policy changes the topology: one small object per rule, asked by the sparsifier.

* :class:`Never` - static masks;
* :class:`EveryStep` - after every optimizer step (DeepR);
* :class:`Periodic` - every ``period`` optimizer steps (an int, or a function of the epoch, e.g.
  the original's ``rewire_period_schedule``), until ``end_step``, or until ``end_fraction`` of
  the ``total_steps`` given to the sparsifier (RigL and SNFS default to 0.75, their papers');
* :class:`AtEpochEnds` - after the last step of epochs ``start, start + every, ...``, ``count``
  times (gradual pruning).

Every period and end point is in optimizer steps; only a callable period, ``stop_epoch`` and
:class:`AtEpochEnds` are by epoch (and need the sparsifier's ``set_epoch``/``end_epoch``).
``stop_epoch`` (the original's ``--stop-rewire-epoch``) is part of every rule: from that epoch
on, nothing changes, and the policy's per-step hooks (DeepR noise, gradient reads) stop too.
Steps count optimizer steps from 1; ``due`` is asked after step ``step``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from dynsparse.errors import DynsparseError


@dataclass(frozen=True)
class When:
    stop_epoch: int | None = field(default=None, kw_only=True)

    def active(self, epoch: int) -> bool:
        """Whether the policy acts at all in ``epoch`` (its per-step hooks included)."""
        return self.stop_epoch is None or epoch < self.stop_epoch

    def due(self, step: int, epoch: int) -> bool:
        return False

    def due_at_epoch_end(self, epoch: int, done: int) -> bool:
        return False


@dataclass(frozen=True)
class Never(When):
    def active(self, epoch: int) -> bool:
        return False


@dataclass(frozen=True)
class EveryStep(When):
    def due(self, step: int, epoch: int) -> bool:
        return self.active(epoch)


@dataclass(frozen=True)
class Periodic(When):
    """Every ``period`` steps (``period(epoch)`` when callable), strictly before ``end_step``
    (or ``end_fraction`` of the sparsifier's ``total_steps``)."""

    period: int | Callable[[int], int] = 100
    end_step: int | None = None
    end_fraction: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.period, int) and self.period < 1:
            raise DynsparseError(f"the update period must be >= 1 step, got {self.period}")
        if self.end_step is not None and self.end_step < 1:
            raise DynsparseError(f"the end step of topology updates must be >= 1, got {self.end_step}")
        if self.end_fraction is not None and not 0.0 < self.end_fraction <= 1.0:
            raise DynsparseError(f"end_fraction is a fraction of training in (0, 1], got {self.end_fraction}")

    def period_at(self, epoch: int) -> int:
        return self.period(epoch) if callable(self.period) else self.period

    def check_end(self) -> None:
        """Raise if the end is a fraction of a training length nobody gave."""
        if self.end_step is None and self.end_fraction is not None:
            raise DynsparseError(f"topology updates end at {self.end_fraction:.0%} of training, which is unknown: pass "
                                 "total_steps= (optimizer steps) to the Sparsifier, or when=Periodic(period, "
                                 "end_step=N)")

    def due(self, step: int, epoch: int) -> bool:
        self.check_end()
        return (self.active(epoch) and (self.end_step is None or step < self.end_step)
                and step % self.period_at(epoch) == 0)


@dataclass(frozen=True)
class AtEpochEnds(When):
    """After epochs ``start, start + every, ...``, ``count`` times (``done`` counts those made)."""

    start: int = 0
    every: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or self.every < 1 or self.start < 0:
            raise DynsparseError("epoch-end updates need count >= 1, every >= 1 and start >= 0 (prune mode: "
                                 "--prune-iterations, --prune-epoch-frequency, --start-pruning-after-epoch)")

    def due_at_epoch_end(self, epoch: int, done: int) -> bool:
        return (self.active(epoch) and epoch >= self.start and (epoch - self.start) % self.every == 0
                and done < self.count)


def with_total_steps(when: When, total_steps: int | None) -> When:
    """``when`` with an ``end_fraction`` turned into an ``end_step`` of ``total_steps`` (a new
    object: ``when`` is the caller's)."""
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
        raise DynsparseError(f"total_steps must be a whole number of optimizer steps >= 1, got {total_steps!r}")
    if total_steps is None or not isinstance(when, Periodic) or when.end_fraction is None or when.end_step is not None:
        return when
    return replace(when, end_step=max(int(when.end_fraction * total_steps), 1), end_fraction=None)
