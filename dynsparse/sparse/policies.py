"""The reparameterization policies of the paper and its baselines: which entries to drop and grow.

Each is the smallest class that differs. Counts are in mask entries (kernel slices at coarse
granularity), as in the original. Deviations from the 2019 reference code are listed in each
docstring and in docs/deviations.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.sparsifier import Policy, Sparsifier


class Static(Policy):
    """Static sparse: a fixed random mask for the whole of training."""

    name = "static"


class _Periodic(Policy):
    def due(self, s: Sparsifier) -> bool:
        return s.step_count % s.period(s.epoch) == 0


class SET(_Periodic):
    """SET as the original implements it (Mocanu et al. 2018, magnitude variant).

    Every rewire period, each tensor prunes its ``int(f * active) + 1`` smallest-magnitude active
    entries and regrows as many at uniformly random inactive positions of the same tensor, never
    the positions just pruned. Per-layer densities never change. Like the original this is pure
    magnitude pruning, not Mocanu's "smallest positive / largest negative" rule. With ``scaling``
    (the original's ``--rewire-scaling`` without ``--threshold-prune``) the total pruned is regrown
    across tensors in proportion to their surviving entries, as DSR regrows (issue 11).
    """

    name = "set"

    def __init__(self, fraction: float = 0.1, scaling: bool = False) -> None:
        if not 0.0 <= fraction < 1.0:
            raise DynsparseError(f"rewire fraction must be in [0, 1), got {fraction}")
        self.fraction, self.scaling = fraction, scaling

    def update(self, s: Sparsifier) -> tuple[int, int]:
        sps = list(s.params.values())
        counts = [min(int(self.fraction * sp.num_active) + 1, sp.num_active) for sp in sps]
        pruned_idx = [s.prune_smallest(sp, k) for sp, k in zip(sps, counts)]  # draws no random numbers
        targets = counts
        if self.scaling:
            capacity = [sp.num_entries - sp.num_active - k for sp, k in zip(sps, counts)]
            targets = allocate([sp.num_active for sp in sps], sum(counts), capacity)
        grown = sum(s.grow_random(sp, t, exclude=idx) for sp, t, idx in zip(sps, targets, pruned_idx))
        return sum(counts), grown


class DSR(_Periodic):
    """Dynamic sparse reparameterization (Mostafa & Wang 2019, Algorithm 1).

    Every rewire period: prune every active entry whose magnitude is below the global threshold
    H (keeping at least one entry per tensor), then regrow exactly as many entries as were pruned,
    shared over tensors in proportion to their surviving entries (``scaling=True``, the paper's
    ``--rewire-scaling``) or per tensor as many as it pruned (``scaling=False``), at uniformly
    random free positions that exclude the ones just pruned. Then adapt H: halve it when more than
    ``(1 + tolerance) * n_prune`` entries were pruned, double it when fewer than
    ``(1 - tolerance) * n_prune``. H starts at 1e-3.

    Deviations: the rounding of the proportional shares uses the largest-remainder method with
    capacity caps (exact and deterministic) where the original fixed its rounding error on one
    random tensor in a loop; when a tensor loses every entry, the largest-magnitude one is kept
    (the original kept the one with the lowest index).
    """

    name = "dsr"

    def __init__(self, n_prune: int = 600, scaling: bool = True, threshold: float = 1e-3,
                 tolerance: float = 0.1) -> None:
        if n_prune < 1:
            raise DynsparseError(f"--n-prune-params must be >= 1, got {n_prune}")
        self.n_prune, self.scaling, self.threshold, self.tolerance = n_prune, scaling, threshold, tolerance

    def update(self, s: Sparsifier) -> tuple[int, int]:
        sps = list(s.params.values())
        below = [(sp.magnitude() < self.threshold) & sp.mask.view(-1) for sp in sps]
        counts = torch.stack([b.sum() for b in below]).tolist()  # one host sync for all tensors
        pruned_idx = []
        for sp, b, k in zip(sps, below, counts):
            if k == sp.num_active:  # never empty a tensor: keep its largest entry
                keep = torch.argmax(sp.magnitude().masked_fill(~sp.mask.view(-1), -1.0))
                b[keep] = False
                k -= 1
            idx = torch.nonzero_static(b, size=k).view(-1)  # the count is known: no device sync
            pruned_idx.append(idx)
            s.prune(sp, idx, idx.numel())
        pruned = [idx.numel() for idx in pruned_idx]
        total = sum(pruned)
        if self.scaling:
            capacity = [sp.num_entries - sp.num_active - k for sp, k in zip(sps, pruned)]
            targets = allocate([sp.num_active for sp in sps], total, capacity)
        else:
            targets = pruned
        grown = sum(s.grow_random(sp, t, exclude=idx) for sp, t, idx in zip(sps, targets, pruned_idx))
        if total > (1 + self.tolerance) * self.n_prune:
            self.threshold /= 2
        elif total < (1 - self.tolerance) * self.n_prune:
            self.threshold *= 2
        return total, grown

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: Mapping) -> None:
        self.threshold = float(state["threshold"])


def allocate(weights: list[int], total: int, capacity: list[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties to the
    lower index), never above ``capacity``; what a full tensor cannot take goes to the others."""
    out = [0] * len(weights)
    open_ = [i for i, c in enumerate(capacity) if c > 0]
    remaining = min(total, sum(max(c, 0) for c in capacity))
    while remaining > 0 and open_:
        wsum = sum(weights[i] for i in open_)
        shares = {i: (remaining * weights[i] / wsum if wsum else remaining / len(open_)) for i in open_}
        base = {i: math.floor(shares[i]) for i in open_}
        left = remaining - sum(base.values())
        for i in sorted(open_, key=lambda i: (-(shares[i] - base[i]), i))[:left]:
            base[i] += 1
        for i in open_:
            take = min(base[i], capacity[i] - out[i])
            out[i] += take
            remaining -= take
        open_ = [i for i in open_ if out[i] < capacity[i]]
    return out


class DeepR(Policy):
    """DeepR (Bellec et al. 2018) as the original implements it.

    Every step: before the optimizer step, add Gaussian noise of std ``sqrt(2 * eta * T)`` (T from
    the temperature schedule) to the gradients of active weights of tensors that are not fully
    dense; after it, prune active weights whose sign flipped since the last check and regrow as
    many at random in the same tensor, excluding those just pruned. Pair with an L1 penalty
    (``l1_coeff``). Tensors at density 1.0 get neither noise nor pruning, as in the original. The
    recorded signs are taken after regrowth, so with ``--big-new-weights`` they are the signs of
    the new values. Deviation: the signs are recorded after initialization, so the first step does
    not see the original's ~50% spurious sign flips (docs/deviations.md).
    """

    name = "deepr"
    record_events = False

    def __init__(self, eta: float = 0.001) -> None:
        self.eta = eta
        self.signs: dict[str, torch.Tensor] = {}

    def attach(self, s: Sparsifier) -> None:
        self.signs = {n: torch.sign(sp.param.detach()).to(torch.int8) for n, sp in s.params.items()}

    def due(self, s: Sparsifier) -> bool:
        return True

    def before_optimizer_step(self, s: Sparsifier) -> None:
        std = math.sqrt(2.0 * self.eta * s.temperature(s.epoch))
        for sp in s.params.values():
            if sp.param.grad is None or sp.num_active == sp.num_entries or std == 0.0:
                continue
            idx = sp.active_indices()  # noise only where it survives the gradient mask
            noise = torch.randn(idx.numel(), generator=s.generator, device=s.generator.device)
            sp.param.grad.view(-1).index_add_(0, idx, noise.to(sp.param.grad) * std)

    def update(self, s: Sparsifier) -> tuple[int, int]:
        sps = list(s.params.values())
        if any(sp.granularity != sp.param.dim() for sp in sps):
            raise DynsparseError("DeepR needs per-weight masks (--sub-kernel-granularity 4)")
        flips = [(torch.sign(sp.param.detach()).to(torch.int8) * self.signs[sp.name] < 0).view(-1) & sp.mask.view(-1)
                 for sp in sps]
        counts = torch.stack([f.sum() for f in flips]).tolist()
        pruned = grown = 0
        for sp, f, k in zip(sps, flips, counts):
            # issue 11: like the original, a fully dense tensor is left alone; it could not regrow
            # what it pruned (no free position), so it would shrink and the total density drift
            if k and sp.num_active < sp.num_entries:
                idx = torch.nonzero_static(f, size=k).view(-1)
                s.prune(sp, idx, k)
                sp.param.detach().view(-1)[idx] = 0.0
                pruned += k
                grown += s.grow_random(sp, k, exclude=idx)
        for sp in sps:
            self.signs[sp.name] = torch.sign(sp.param.detach()).to(torch.int8)
        return pruned, grown

    def state_dict(self) -> dict:
        return {"eta": self.eta, "signs": {n: t.clone() for n, t in self.signs.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.eta = float(state["eta"])
        self.signs = {n: t.to(self.signs[n].device) for n, t in state["signs"].items()}
