"""The storage protocol: what a policy and the sparsifier may do with one sparse tensor.

Two storages implement it: masked (:class:`~dynsparse.sparse.storage.masked.SparseParam`, a dense weight and
a bool mask; FSDP's :class:`~dynsparse.sparse.storage.sharded.ShardedParam` is one) and CSR
(:class:`~dynsparse.sparse.storage.csr.CSRParam`, only the active entries are stored). ``mypy``
checks that each satisfies :class:`SparseStorage` (the ``TYPE_CHECKING`` block at the end), and
``tests/test_storage_protocol.py`` runs the same behavioural tests against both. Code outside the
storage modules never branches on which storage it has (``tests/test_storage_boundary.py`` checks for
``storage ==``, and that no policy touches ``.param``): what differs is a member below.

Four kinds of value cross the protocol, each with its own type, so that ``mypy`` refuses a policy
that mixes them (for masked storage they hold the same numbers, which is how they got mixed):

* :data:`Handles` name active entries on the *drop side*: a flat index into the weight for masked
  storage, a position among the stored entries for CSR. Drop-side scores and flags (``magnitude``,
  ``active_grad_scores``, ``lowest_active``'s input) are indexed by handles, so a position in such
  a vector *is* a handle (``Handles(torch.nonzero(flags))``).
* :data:`FlatIndices` name positions of the dense weight: what the grow primitives return and
  ``activate`` takes.
* :class:`Dropped` is what ``drop`` returns and ``grow_*`` take as ``exclude``: one storage's
  record of one drop, read only by that storage (masked: the flat indices to avoid; CSR: nothing
  but the count, as every entry active before the change is avoided anyway).
* :class:`GrowScores` are scores over every flat entry (where to grow): a dense vector
  (:class:`DenseScores`) or, for CSR, rows formed a block at a time (``RowScores``).
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NewType, Protocol, runtime_checkable

import torch
from torch import nn

Handles = NewType("Handles", torch.Tensor)
FlatIndices = NewType("FlatIndices", torch.Tensor)


@dataclass(frozen=True)
class Dropped:
    """What ``drop`` returns: the handles it deactivated, to pass to ``grow_*`` as ``exclude``."""

    handles: Handles

    @property
    def count(self) -> int:
        return self.handles.numel()


class GrowScores(abc.ABC):
    """Grow-side scores: one per flat entry of the dense weight, the highest grown first."""

    @abc.abstractmethod
    def flat(self) -> torch.Tensor:
        """Every flat entry's score as one vector (``RowScores`` forms it densely: avoid for CSR)."""


@dataclass(frozen=True, eq=False)
class DenseScores(GrowScores):
    """Grow-side scores held as one vector over every flat entry."""

    scores: torch.Tensor

    def flat(self) -> torch.Tensor:
        return self.scores


