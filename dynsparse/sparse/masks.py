"""Masks kept outside the model: one boolean mask per sparse parameter, keyed by its name.

A mask covers the first ``granularity`` dimensions of its parameter (the original's
``--sub-kernel-granularity``): for a conv weight ``[out, in, kh, kw]``, 4 means one entry per
weight, 2 one entry per ``kh x kw`` kernel slice, 1 one entry per output filter. Linear
weights are always masked per weight, as in the original. The *magnitude* of an entry is
``|w|`` at full granularity and the mean ``|w|`` over the slice otherwise.

The model keeps ordinary dense parameters (so DDP, ``torch.compile`` and ``state_dict`` loading
see a normal model); sparsity is enforced by zeroing weights, gradients and optimizer state off
the mask. All counts here are in mask entries; ``slice_size`` converts them to weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dynsparse.errors import DynsparseError


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

    def active_indices(self) -> torch.Tensor:
        """Flat indices of the active entries (cached)."""
        return self._derived("active", lambda: torch.nonzero_static(self.mask.view(-1), size=self.num_active).view(-1))

    def magnitude(self) -> torch.Tensor:
        """Flat magnitude of every mask entry (mean |w| over a slice at coarse granularity)."""
        w = self.param.detach()
        if self.granularity == w.dim():
            return w.abs().reshape(-1)
        return w.abs().flatten(self.granularity).mean(-1).reshape(-1)

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


def effective_granularity(param: torch.Tensor, granularity: int) -> int:
    """Linear (2-D) weights are always per weight; conv weights take ``granularity`` dims."""
    if not 1 <= granularity <= 4:
        raise DynsparseError(f"sub-kernel granularity must be 1, 2, 3 or 4, got {granularity}")
    if param.dim() <= 2:
        return param.dim()
    return min(granularity, param.dim())


def random_mask(shape: torch.Size, density: float, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, int]:
    """Exactly ``int(density * n + 0.1)`` ones at uniformly random positions (the original's count)."""
    n = math.prod(shape)
    k = int(density * n + 0.1)
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[order[:k]] = True
    return mask.view(shape), k


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
