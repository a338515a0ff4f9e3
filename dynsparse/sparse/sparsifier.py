"""The sparsifier: binds a model, its optimizer and a policy, and owns the one step counter.

Use it in any training loop, with any ``nn.Module`` and any ``torch.optim`` optimizer::

    sparsifier = Sparsifier(model, optimizer, policy=DSR(n_prune=600), densities=0.02)
    for epoch in range(epochs):
        sparsifier.set_epoch(epoch)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward()
            sparsifier.before_optimizer_step()   # policy hook (DeepR noise), then grad *= mask
            optimizer.step()
            sparsifier.step()                    # weight *= mask, optimizer state *= mask, maybe rewire
        sparsifier.end_epoch()

Contract after every ``step()``: weights, gradients (as the optimizer saw them) and every
optimizer-state tensor shaped like a sparse weight (SGD momentum, Adam moments) are zero off the
mask. A regrown connection therefore starts with zero optimizer state; the original code never
masked momentum (see docs/deviations.md). *When* the topology changes is the policy's ``when``
(:mod:`dynsparse.sparse.when`); *how* is the policy's ``update``. Each change is recorded as a
``RewireEvent`` in ``events`` (drained by the caller), with per-layer densities.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.masks import SparseParam, conv_and_linear_weights, effective_granularity, random_mask
from dynsparse.sparse.when import Never, When

log = logging.getLogger(__name__)

ZERO_PRESERVING_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
                              torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


@dataclass(frozen=True)
class RewireEvent:
    step: int
    epoch: int
    pruned: int
    grown: int
    threshold: float | None
    densities: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pruned": self.pruned, "grown": self.grown,
                "threshold": self.threshold, "densities": self.densities}


class Policy:
    """Which connections to drop and grow, and ``when`` (a :class:`~dynsparse.sparse.when.When`).
    ``update`` returns (dropped, grown). Most policies derive from
    :class:`~dynsparse.sparse.dropgrow.DropGrow` and override one or two of its steps."""

    when: When = Never()
    record_events = True  # False for policies that update every step (DeepR): totals only

    def attach(self, s: "Sparsifier") -> None:
        """Called once the sparsifier's masks are applied (e.g. DeepR records signs)."""

    def before_optimizer_step(self, s: "Sparsifier") -> None:
        """Per-step hook before the gradients are masked (while ``when`` is active)."""

    def update(self, s: "Sparsifier") -> tuple[int, int]:
        return 0, 0

    def metrics(self) -> dict:
        """Scalars worth logging (e.g. DSR's threshold)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


class Sparsifier:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, policy: Policy,
                 densities: float | Mapping[str, float], granularity: int = 4, new_weights: str = "zero",
                 seed: int = 0, mask_optimizer_state: bool = True) -> None:
        """``densities``: one density for every conv/linear weight, or ``{param name: density}``
        (the kept fraction, in (0, 1]). ``new_weights``: ``"zero"`` (the paper) or ``"initial"``
        (the original's ``--big-new-weights``: drawn from the initial distribution).
        ``mask_optimizer_state=False`` leaves optimizer state off the mask alone, as the original
        did (a regrown weight then inherits whatever momentum its position had)."""
        if new_weights not in ("zero", "initial"):
            raise DynsparseError(f"new_weights must be 'zero' or 'initial', got {new_weights!r}")
        self.model, self.optimizer, self.policy = model, optimizer, policy
        self.new_weights, self.mask_optimizer_state = new_weights, mask_optimizer_state
        self.after_update = None  # e.g. the distributed consistency check
        # With a masked gradient and zero state off the mask, these optimizers leave zero weights
        # at zero (weight decay of 0 is 0), so the weights need no re-masking every step; any
        # other optimizer (it might move weights without a gradient) gets it after every step.
        self.remask_weights = not (mask_optimizer_state and isinstance(optimizer, ZERO_PRESERVING_OPTIMIZERS))
        self.step_count, self.epoch, self.epoch_end_updates = 0, 0, 0
        self.events: list[RewireEvent] = []
        self.total_pruned = self.total_grown = 0
        named = dict(model.named_parameters())
        if not isinstance(densities, Mapping):
            densities = {n: float(densities) for n in conv_and_linear_weights(model)}
        if not densities:
            raise DynsparseError("no sparse parameters: the model has no conv or linear weights selected")
        unknown = sorted(set(densities) - set(named))
        if unknown:
            raise DynsparseError(f"unknown parameter names {unknown}; the model's parameters: {sorted(named)}")
        first = named[next(iter(densities))]
        self.generator = torch.Generator(device=first.device)
        self.generator.manual_seed(seed)
        self.params: dict[str, SparseParam] = {}
        for name, density in densities.items():
            if not 0.0 < density <= 1.0:
                raise DynsparseError(f"density of {name} must be in (0, 1] (sparsity in [0, 1)), got {density}")
            p = named[name]
            g = effective_granularity(p, granularity)
            mask, active = random_mask(p.shape[:g], density, self.generator, p.device)
            if active == 0:
                raise DynsparseError(f"{name} would keep no entry at density {density} ({mask.numel()} entries)")
            self.params[name] = SparseParam(name, p, g, mask, active)
        self.apply_masks()
        policy.attach(self)

    # ---- the loop's hooks -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.policy.when.active(self.epoch):
            self.policy.before_optimizer_step(self)
        for sp in self.params.values():
            if sp.param.grad is not None:
                sp.param.grad.mul_(sp.mask_view())

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        # Gradients were masked, and optimizer state is zero off the mask since the last topology
        # change, so zero-preserving optimizers keep weights and state zero there; _record()
        # re-masks everything after a topology change.
        if self.remask_weights:
            self.apply_masks(optimizer_state=False)
        if self.policy.when.due(self.step_count, self.epoch):
            self._record(*self.policy.update(self))

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Called after the last step of an epoch: epoch-driven policies (gradual pruning) act here."""
        if self.policy.when.due_at_epoch_end(self.epoch, self.epoch_end_updates):
            self.epoch_end_updates += 1
            self._record(*self.policy.update(self))

    def _record(self, pruned: int, grown: int) -> None:
        self.apply_masks()
        if self.after_update is not None:
            self.after_update()
        self.total_pruned += pruned
        self.total_grown += grown
        if self.policy.record_events:
            self.events.append(RewireEvent(self.step_count, self.epoch, pruned, grown,
                                           self.policy.metrics().get("threshold"), self.densities()))

    # ---- masks ----------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self, optimizer_state: bool = True) -> None:
        """Zero weights (and, unless told otherwise, shaped optimizer state) off the mask."""
        for sp in self.params.values():
            m = sp.mask_view()
            sp.param.mul_(m)
            if optimizer_state and self.optimizer is not None and self.mask_optimizer_state:
                for buf in self.optimizer.state.get(sp.param, {}).values():
                    if torch.is_tensor(buf) and buf.shape == sp.param.shape:
                        buf.mul_(m)

    def grow(self, sp: SparseParam, flat_idx: torch.Tensor) -> int:
        """Activate ``flat_idx`` with new weights that are zero, or drawn from the initial
        distribution with ``new_weights="initial"``; returns how many."""
        count = flat_idx.numel()
        values = None
        if self.new_weights == "initial" and count:
            values = torch.randn(count, sp.slice_size, generator=self.generator,
                                 device=self.generator.device) * sp.new_weights_std()
        sp.activate(flat_idx, values)
        return count

    # ---- statistics -------------------------------------------------------------------------
    def densities(self) -> dict[str, float]:
        return {n: sp.density for n, sp in self.params.items()}

    def num_active_weights(self) -> int:
        return sum(sp.num_active * sp.slice_size for sp in self.params.values())

    def num_sparse_weights(self) -> int:
        return sum(sp.param.numel() for sp in self.params.values())

    def param_counts(self) -> dict[str, int]:
        """Active weights of the sparse tensors and the size of those tensors (the run's
        parameter accounting adds the dense rest)."""
        return {"sparse": self.num_active_weights(), "sparse_total": self.num_sparse_weights(), "tied": 0}

    def metrics(self) -> dict:
        """The policy's scalars (``threshold``: DSR's H, None for others) and per-layer densities."""
        return {"threshold": self.policy.metrics().get("threshold"), "densities": self.densities()}

    def totals(self) -> dict[str, int]:
        return {"total_pruned": self.total_pruned, "total_grown": self.total_grown}

    def drain_events(self) -> list[RewireEvent]:
        events, self.events = self.events, []
        return events

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": {n: sp.mask.clone() for n, sp in self.params.items()},
                "step_count": self.step_count, "epoch": self.epoch, "epoch_end_updates": self.epoch_end_updates,
                "totals": [self.total_pruned, self.total_grown],
                "generator": self.generator.get_state(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self._load_masks(state["masks"])
        self.step_count, self.epoch = int(state["step_count"]), int(state["epoch"])
        # checkpoints from before epoch_end_updates kept the prune count in the pruning policy
        self.epoch_end_updates = int(state.get("epoch_end_updates", state["policy"].get("done", 0)))
        self.total_pruned, self.total_grown = (int(v) for v in state["totals"])
        self.generator.set_state(state["generator"])
        self.policy.load_state_dict(state["policy"])
        self.apply_masks()

    def restore(self, state: Mapping | None, *, exact: bool) -> None:
        """After the model (and optimizer) were loaded from a checkpoint: ``exact`` continues the
        saved sparsifier; otherwise only its masks are taken (another run's, keeping our own
        counters, threshold and generator). Either way the loaded weights and optimizer state
        are made to obey the masks."""
        if state is not None and exact:
            self.load_state_dict(state)
        elif state is not None:
            self._load_masks(state["masks"])
        self.apply_masks()

    def _load_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        if set(masks) != set(self.params):
            raise DynsparseError(f"checkpoint masks are for parameters {sorted(masks)}, "
                                 f"this model's sparse parameters are {sorted(self.params)}")
        for n, sp in self.params.items():
            if masks[n].shape != sp.mask.shape:
                raise DynsparseError(f"checkpoint mask of {n} has shape {tuple(masks[n].shape)}, "
                                     f"expected {tuple(sp.mask.shape)} (a different --sub-kernel-granularity?)")
            sp.mask.copy_(masks[n].to(sp.mask.device, torch.bool))
            sp.num_active = int(sp.mask.sum())
