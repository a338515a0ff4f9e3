"""The storage protocol: what a policy and the sparsifier may do with one sparse tensor.

Two storages implement it: masked (:class:`~dynsparse.sparse.masks.SparseParam`, a dense weight and
a bool mask; FSDP's :class:`~dynsparse.sparse.sharded.ShardedParam` is one) and CSR
(:class:`~dynsparse.sparse.csr_param.CSRParam`, only the active entries are stored). ``mypy``
checks that each satisfies :class:`SparseStorage` (the ``TYPE_CHECKING`` block at the end), and
``tests/test_storage_protocol.py`` runs the same behavioural tests against both.

Two kinds of index appear below. A *drop-side handle* names an active entry: a flat index into
the weight for masked storage, a position among the stored entries for CSR. Drop-side scores and
flags are indexed by these handles. A *flat index* names a position of the dense weight: what the
grow primitives return and ``activate`` takes. For masked storage the two coincide, which is why
code written against the masked storage alone may mix them; a policy must not.

This is a first, additive step (issue 24, item 3). What still leaks is stated where it leaks, and
in docs/layout.md: ``grow_top``'s scores, ``grow_*``'s ``exclude``, ``capture`` (CSR only) and
``param.grad`` read directly by some policies and the sparsifier.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: the storages import nothing from here
    from dynsparse.sparse.csr_param import RowScores


@runtime_checkable
class SparseStorage(Protocol):
    """One sparse tensor as the policies see it (``Context.params`` values)."""

    # ---- identity and sizes ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The parameter's name in the model (``"fc1.weight"``)."""

    @property
    def storage(self) -> str:
        """``"masked"`` or ``"csr"``. Code that branches on it is what this protocol should replace."""

    @property
    def param(self) -> nn.Parameter:
        """The trained parameter: the dense weight (masked) or the stored values (CSR). Reading its
        ``.grad`` directly (DeepR, MEST's signal, the sparsifier) is a leak: its shape differs."""

    @property
    def granularity(self) -> int:
        """How many leading dims of the weight one mask entry spans (2 for linear and CSR)."""

    @property
    def slice_size(self) -> int:
        """Weights per mask entry (a kernel slice at coarse granularity; 1 for CSR)."""

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape."""

    @property
    def device(self) -> torch.device:
        """Where the topology lives."""

    @property
    def num_entries(self) -> int:
        """Mask entries in the dense weight (active or not)."""

    @property
    def num_active(self) -> int:
        """Active entries now (a host-side count, kept in step by ``drop`` and ``activate``)."""

    @property
    def num_free(self) -> int:
        """``num_entries - num_active``."""

    @property
    def density(self) -> float:
        """``num_active / num_entries``."""

    def follow(self) -> None:
        """After ``model.to(device)``: make the topology follow the weight (CSR refuses non-CPU)."""

    # ---- scores (drop side: indexed by handles) --------------------------------------------------
    def active_indices(self) -> torch.Tensor:
        """Drop-side handles of every active entry."""

    def scores(self, t: torch.Tensor) -> torch.Tensor:
        """``|t|`` per entry for a tensor shaped like ``param``: drop-side for the masked storage
        (which is also its grow side), per stored entry for CSR."""

    def magnitude(self) -> torch.Tensor:
        """``scores(param)``: the absolute weight of each entry, zero where masked off."""

    def active_mean(self, scores: torch.Tensor) -> torch.Tensor:
        """Mean of ``scores`` over the active entries (0-dim). Leak: CSR guesses from ``numel``
        whether it got drop-side or grow-side scores."""

    # ---- drop ------------------------------------------------------------------------------------
    def drop(self, flat_idx: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Deactivate the active entries named by drop-side handles; returns them."""

    def lowest_active(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        """Drop-side handles of the ``count`` active entries with the smallest ``scores``."""

    def active_below(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool per handle: active and ``scores < threshold`` (DSR)."""

    def largest_active(self, scores: torch.Tensor) -> torch.Tensor:
        """The handle of the active entry with the largest score (0-dim)."""

    def only_active(self, flags: torch.Tensor) -> torch.Tensor:
        """Drop-side bool ``flags`` restricted to the active entries."""

    def fill_inactive(self, scores: torch.Tensor, value: float) -> torch.Tensor:
        """A copy of drop-side ``scores`` with ``value`` at inactive entries."""

    # ---- gradient signals ------------------------------------------------------------------------
    def gradient_scores(self) -> torch.Tensor | RowScores | None:
        """Grow-side scores of the dense gradient (RigL), None without one. Leak: a Tensor over
        every flat entry for the masked storage, a :class:`RowScores` (computed a block of rows
        at a time, never dense) for CSR; only ``grow_top`` and ``active_mean`` accept both."""

    def dense_gradient(self) -> torch.Tensor | None:
        """The dense gradient shaped like the weight (SNFS's momentum), None without one."""

    # ---- grow (returns flat indices, not yet active) ----------------------------------------------
    def grow_random(self, count: int, exclude: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """``count`` uniformly random inactive flat indices, none in ``exclude`` (fewer when space
        runs out). Leak: masked reads ``exclude`` as the flat indices just dropped; CSR uses only
        ``exclude.numel()`` as a count, because every entry active before this change (the
        dropped ones included) is already excluded, and its drop handles are not flat indices."""

    def grow_top(self, scores: Any, count: int, exclude: torch.Tensor | None) -> torch.Tensor:
        """The ``count`` inactive flat indices with the largest grow-side ``scores``, none in
        ``exclude`` (same leak as ``grow_random``). ``scores``: a Tensor over every flat entry
        (both storages) or, for CSR only, a :class:`RowScores` from ``gradient_scores``."""

    def activate(self, flat_idx: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Turn flat entries on, at zero or at ``values`` (``[count, slice_size]``)."""

    def swap_random(self, drop: torch.Tensor, count: torch.Tensor, generator: torch.Generator,
                    new_std: float | None = None) -> torch.Tensor:
        """DeepR's exchange: drop the flagged active entries and grow as many at random."""

    def new_weights_std(self) -> float:
        """Std of the re-initialization of new connections (``--big-new-weights``)."""

    # ---- making a change stick -------------------------------------------------------------------
    def commit(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End of a topology change: CSR moves its values and optimizer state; masked does nothing."""

    def apply_(self) -> None:
        """Zero the weights off the topology (nothing is stored there for CSR)."""

    def apply_masks(self, optimizer: torch.optim.Optimizer | None) -> None:
        """``apply_`` and, with ``optimizer``, zero its per-weight state off the topology."""

    def mask_grad_(self, g: torch.Tensor) -> None:
        """Zero ``g`` (shaped like ``param``) off the topology, in place."""

    # ---- what is stored ---------------------------------------------------------------------------
    def masked_weight(self) -> torch.Tensor:
        """The dense weight with zeros off the topology (for export)."""

    def off_mask_nonzero(self) -> torch.Tensor:
        """Count (0-dim) of weights nonzero off the topology: 0 unless something bypassed it."""

    def nonzero(self) -> torch.Tensor:
        """Count (0-dim) of nonzero stored weights."""

    def topology(self) -> torch.Tensor:
        """The active set as checkpoints save it: a bool mask (masked) or sorted flat indices (CSR)."""

    def load_topology(self, saved: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Take a saved topology in either form (``topology()`` of either storage)."""


if TYPE_CHECKING:  # mypy checks that each storage satisfies the protocol
    from dynsparse.sparse.csr_param import CSRParam
    from dynsparse.sparse.masks import SparseParam
    from dynsparse.sparse.sharded import ShardedParam

    def _conforms(masked: SparseParam, csr: CSRParam, sharded: ShardedParam) -> list[SparseStorage]:
        return [masked, csr, sharded]
