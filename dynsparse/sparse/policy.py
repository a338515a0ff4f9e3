"""The policy contract (which connections change, and when), what a policy is handed, and the
record of one change.

A policy never sees the sparsifier. It declares the signal it reads (:class:`Needs`, a class
attribute); the sparsifier gathers that signal at the right step and hands the policy a
:class:`Context`: the step, the epoch, the generator, the per-tensor views, the signal, the
(resolved) schedule and the few actions a policy may take (grow new weights, commit a storage's
changes to the optimizer state). ``update`` is the one required step; every other hook has a
documented default.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from dynsparse.sparse.when import Never, When

if TYPE_CHECKING:  # annotations only
    from dynsparse.sparse.storage import FlatIndices, SparseStorage


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


@dataclass(frozen=True)
class Needs:
    """The signal a policy reads, gathered by the sparsifier before the optimizer step into
    ``Context.signals`` (tensor name -> signal; a tensor without a gradient has none):

    * ``"grad_scores"``: grow-side scores of the dense gradient (RigL), off the mask included;
    * ``"dense_grad"``: the dense gradient shaped like the weight (SNFS's momentum);
    * ``"active_grad"``: drop-side scores of the gradient of the active entries only (MEST).

    ``at``: ``"update"`` (only at the step before a topology change) or ``"step"`` (every step
    while the schedule is active). The dense kinds cost CSR storage a capture of the products'
    inputs through that step, which is why a policy says when it needs them."""

    what: Literal["grad_scores", "dense_grad", "active_grad"]
    at: Literal["update", "step"] = "update"

    @property
    def dense(self) -> bool:
        return self.what != "active_grad"

    def gather(self, params: Mapping[str, SparseStorage]) -> dict[str, Any]:
        """The signal of each tensor that has one, in ``params``' order (the storages' primitives)."""
        got: dict[str, Any]
        if self.what == "grad_scores":
            got = {n: sp.gradient_scores() for n, sp in params.items()}
        elif self.what == "dense_grad":
            got = {n: sp.dense_gradient() for n, sp in params.items()}
        else:  # the active entries' gradient only
            got = {n: sp.active_grad_scores() for n, sp in params.items()}
        return {n: g for n, g in got.items() if g is not None}


@dataclass(frozen=True)
class Context:
    """What a policy may read and do, built by the sparsifier for each call.

    ``step``: optimizer steps done (the update's own step, in ``update``); ``epoch``; ``when``:
    the policy's schedule as the sparsifier resolved it (``end_fraction`` turned into ``end_step``);
    ``epoch_end_updates``: epoch-end updates made before this one; ``generator``: the one random
    generator (on the CPU, seeded the same on every rank); ``params``: the per-tensor views
    (:class:`~dynsparse.sparse.storage.SparseStorage`: masked or CSR), by name; ``signals``: what
    the policy's ``needs`` asked for (empty when it asked for nothing or it was not gathered); ``new_weights``:
    ``"zero"`` or ``"initial"``."""

    step: int
    epoch: int
    when: When
    epoch_end_updates: int
    generator: torch.Generator
    params: Mapping[str, SparseStorage]
    signals: Mapping[str, Any]
    new_weights: str
    _commit: Callable[[SparseStorage], None]

    def grow(self, sp: SparseStorage, flat_idx: FlatIndices) -> int:
        """Activate ``flat_idx`` of ``sp`` with new weights that are zero, or drawn from the
        initial distribution with ``new_weights="initial"``; returns how many."""
        count = flat_idx.numel()
        values = None
        if self.new_weights == "initial" and count:
            values = torch.randn(count, sp.slice_size, generator=self.generator,
                                 device=self.generator.device) * sp.new_weights_std()
        sp.activate(flat_idx, values)
        return count

    def commit(self, sp: SparseStorage) -> None:
        """Make the optimizer state follow ``sp``'s new topology (CSR storage moves its values and
        moments now; masked storage: nothing to do until the masks are applied)."""
        self._commit(sp)


class Policy(abc.ABC):
    """Which connections to drop and grow (``update``, required), and ``when`` (a
    :class:`~dynsparse.sparse.when.When`; the sparsifier resolves it into its own copy and never
    writes to the policy). ``update`` returns (dropped, grown). Most policies derive from
    :class:`~dynsparse.sparse.dropgrow.DropGrow` and override one or two of its steps.

    Class attributes: ``needs`` (a :class:`Needs`, or None: no signal), ``record_events``
    (False for policies that update every step, as DeepR: totals only)."""

    when: When = Never()
    needs: Needs | None = None
    record_events = True

    @abc.abstractmethod
    def update(self, ctx: Context) -> tuple[int, int]:
        """Change the topology of ``ctx.params``; return (dropped, grown)."""

    # ---- optional hooks: each default is the documented behaviour of a policy without one ----
    def attach(self, ctx: Context) -> None:  # noqa: B027 (optional by design, documented default)
        """Optional. Called once the masks are applied to the weights (again after masks are
        copied from elsewhere): a policy that keeps per-weight state (DeepR's signs) takes it
        here. Default: nothing to take."""

    def before_optimizer_step(self, ctx: Context) -> None:  # noqa: B027 (optional by design, documented default)
        """Optional. Per-step hook while ``when`` is active, before the gradients are masked
        (DeepR's noise, SNFS's momentum from ``ctx.signals``). Default: nothing per step."""

    def metrics(self) -> dict:
        """Optional. Scalars worth logging (e.g. DSR's ``threshold``). Default: none."""
        return {}

    def state_dict(self) -> dict:
        """Optional. What a checkpoint must hold to continue exactly. Default: nothing (a policy
        whose state is its constructor's arguments)."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:  # noqa: B027 (optional by design, documented default)
        """Optional. The inverse of ``state_dict``. Default: nothing to load."""
