"""The mask set: one boolean mask per sparse parameter, kept outside the model, and the primitives
every policy is built from.

A mask covers the first ``granularity`` dimensions of its parameter (the original's
``--sub-kernel-granularity``): for a conv weight ``[out, in, kh, kw]``, 4 means one entry per
weight, 2 one entry per ``kh x kw`` kernel slice, 1 one entry per output filter. Linear
weights are always masked per weight, as in the original. The *magnitude* of an entry is
``|w|`` at full granularity and the mean ``|w|`` over the slice otherwise.

Written once here, used by every policy:

* :func:`count_for_density` - the one density-to-count rule, ``int(density * n + 0.1)``;
* :meth:`SparseParam.scores` - an entry score (``|t|``, mean over a slice);
* :meth:`SparseParam.drop` / :meth:`SparseParam.lowest_active` / :meth:`SparseParam.active_below`;
* :meth:`SparseParam.grow_random` and :meth:`SparseParam.grow_top` (never at excluded positions);
* :func:`keep_one` - the one "never empty a tensor" rule.

Policies call only these (scores in, flat entry indices out), never the mask itself, so the
storage behind a parameter can change without touching a policy. All counts are in mask
entries; ``slice_size`` converts them to weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dynsparse.errors import DynsparseError

log = logging.getLogger(__name__)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_for_density(entries: int, density: float) -> int:
    """Entries kept at ``density``: ``int(density * n + 0.1)``, the original's count (the 0.1
    absorbs float error such as ``0.3 * 10 = 2.9999...``)."""
    return int(density * entries + 0.1)


def keep_one(active: int, count: int) -> int:
    """``count`` capped so that a tensor keeps at least one active entry."""
    return max(min(count, active - 1), 0)


def conv_and_linear_weights(model: nn.Module) -> list[str]:
    """Names of the ``weight`` of every conv and linear module, in ``named_parameters()`` order
    (a shared weight once, under its first name): the engine's default selection."""
    keep = {f"{name}.weight" if name else "weight"
            for name, m in model.named_modules() if isinstance(m, (*_CONV_TYPES, nn.Linear))}
    return [name for name, _ in model.named_parameters() if name in keep]