@runtime_checkable
class SparseStorage(Protocol):
    """One sparse tensor as the policies and the sparsifier see it (``Context.params`` values)."""

    # ---- identity and sizes ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The parameter's name in the model (``"fc1.weight"``)."""

    @property
    def storage(self) -> str:
        """``"masked"`` or ``"csr"``: for messages and tests. Code never branches on it."""

    @property
    def label(self) -> str:
        """How a listing marks this storage (``dynsparse train --dry-run``): ``""`` (masked, the
        default) or ``"csr"``."""

    @property
    def param(self) -> nn.Parameter:
        """The trained parameter: the dense weight (masked) or the stored values (CSR), for the
        sparsifier's own plumbing (optimizer state, gradient hooks). Policies never read it (its
        shape differs between storages): they use the members below."""

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

    # ---- drop-side scores (indexed by handles) ---------------------------------------------------
    def active_indices(self) -> Handles:
        """Drop-side handles of every active entry."""

    def magnitude(self) -> torch.Tensor:
        """The absolute weight of each entry (mean over a kernel slice), zero where inactive."""

    def active_grad_scores(self) -> torch.Tensor | None:
        """``|grad|`` of each entry from the trained parameter's gradient (zero where inactive:
        the gradient is masked), None without a gradient (MEST)."""

    # ---- drop ------------------------------------------------------------------------------------
    def drop(self, handles: Handles, count: int | None = None) -> Dropped:
        """Deactivate the active entries ``handles``; returns the record ``grow_*`` must avoid."""

    def lowest_active(self, scores: torch.Tensor, count: int) -> Handles:
        """The ``count`` active entries with the smallest drop-side ``scores``."""

    def active_below(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool per handle: active and ``scores < threshold`` (DSR)."""

    def largest_active(self, scores: torch.Tensor) -> Handles:
        """The active entry with the largest score (0-dim)."""

    def only_active(self, flags: torch.Tensor) -> torch.Tensor:
        """Drop-side bool ``flags`` restricted to the active entries."""

    def fill_inactive(self, scores: torch.Tensor, value: float) -> torch.Tensor:
        """A copy of drop-side ``scores`` with ``value`` at inactive entries."""

    # ---- grow-side scores --------------------------------------------------------------------------
    def dense_scores(self, t: torch.Tensor) -> GrowScores:
        """Grow-side scores ``|t|`` (mean over a kernel slice) of a tensor shaped like the dense
        weight (SNFS's momentum), every entry of the whole tensor."""

    def gradient_scores(self) -> GrowScores | None:
        """Grow-side scores of the dense gradient (RigL), None without one: for CSR a ``RowScores``
        formed a block of rows at a time from the captured products, never a dense tensor."""

    def dense_gradient(self) -> torch.Tensor | None:
        """The dense gradient shaped like the weight (SNFS's momentum), None without one."""

    def active_mean(self, scores: GrowScores) -> torch.Tensor:
        """Mean of grow-side ``scores`` over the active entries (0-dim: no host sync)."""

    def dense_zeros(self) -> torch.Tensor:
        """Zeros shaped like ``dense_gradient()`` (a DTensor when sharded): per-weight state a
        policy keeps densely, allocated up front (SNFS's momentum)."""

    # ---- grow (returns flat indices, not yet active) ----------------------------------------------
    def grow_random(self, count: int, exclude: Dropped | None, generator: torch.Generator) -> FlatIndices:
        """``count`` uniformly random inactive flat indices, none just dropped (``exclude``, from
        this storage's ``drop``); fewer when space runs out."""

    def grow_top(self, scores: GrowScores, count: int, exclude: Dropped | None) -> FlatIndices:
        """The ``count`` inactive flat indices with the largest ``scores``, none in ``exclude``."""

    def activate(self, flat_idx: FlatIndices, values: torch.Tensor | None = None) -> None:
        """Turn flat entries on, at zero or at ``values`` (``[count, slice_size]``)."""

    def swap_random(self, drop: torch.Tensor, count: torch.Tensor, generator: torch.Generator,
                    new_std: float | None = None) -> torch.Tensor:
        """DeepR's exchange: drop the flagged (drop-side bool) active entries and grow as many at
        random, without a host sync for masked storage; returns how many (0-dim)."""

    def new_weights_std(self) -> float:
        """Std of the re-initialization of new connections (``--big-new-weights``)."""

    # ---- the gradient and signs of the stored weights (DeepR) -------------------------------------
    @property
    def has_gradient(self) -> bool:
        """Whether the trained parameter holds a gradient now."""

    def add_to_active_grad(self, values: torch.Tensor) -> None:
        """Add ``values`` (one per active entry of the whole tensor, in ``active_indices()`` order)
        to the gradient of the active entries (DeepR's noise; a sharded tensor adds its rows' part)."""

    def signs(self) -> torch.Tensor:
        """``int8`` signs of the stored weights in the storage's own layout (a rank's rows when
        sharded): compared with an earlier copy, their flips are DeepR's drops."""

    def gather_flags(self, flags: torch.Tensor) -> torch.Tensor:
        """Drop-side bool flags (one per handle) from ``flags`` shaped like ``signs()``: a reshape,
        or for a sharded tensor every rank's rows gathered (inside an update)."""

    def state_for_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        """A policy's tensor shaped like ``signs()`` as a checkpoint holds it (a DTensor when
        sharded, so distributed checkpoints save it sharded)."""

    def state_from_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``state_for_checkpoint``, from any placement or a whole tensor."""

    # ---- making a change stick -------------------------------------------------------------------
    def commit(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End of a topology change: CSR moves its values and optimizer state; masked does nothing."""

    def apply_(self) -> None:
        """Zero the weights off the topology (nothing is stored there for CSR)."""

    def apply_masks(self, optimizer: torch.optim.Optimizer | None) -> None:
        """``apply_`` and, with ``optimizer``, zero its per-weight state off the topology."""

    def mask_grad_(self, g: torch.Tensor) -> None:
        """Zero ``g`` (shaped like ``param``) off the topology, in place."""

    # ---- a dense gradient through the gradient hooks (sparse/attach.py) ----------------------------
    def capture(self, want: Callable[[], bool]) -> None:
        """Called after every step: keep what the coming step's dense gradient needs if ``want()``
        (a policy asks for it), else stop keeping it. CSR keeps the products' inputs; masked
        needs nothing here and never asks (its hook sets the off-mask part aside)."""

    @property
    def capturing(self) -> bool:
        """Whether products are being captured for a dense gradient (CSR after ``capture(True)``)."""

    def off_topology_grad(self, g: torch.Tensor) -> torch.Tensor | None:
        """The part of the accumulated gradient ``g`` that masking removes and a dense gradient
        needs (masked: ``g`` off the mask), None where nothing is stored off the topology (CSR)."""

    def note_grad(self, g: torch.Tensor) -> None:
        """A backward pass's gradient ``g`` reached the parameter: a capture keeps the products of
        the passes summed into ``g`` only (masked: nothing to do)."""

    def scale_capture(self, factor: torch.Tensor) -> None:
        """The gradient was scaled by ``factor`` since the backward (``GradScaler.unscale_``,
        clipping): the captured products get the same (masked: nothing captured)."""

    # ---- what is stored ---------------------------------------------------------------------------
    def masked_weight(self) -> torch.Tensor:
        """The dense weight with zeros off the topology (for export)."""

    def to_sparse(self, layout: torch.layout) -> torch.Tensor:
        """The weight's true nonzeros as a torch sparse tensor (``sparse_coo`` or, 2-D only,
        ``sparse_csr``); CSR builds it from the stored entries, never densely."""

    def holds(self, key: str, value: torch.Tensor) -> bool:
        """Whether the model's ``state_dict(keep_vars=True)`` entry ``key`` stores this tensor
        (masked: the parameter, under any of its names; CSR: ``<name>.values`` and its indices)."""

    def export_as(self, key: str) -> str | None:
        """The key under which an export holds ``masked_weight()`` in place of the held entry
        ``key`` (masked: ``key``; CSR: ``<name>`` for ``<name>.values``, None for the indices)."""

    def compact_record(self, model_state: Mapping[str, Any]) -> dict[str, Any] | None:
        """For a compact checkpoint (sparse/compact.py): None to be packed by the active entries
        of the topology (masked), or the record of a tensor the model's state already holds by
        its active entries (CSR; ``{}``: nothing to record, the topology stays as it is)."""

    def load_values(self, dense: torch.Tensor) -> None:
        """Set the weights from ``dense`` (shaped like the weight) at the active entries; zero off
        the topology (``--copy-mask-from``'s fresh values)."""

    def off_mask_nonzero(self) -> torch.Tensor:
        """Count (0-dim) of weights nonzero off the topology: 0 unless something bypassed it."""

    def nonzero(self) -> torch.Tensor:
        """Count (0-dim) of nonzero stored weights."""

    def topology(self) -> torch.Tensor:
        """The active set as checkpoints save it: a bool mask (masked) or sorted flat indices (CSR)."""

    def load_topology(self, saved: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Take a saved topology in either form (``topology()`` of either storage)."""


if TYPE_CHECKING:  # mypy checks that each storage satisfies the protocol
    from dynsparse.sparse.storage.csr import CSRParam
    from dynsparse.sparse.storage.masked import SparseParam
    from dynsparse.sparse.storage.sharded import ShardedParam

    def _conforms(masked: SparseParam, csr: CSRParam, sharded: ShardedParam) -> list[SparseStorage]:
        return [masked, csr, sharded]
