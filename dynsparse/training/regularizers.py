"""Sparsity-inducing penalties: L1 (the original's ``--L1-loss-coeff``) and group lasso over conv
kernels (``--conv-group-lasso``: ``sum over kernels of sqrt(sum_{kh,kw} w^2 + 1e-12)``)."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def sparsity_penalty(tensors: Iterable[torch.Tensor], coeff: float, group_lasso: bool = False) -> torch.Tensor | float:
    """``coeff`` times the L1 norm of every tensor, or the group lasso for conv (4-D) tensors."""
    if not coeff:
        return 0.0
    total: torch.Tensor | float = 0.0
    for w in tensors:
        # an FSDP2-sharded (DTensor) weight: the penalty of this rank's rows, whose gradient is
        # exactly theirs (every row sits on one rank); no communication, nor a DTensor sum mixed
        # into the plain loss (FSDP adds the sharded gradient to it)
        w = w.to_local() if hasattr(w, "to_local") else w
        if group_lasso and w.dim() == 4:
            total = total + torch.sqrt(w.pow(2).sum((2, 3)) + 1e-12).sum()
        else:
            total = total + w.abs().sum()
    return coeff * total