@dataclass
class SparseParam:
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
    def num_free(self) -> int:
        return self.num_entries - self.num_active

    @property
    def density(self) -> float:
        return self.num_active / self.num_entries

    def _derived(self, key: str, make):
        # ``mask._version`` changes with every in-place write, so a stale copy is never used
        version = self.mask._version
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            hit = self._cache[key] = (version, make())
        return hit[1]

    def mask_view(self) -> torch.Tensor:
        """The mask as the parameter's dtype, shaped to broadcast against it (cached: multiplying
        by a float mask is several times faster than by a bool one)."""
        shape = self.mask.shape + (1,) * (self.param.dim() - self.granularity)
        return self._derived("float", lambda: self.mask.view(shape).to(self.param.dtype))

    def inverse_mask_view(self) -> torch.Tensor:
        """``1 - mask_view()``: picks out the entries off the mask (cached)."""
        return self._derived("inverse", lambda: 1 - self.mask_view())

    def active_indices(self) -> torch.Tensor:
        """Flat indices of the active entries (cached)."""
        return self._derived("active", lambda: torch.nonzero_static(self.mask.view(-1), size=self.num_active).view(-1))

    # ---- scores -------------------------------------------------------------------------
    def scores(self, t: torch.Tensor) -> torch.Tensor:
        """``|t|`` per mask entry (mean over a kernel slice at coarse granularity) for a tensor
        shaped like the parameter (the weight, its gradient, a momentum)."""
        t = t.detach().abs()
        return t.reshape(-1) if self.granularity == t.dim() else t.flatten(self.granularity).mean(-1).reshape(-1)

    def magnitude(self) -> torch.Tensor:
        return self.scores(self.param)

    def active_mean(self, scores: torch.Tensor) -> torch.Tensor:
        """Mean of ``scores`` over the active entries (a 0-dim tensor: no host sync)."""
        return (scores * self.mask.view(-1)).sum() / max(self.num_active, 1)

    # ---- drop ---------------------------------------------------------------------------
    def drop(self, flat_idx: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Deactivate the entries ``flat_idx`` (all active); returns them."""
        self.mask.view(-1)[flat_idx] = False
        self.num_active -= flat_idx.numel() if count is None else count
        return flat_idx

    def lowest_active(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        """Flat indices of the ``count`` active entries with the smallest ``scores``."""
        if count <= 0:
            return torch.empty(0, dtype=torch.long, device=self.mask.device)
        masked = scores.masked_fill(~self.mask.view(-1), math.inf)
        return torch.topk(masked, count, largest=False, sorted=False).indices

    def active_below(self, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """Bool (flat) of the active entries whose score is below ``threshold``."""
        return (scores < threshold) & self.mask.view(-1)

    def largest_active(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.argmax(scores.masked_fill(~self.mask.view(-1), -1.0))

    # ---- grow ---------------------------------------------------------------------------
    def _free(self, exclude: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        free = ~self.mask.view(-1)
        excluded = 0 if exclude is None else exclude.numel()
        if excluded:
            free[exclude] = False  # ``~mask`` is a new tensor: safe to edit
        return free, self.num_free - excluded

    def grow_random(self, count: int, exclude: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """``count`` uniformly random inactive entries, never those in ``exclude`` (flat indices
        just dropped); fewer when space runs out. Returns their flat indices (not yet active)."""
        free, capacity = self._free(exclude)
        if count > capacity:
            log.warning("%s: no room to grow %d entries, growing %d", self.name, count, capacity)
            count = capacity
        return choose_random(free, count, generator, num_candidates=capacity)

    def grow_top(self, scores: torch.Tensor, count: int, exclude: torch.Tensor | None) -> torch.Tensor:
        """The ``count`` inactive entries (not in ``exclude``) with the largest ``scores``."""
        free, capacity = self._free(exclude)
        count = min(count, capacity)
        if count <= 0:
            return torch.empty(0, dtype=torch.long, device=self.mask.device)
        return torch.topk(scores.masked_fill(~free, -math.inf), count, sorted=False).indices

    def activate(self, flat_idx: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Turn entries on; their weights are zero (inactive weights are kept at zero) unless
        ``values`` (``[count, slice_size]``) are given."""
        self.mask.view(-1)[flat_idx] = True
        self.num_active += flat_idx.numel()
        if values is not None and flat_idx.numel():
            w = self.param.detach().view(self.num_entries, self.slice_size)
            w[flat_idx] = values.to(w)

    def apply_(self) -> None:
        """Zero the weights off the mask."""
        with torch.no_grad():
            self.param.mul_(self.mask_view())

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


def random_mask(shape: torch.Size, density: float, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, int]:
    """Exactly ``count_for_density(n, density)`` ones at uniformly random positions."""
    n = math.prod(shape)
    k = count_for_density(n, density)
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[order[:k]] = True
    return mask.view(shape), k


def nonzero_entries(param: torch.Tensor, granularity: int) -> torch.Tensor:
    """Bool mask of the entries (weights, or slices at coarse granularity) holding a nonzero."""
    nz = param.detach().ne(0)
    return nz if granularity == param.dim() else nz.flatten(granularity).any(-1)


def keep_nonzeros_mask(nonzero: torch.Tensor, density: float, generator: torch.Generator) -> tuple[torch.Tensor, int] | None:
    """For weights that are already sparse (at least half as many zero entries as ``density``
    drops: never a fresh initialization, still a layer that a reallocating method made denser):
    every nonzero entry, topped up with random zero entries to the count. None otherwise."""
    n = nonzero.numel()
    k = count_for_density(n, density)
    have = int(nonzero.sum())
    if not (k < n and have > 0 and 2 * (n - have) >= n - k):
        return None
    flat = nonzero.reshape(-1).clone()
    if have < k:
        flat[choose_random(~flat, k - have, generator, num_candidates=n - have)] = True
    return flat.view(nonzero.shape), max(k, have)


def _first_unique(idx: torch.Tensor) -> torch.Tensor:
    """The distinct values of ``idx`` in order of first appearance."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long, device=idx.device)
    first.scatter_reduce_(0, inverse, torch.arange(idx.numel(), device=idx.device), reduce="amin")
    return uniq[torch.argsort(first)]


def choose_random(candidates: torch.Tensor, count: int, generator: torch.Generator,
                  num_candidates: int | None = None) -> torch.Tensor:
    """Flat indices of ``count`` entries drawn uniformly without replacement where ``candidates``
    (flat bool) is true. ``count`` must not exceed the number of candidates.

    When few are wanted from many (``num_candidates`` known), uniform draws with rejection of
    non-candidates and repeats give the same distribution at O(count) cost; otherwise the top
    ``count`` of a uniform score over all entries."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=candidates.device)
    n = candidates.numel()
    if num_candidates is not None and count * 16 <= num_candidates:
        draws = int(count * n / num_candidates * 1.25) + 16
        for _ in range(4):
            idx = torch.randint(n, (draws,), generator=generator, device=generator.device).to(candidates.device)
            idx = _first_unique(idx[candidates[idx]])
            if idx.numel() >= count:
                return idx[:count]
    scores = torch.rand(candidates.numel(), generator=generator, device=generator.device).to(candidates.device)
    scores.masked_fill_(~candidates, -1.0)
    return torch.topk(scores, count, sorted=False).indices
