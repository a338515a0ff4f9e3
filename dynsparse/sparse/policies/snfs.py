"""Sparse momentum (Dettmers & Zettlemoyer 2019): RigL with momentum scores and a
momentum-proportional allocation."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import allocate_proportionally
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policies.rigl import RigL
from dynsparse.sparse.policy import Context, Needs
from dynsparse.sparse.storage import GrowScores, SparseStorage
from dynsparse.sparse.when import When


# Dettmers & Zettlemoyer update once per epoch (their prune rate 0.5 is per epoch)
@register_policy("snfs", help="sparse momentum / SNFS (Dettmers & Zettlemoyer 2019)", cost="dense-grad-every-step",
                 schedule="epoch-until-end", fields={"fraction": "drop_fraction"})
class SNFS(RigL):
    """At each update (the paper and the command line: once per epoch) until ``end_step``, each
    layer drops the fraction ``p_t`` (cosine-decayed from ``fraction``) of its active entries with
    the smallest magnitude; the total dropped is regrown across layers in proportion to each
    layer's mean momentum magnitude over its active entries (before the drop), and within a layer
    where the momentum magnitude is largest. Counts are exact (growth capped by free space,
    surplus passed on), so the sparsity never drifts (sparse_learning issue #22). The momentum is
    the policy's own dense exponential average of the gradient, ``m = beta m + g``, because the
    optimizer's momentum is kept zero off the mask here."""

    needs = Needs("dense_grad", at="step")  # the momentum is dense, every step

    def __init__(self, fraction: float = 0.5, beta: float = 0.9, when: When | None = None) -> None:
        super().__init__(fraction, when)
        if not 0.0 <= beta < 1.0:
            raise DynsparseError(f"the momentum beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.momentum: dict[str, torch.Tensor] = {}
        self.importance: list[float] = []
        self.momentum_scores: dict[str, GrowScores] = {}  # grow scores of the update being made

    def attach(self, ctx: Context) -> None:
        self._params = ctx.params  # where the weights live, for a loaded momentum
        # allocated up front (0 * beta + g is g exactly), so that a state_dict taken before the
        # first step already holds every momentum: torch.distributed.checkpoint loads into it
        self.momentum = {n: sp.dense_zeros() for n, sp in ctx.params.items()}

    def before_optimizer_step(self, ctx: Context) -> None:
        for name, g in ctx.signals.items():
            m = self.momentum.get(name)
            if m is not None and m.device != g.device:  # the model was moved (model.to(...))
                m = m.to(g.device)
            self.momentum[name] = g.detach().clone() if m is None else m.mul_(self.beta).add_(g)

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.momentum_scores = {n: sp.dense_scores(self.momentum[n]) for n, sp in ctx.params.items()}
        self.importance = torch.stack([sp.active_mean(self.momentum_scores[n])
                                       for n, sp in ctx.params.items()]).tolist()

    def allocate(self, ctx: Context, sps: list[SparseStorage], dropped: list[int]) -> list[int]:
        return allocate_proportionally(sps, dropped, self.importance)

    def grow_scores(self, ctx: Context, sp: SparseStorage) -> GrowScores | None:
        return self.momentum_scores.get(sp.name)

    def update(self, ctx: Context) -> tuple[int, int]:
        out = super().update(ctx) if self.momentum else (0, 0)
        self.momentum_scores = {}
        return out

    def state_dict(self) -> dict:
        return {"fraction": self.fraction, "beta": self.beta,
                "momentum": {n: t.clone() for n, t in self.momentum.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.fraction, self.beta = float(state["fraction"]), float(state["beta"])
        # on the weights' device, whatever map_location the checkpoint was read with
        params = getattr(self, "_params", {})
        for sp in params.values():
            sp.follow()  # the topology (and so ``device``) is where the weight is
        self.momentum = {n: t.to(params[n].device, copy=True) if n in params else t.clone()
                         for n, t in state["momentum"].items()}
