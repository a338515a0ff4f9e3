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
from dataclasses import dataclass

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

    @property
    def slice_size(self) -> int:
        return math.prod(self.param.shape[self.granularity:])

    @property
    def num_entries(self) -> int:
        return self.mask.numel()

    @property
    def density(self) -> float:
        return self.num_active / self.num_entries

    def mask_view(self) -> torch.Tensor:
        """The mask shaped to broadcast against the parameter."""
        return self.mask.view(self.mask.shape + (1,) * (self.param.dim() - self.granularity))

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


def choose_random(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Flat indices of ``count`` entries drawn uniformly without replacement where ``candidates``
    (flat bool) is true. ``count`` must not exceed the number of candidates."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=candidates.device)
    scores = torch.rand(candidates.numel(), generator=generator, device=generator.device).to(candidates.device)
    scores.masked_fill_(~candidates, -1.0)
    return torch.topk(scores, count, sorted=False).indices
