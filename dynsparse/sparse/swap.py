"""DeepR's every-step exchange on the masked storage, with no host sync: drop the flagged active
entries and grow as many uniformly at random among the free ones, the count known only on the
device. CSR storage (CPU only) does the same from the same draws in
:meth:`~dynsparse.sparse.storage.csr.CSRParam.swap_random`."""
from __future__ import annotations

import torch

from dynsparse.sparse.draws import ranked_draws


def swap_random(sp, drop: torch.Tensor, count: torch.Tensor, generator: torch.Generator,
                new_std: float | None = None) -> torch.Tensor:
    """Drop the active entries of ``sp`` (a :class:`~dynsparse.sparse.storage.masked.SparseParam`) flagged
    in the flat bool ``drop`` (``count`` of them, a 0-dim tensor) and grow as many at random, all
    on the device; the number of active entries is unchanged (should the draws find fewer free
    entries, only that many of the first flagged are dropped). New weights ``N(0, new_std)``,
    else zero. Returns how many changed (0-dim)."""
    flat, n = sp.mask.view(-1), sp.num_entries
    bound = min(sp.num_active, sp.num_free)
    if bound == 0:
        return torch.zeros((), dtype=torch.long, device=flat.device)
    idx, rank = ranked_draws(n, bound, sp.num_free, generator, flat.device, lambda i: ~flat[i], lambda: ~flat)
    grown = torch.minimum(count, rank.max())
    take = (rank > 0) & (rank <= grown)
    at = torch.where(take, idx, n)  # the rest write to a spare slot: duplicates never clash
    new = torch.zeros(n + 1, dtype=torch.bool, device=flat.device).index_fill_(0, at, True)[:n]
    active = sp.active_indices()  # cached: DeepR's noise read it at this mask
    flagged = drop[active]
    flat.index_put_((active,), ~(flagged & (flagged.cumsum(0) <= grown)))  # the first ``grown`` dropped
    flat.logical_or_(new)
    if new_std is not None:
        w = sp.param.detach()
        values = torch.randn(idx.numel(), sp.slice_size, generator=generator, device=generator.device)
        full = torch.zeros(n, sp.slice_size, device=w.device, dtype=w.dtype)
        # accumulated: a repeated draw adds zero, and the sum is deterministic on CUDA
        full.index_put_((idx,), values.to(w) * take.unsqueeze(1) * new_std, accumulate=True)
        # new entries' weights were zero; a sharded tensor adds its rows of the same whole draw
        getattr(sp, "add_whole_", w.add_)(full.view(w.shape))
    return grown
