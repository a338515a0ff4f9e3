"""The mask set: one boolean mask per sparse parameter, kept outside the model, and the primitives
every policy is built from.

A mask covers the first ``granularity`` dimensions of its parameter (the original's
``--sub-kernel-granularity``): for a conv weight ``[out, in, kh, kw]``, 4 means one entry per
weight, 2 one entry per ``kh x kw`` kernel slice, 1 one entry per output filter. Linear
weights are always masked per weight, as in the original. The *magnitude* of an entry is
``|w|`` at full granularity and the mean ``|w|`` over the slice otherwise.

Written once here, used by every policy:

* :func:`count_for_density` - the one density-to-count rule, ``int(density * n + 0.1)``;
* :meth:`SparseParam.scores` - an entry score (``|t|``, mean over a slice; ``magnitude``, ``dense_scores``);
* :meth:`SparseParam.drop` / :meth:`SparseParam.lowest_active` / :meth:`SparseParam.active_below`;
* :meth:`SparseParam.grow_random` and :meth:`SparseParam.grow_top` (never at excluded positions);
* :func:`keep_one` - the one "never empty a tensor" rule.

Policies call only the members of the storage protocol
(:class:`~dynsparse.sparse.storage.SparseStorage`), never the mask itself, so the storage behind a
parameter can change without touching a policy: :class:`~dynsparse.sparse.storage.csr.CSRParam`
offers the same members over a truly sparse weight. The drop side's :data:`Handles` are flat entry
indices here (positions in the active list for CSR), the grow side's :data:`FlatIndices` flat
entry indices of the whole ``[out, in, ...]`` weight; ``drop`` returns a :class:`Dropped` record
and grow scores are :class:`GrowScores` (the protocol, :mod:`dynsparse.sparse.storage`, says what
each is). All counts are in mask entries; ``slice_size`` converts them to weights.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.draws import choose_random, count_for_density  # noqa: F401  (re-exported: the one count rule)
from dynsparse.sparse.storage import DenseScores, Dropped, FlatIndices, GrowScores, Handles
from dynsparse.sparse.swap import swap_random

log = logging.getLogger(__name__)


def keep_one(active: int, count: int) -> int:
    """``count`` capped so that a tensor keeps at least one active entry."""
    return max(min(count, active - 1), 0)


class _Counted(Protocol):
    @property
    def num_entries(self) -> int: ...
    @property
    def num_active(self) -> int: ...


class EntryCounts:
    """What both storages derive from ``num_entries`` and ``num_active``."""

    @property
    def num_free(self: _Counted) -> int:
        return self.num_entries - self.num_active

    @property
    def density(self: _Counted) -> float:
        return self.num_active / self.num_entries


@dataclass
class SparseParam(EntryCounts):
    name: str
    param: nn.Parameter
    granularity: int
    mask: torch.Tensor  # bool, shape param.shape[:granularity]
    num_active: int  # host-side count, kept in step with ``mask`` to avoid device syncs
    _cache: dict = field(default_factory=dict, repr=False)  # derived from ``mask``, keyed by its version

    @property
    def slice_size(self) -> int:
        return math.prod(self.param.shape[self.granularity:])

    @property
    def num_entries(self) -> int:
        return self.mask.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def device(self) -> torch.device:
        return self.mask.device

    storage = "masked"
    label = ""

    def follow(self) -> None:
        """After ``model.to(device)``: the mask moves to the weight's device (host-side check)."""
        if self.mask.device != self.param.device:
            self.mask = self.mask.to(self.param.device)
            self._cache.clear()

    def _derived(self, key: str, make):
        # ``mask._version`` changes with every in-place write, so a stale copy is never used; the
        # weight's dtype, device and layout too (``model.to(...)``, ``channels_last``)
        self.follow()
        p = self.param
        version = (self.mask._version, p.dtype, p.device, p.stride())
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            hit = self._cache[key] = (version, make())
        return hit[1]

    def mask_view(self) -> torch.Tensor:
        """The mask as the parameter's dtype, shaped to broadcast against it (cached: multiplying
        by a float mask is several times faster than by a bool one)."""
        shape = self.mask.shape + (1,) * (self.param.dim() - self.granularity)
        return self._derived("float", lambda: self._like_param(self.mask.view(shape).to(self.param.dtype)))

    def _like_param(self, m: torch.Tensor) -> torch.Tensor:
        """``m`` in the weight's memory format (channels_last conv weights): the per-step
        multiplies then never mix layouts."""
        if self.param.dim() == 4 and not self.param.is_contiguous() \
                and self.param.is_contiguous(memory_format=torch.channels_last):
            return m.contiguous(memory_format=torch.channels_last)
        return m

    def inverse_mask_view(self) -> torch.Tensor:
        """``1 - mask_view()``: picks out the entries off the mask (cached)."""
        return self._derived("inverse", lambda: self._like_param(1 - self.mask_view()))

    def active_indices(self) -> Handles:
        """Flat indices of the active entries (cached)."""
        return Handles(self._derived("active", lambda: torch.nonzero_static(self.mask.view(-1),
                                                                            size=self.num_active).view(-1)))

    # ---- scores -------------------------------------------------------------------------
    def scores(self, t: torch.Tensor) -> torch.Tensor:
        """``|t|`` per mask entry (mean over a kernel slice at coarse granularity) for a tensor
        shaped like the parameter (the weight, its gradient, a momentum)."""
        t = t.detach().abs()
        return t.reshape(-1) if self.granularity == t.dim() else t.flatten(self.granularity).mean(-1).reshape(-1)

    def magnitude(self) -> torch.Tensor:
        return self.scores(self.param)

    def active_grad_scores(self) -> torch.Tensor | None:
        return None if self.param.grad is None else self.scores(self.param.grad)

    def active_mean(self, scores: GrowScores) -> torch.Tensor:
        """Mean of ``scores`` over the active entries (a 0-dim tensor: no host sync)."""
        return (scores.flat() * self.mask.view(-1)).sum() / max(self.num_active, 1)

    # ---- drop ---------------------------------------------------------------------------
    def drop(self, flat_idx: Handles, count: int | None = None) -> Dropped:
        """Deactivate the entries ``flat_idx`` (all active); the record holds them (flat indices)."""
        self.mask.view(-1)[flat_idx] = False
        self.num_active -= flat_idx.numel() if count is None else count
        return Dropped(flat_idx)

    def lowest_active(self, scores: torch.Tensor, count: int) -> Handles:
        """Flat indices of the ``count`` active entries with the smallest ``scores``."""
        if count <= 0:
            return Handles(torch.empty(0, dtype=torch.long, device=self.mask.device))
        masked = scores.masked_fill(~self.mask.view(-1), math.inf)
        return Handles(torch.topk(masked, count, largest=False, sorted=False).indices)

    def active_below(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool (flat) of the active entries whose score is below ``threshold``."""
        return (scores < threshold) & self.mask.view(-1)

    def largest_active(self, scores: torch.Tensor) -> Handles:
        return Handles(torch.argmax(scores.masked_fill(~self.mask.view(-1), -1.0)))

    def only_active(self, flags: torch.Tensor) -> torch.Tensor:
        """Drop-side bool ``flags`` restricted to the active entries."""
        return flags & self.mask.view(-1)

    def fill_inactive(self, scores: torch.Tensor, value: float) -> torch.Tensor:
        """Drop-side ``scores`` with ``value`` at inactive entries (a copy)."""
        return scores.masked_fill(~self.mask.view(-1), value)

    # ---- gradients off the mask (grow side) -----------------------------------------------
    def dense_scores(self, t: torch.Tensor) -> GrowScores:
        """Grow-side scores of a tensor shaped like the weight: the drop side's, here."""
        return DenseScores(self.scores(t))

    def gradient_scores(self) -> GrowScores | None:
        """Grow-side scores of the dense gradient (RigL), read in ``before_optimizer_step`` of a
        step when the sparsifier ``wants_dense_grad()`` (the policy's ``needs``); None without a gradient."""
        return None if self.param.grad is None else self.dense_scores(self.param.grad)

    def dense_gradient(self) -> torch.Tensor | None:
        """The dense gradient shaped like the weight (SNFS's momentum), same conditions."""
        return self.param.grad

    def dense_zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.param)

    # ---- the gradient hooks' dense gradient: the off-mask part, set aside before masking ------
    def capture(self, want: Callable[[], bool]) -> None:
        """Nothing to keep: the gradient hook sets the off-mask part aside (``off_topology_grad``)."""

    capturing = False  # no products are captured: the dense gradient is the parameter's own

    def off_topology_grad(self, g: torch.Tensor) -> torch.Tensor | None:
        return g * self.inverse_mask_view()

    def note_grad(self, g: torch.Tensor) -> None:
        """Nothing captured to keep in step with ``g``."""

    def scale_capture(self, factor: torch.Tensor) -> None:
        """Nothing captured to scale (the hooks scale the set-aside part)."""

    # ---- DeepR: the gradient and signs of the weights -----------------------------------------
    @property
    def has_gradient(self) -> bool:
        return self.param.grad is not None

    def add_to_active_grad(self, values: torch.Tensor) -> None:
        g = self.param.grad
        if g is None:
            return
        idx = self.active_indices()  # noise only where it survives the gradient mask
        # by position, not through a flat view: any memory layout (channels_last)
        g.index_put_(torch.unravel_index(idx, g.shape), values.to(g), accumulate=True)

    def signs(self) -> torch.Tensor:
        return torch.sign(self.param.detach()).to(torch.int8)

    def gather_flags(self, flags: torch.Tensor) -> torch.Tensor:
        return flags.reshape(-1)

    def state_for_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def state_from_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # ---- grow ---------------------------------------------------------------------------
    def _free(self, exclude: Dropped | None) -> tuple[torch.Tensor, int]:
        free = ~self.mask.view(-1)
        excluded = 0 if exclude is None else exclude.count
        if excluded and exclude is not None:
            free[exclude.handles] = False  # ``~mask`` is a new tensor: safe to edit; handles are flat here
        return free, self.num_free - excluded

    def grow_random(self, count: int, exclude: Dropped | None, generator: torch.Generator) -> FlatIndices:
        """``count`` uniformly random inactive entries, never those in ``exclude`` (flat indices
        just dropped); fewer when space runs out. Returns their flat indices (not yet active)."""
        free, capacity = self._free(exclude)
        if count > capacity:
            log.warning("%s: no room to grow %d entries, growing %d", self.name, count, capacity)
            count = capacity
        return FlatIndices(choose_random(free, count, generator, num_candidates=capacity))

    def grow_top(self, scores: GrowScores, count: int, exclude: Dropped | None) -> FlatIndices:
        """The ``count`` inactive entries (not in ``exclude``) with the largest ``scores``."""
        free, capacity = self._free(exclude)
        count = min(count, capacity)
        if count <= 0:
            return FlatIndices(torch.empty(0, dtype=torch.long, device=self.mask.device))
        return FlatIndices(torch.topk(scores.flat().masked_fill(~free, -math.inf), count, sorted=False).indices)

    def activate(self, flat_idx: FlatIndices, values: torch.Tensor | None = None) -> None:
        """Turn entries on; their weights are zero (inactive weights are kept at zero) unless
        ``values`` (``[count, slice_size]``) are given."""
        self.mask.view(-1)[flat_idx] = True
        self.num_active += flat_idx.numel()
        if values is not None and flat_idx.numel():
            # indexed by position, not through a flat view: any memory layout (channels_last)
            w = self.param.detach()
            w[torch.unravel_index(flat_idx, self.mask.shape)] = values.to(w).view(-1, *w.shape[self.granularity:])

    def swap_random(self, drop: torch.Tensor, count: torch.Tensor, generator: torch.Generator,
                    new_std: float | None = None) -> torch.Tensor:
        """DeepR's exchange, free of host syncs: :func:`dynsparse.sparse.swap.swap_random`."""
        return swap_random(self, drop, count, generator, new_std)

    def apply_(self) -> None:
        """Zero the weights off the mask."""
        with torch.no_grad():
            self.param.mul_(self.mask_view())

    def commit(self, optimizer: torch.optim.Optimizer | None) -> None:
        """End of a topology change: the mask is already up to date (CSR storage moves here)."""

    @torch.no_grad()
    def apply_masks(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero the weights and, with ``optimizer``, its per-weight state off the mask."""
        m = self.mask_view()
        self.param.mul_(m)
        for buf in ({} if optimizer is None else optimizer.state.get(self.param, {})).values():
            if torch.is_tensor(buf) and buf.shape == self.param.shape:
                buf.mul_(m)

    def mask_grad_(self, g: torch.Tensor) -> None:
        g.mul_(self.mask_view())

    # ---- what is stored -------------------------------------------------------------------
    def masked_weight(self) -> torch.Tensor:
        """The weight with zeros off the mask, dense (for export)."""
        return self.param.detach() * self.mask_view()

    def to_sparse(self, layout: torch.layout) -> torch.Tensor:
        w = self.masked_weight()
        if layout == torch.sparse_csr:
            if w.dim() != 2:
                raise DynsparseError(f"torch.sparse_csr holds 2-D tensors; {self.name} has shape {tuple(w.shape)}: "
                                     "use sparse_coo")
            return w.to_sparse_csr()
        return w.to_sparse().coalesce()

    def holds(self, key: str, value: torch.Tensor) -> bool:
        return value is self.param  # a shared weight: under each of its names

    def export_as(self, key: str) -> str | None:
        return key

    def compact_record(self, model_state: Mapping[str, Any]) -> dict[str, Any] | None:
        return None  # packed by the mask's active entries

    @torch.no_grad()
    def load_values(self, dense: torch.Tensor) -> None:
        self.param.copy_(dense)
        self.apply_()

    def off_mask_nonzero(self) -> torch.Tensor:
        """Count (0-dim tensor) of weights nonzero off the mask: 0 unless bypassed."""
        return (self.param.detach() * self.inverse_mask_view()).ne(0).sum()

    def nonzero(self) -> torch.Tensor:
        return self.param.detach().ne(0).sum()

    def topology(self) -> torch.Tensor:
        """The mask, as saved in checkpoints."""
        return self.mask.clone()

    def load_topology(self, saved: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Take a saved mask (bool, this shape) or sorted flat indices of the active entries
        (as CSR storage saves them)."""
        if saved.dtype != torch.bool:
            flat = saved.to(self.mask.device, torch.int64).view(-1)
            saved = torch.zeros(self.num_entries, dtype=torch.bool, device=self.mask.device)
            saved[flat] = True
            saved = saved.view(self.mask.shape)
        if saved.shape != self.mask.shape:
            raise DynsparseError(f"checkpoint mask of {self.name} has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(self.mask.shape)} (a different --sub-kernel-granularity?)")
        self.mask.copy_(saved.to(self.mask.device))
        self.num_active = int(self.mask.sum())

    def new_weights_std(self) -> float:
        """Std of the original's re-initialization of new connections (``--big-new-weights``):
        conv ``sqrt(2 / (out * kh * kw))``, linear ``1 / sqrt(in)``."""
        shape = self.param.shape
        if self.param.dim() > 2:
            return math.sqrt(2.0 / (shape[0] * math.prod(shape[2:])))
        return 1.0 / math.sqrt(shape[1])


def check_granularity(granularity: int) -> None:
    if granularity not in (1, 2, 3, 4):
        raise DynsparseError(f"--sub-kernel-granularity must be 1, 2, 3 or 4 (the mask granularity), got {granularity}")


def effective_granularity(param: torch.Tensor, granularity: int) -> int:
    """Linear (2-D) weights are always per weight; conv weights take ``granularity`` dims."""
    check_granularity(granularity)
    if param.dim() <= 2:
        return param.dim()
    return min(granularity, param.dim())
