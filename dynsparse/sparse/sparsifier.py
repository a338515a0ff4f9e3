"""The sparsifier: binds a model, its optimizer and a policy, and owns the one step counter.

One line attaches it to any ``nn.Module`` and ``torch.optim`` optimizer; the loop stays as it was::

    sparsifier = Sparsifier(model, optimizer, policy=RigL(), densities=0.1, total_steps=steps)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward()
        optimizer.step()          # gradients were masked as accumulated; weights stay sparse; RigL updates

It registers itself on the optimizer's step hooks and on each sparse parameter's gradient
accumulation (:mod:`dynsparse.sparse.attach`), so gradient accumulation, clipping, AMP's
``GradScaler``, Lightning and the HuggingFace ``Trainer`` need nothing else. The explicit calls
``before_optimizer_step()`` / ``step()`` of earlier versions stay valid: with hooks they are
harmless repeats; with ``hooks=False`` (or ``optimizer=None``) they are the only way in.
``end_epoch()`` (and ``set_epoch`` for schedules by epoch) remains for epoch-driven policies.

Contract after every step: weights, gradients (as the optimizer saw them) and optimizer state
shaped like a sparse weight (momentum, Adam moments) are zero off the mask, so a regrown
connection starts with zero state (the original never masked momentum: docs/deviations.md).
*When* the topology changes is the policy's ``when``; *how* is its ``update``; each change is a
``RewireEvent`` in ``events``. Weights nonzero off the mask before a change (something bypassed
the sparsifier: weights loaded behind its back, another optimizer) raise a DynsparseError.

Order rules: built first, ``sparsifier.load_state_dict`` restores the masks and re-applies them
to the weights, whenever those were loaded. Built on weights that are already sparse (loaded
first), the default masks keep every nonzero weight, topped up with random zero entries to the
density, instead of erasing them; ``init="from_weights"``: masks = the nonzeros exactly.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn

import dynsparse.sparse.export as _export
from dynsparse.errors import DynsparseError
from dynsparse.sparse.attach import StepHooks
from dynsparse.sparse.policy import Context, Needs, Policy, RewireEvent
from dynsparse.sparse.select import resolve_densities, select_weights
from dynsparse.sparse.storage.build import build_params, check_backend, csr_weights, resolve_with_csr
from dynsparse.sparse.storage.sharded import check_policy, whole_masks
from dynsparse.sparse.when import EveryStep, Periodic, with_total_steps

log = logging.getLogger(__name__)
__all__ = ["Context", "Policy", "RewireEvent", "Sparsifier"]

ZERO_PRESERVING_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
                              torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


class Sparsifier:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, policy: Policy,
                 densities: float | str | Mapping[str, float] | None = None, density: float | None = None,
                 include=None, exclude=None, init: str | None = None, total_steps: int | None = None,
                 granularity: int = 4, new_weights: str = "zero", seed: int = 0, mask_optimizer_state: bool = True,
                 hooks: bool = True, backend: str = "masked", batch_size: int | None = None) -> None:
        """``densities``: the kept fraction (in (0, 1]) of every selected weight, ``{param name:
        density}``, or a budget name (``"uniform"``, ``"er"``, ``"erk"``) spreading a total
        ``density`` by the model's own shapes. ``include``/``exclude``: name patterns and module
        types (:mod:`dynsparse.sparse.select`). ``init``: ``None`` (random masks, but weights
        that are already sparse keep their nonzeros), ``"random"``, or ``"from_weights"`` (masks =
        the weights' nonzeros; no densities). ``total_steps``: the optimizer steps of training, given once:
        policies ending at a fraction of training (RigL, SNFS: 75%) end there, and no topology
        change happens at the last step. ``new_weights``: ``"zero"`` (the paper) or
        ``"initial"`` (the original's ``--big-new-weights``). ``mask_optimizer_state=False``
        leaves optimizer state off the mask alone, as the original did. ``hooks=False``: attach
        nothing; the loop calls ``before_optimizer_step()`` and ``step()``. ``backend``: ``"masked"``
        (dense tensor and mask), ``"csr"`` (linear weights and a WideResNet's block convs stored
        truly sparse; same answers, cost proportional to the active entries) or ``"auto"`` (CSR
        where it is faster on CPU at ``batch_size``, required): :mod:`dynsparse.sparse.storage.build`.
        With ``"csr"``/``"auto"`` the constructor changes the model and the optimizer: after
        drawing every mask it calls :func:`dynsparse.sparse.storage.convert.to_csr`, which replaces the
        modules (a WideResNet is converted in place to its batch-innermost twin) and, in
        ``optimizer``'s param groups and state, each dense weight by its value vector."""
        if new_weights not in ("zero", "initial"):
            raise DynsparseError(f"new_weights must be 'zero' or 'initial', got {new_weights!r}")
        if init not in (None, "random", "from_weights"):
            raise DynsparseError(f"init must be 'random' or 'from_weights', got {init!r}")
        check_backend(backend, mask_optimizer_state)
        self.when = with_total_steps(policy.when, total_steps)  # ours: the caller's policy is never written to
        self.model, self.optimizer, self.policy = model, optimizer, policy
        self.new_weights, self.mask_optimizer_state, self.total_steps = new_weights, mask_optimizer_state, total_steps
        self.after_update = None  # e.g. the distributed consistency check
        # With a masked gradient and zero state off the mask, these optimizers leave zero weights
        # at zero (weight decay of 0 is 0), so the weights need no re-masking every step; any
        # other optimizer (it might move weights without a gradient) gets it after every step.
        self.remask_weights = not (mask_optimizer_state and isinstance(optimizer, ZERO_PRESERVING_OPTIMIZERS))
        self.step_count, self.epoch, self.epoch_end_updates = 0, 0, 0
        self.events: list[RewireEvent] = []
        self.signals: dict[str, object] = {}  # what the policy's ``needs`` asked for, for the coming step
        self.total_pruned = self.total_grown = 0
        self._before_done, self._verify = False, True
        if init == "from_weights":
            if densities is not None or density is not None:
                raise DynsparseError("init='from_weights' takes each density from the weights' nonzeros: "
                                     "pass no densities (include/exclude choose the tensors)")
            chosen = dict.fromkeys(select_weights(model, include, exclude), 1.0) | dict.fromkeys(csr_weights(model))
        else:
            chosen = resolve_with_csr(model, densities, density, include, exclude, resolve_densities)
        # always on the CPU (every draw moves its result): a checkpoint restores on any device,
        # and a seed gives the same masks on CPU and GPU
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        # SparseParam (masked) or CSRParam: the same primitives, so policies never know which
        self.params = build_params(model, optimizer, chosen, init=init, granularity=granularity,
                                   generator=self.generator, backend=backend, batch_size=batch_size)
        check_policy(policy, self.params)
        self.apply_masks()
        policy.attach(self.context())
        self._hooks = StepHooks(self) if hooks and optimizer is not None else None
        if self._hooks is not None and isinstance(self.when, Periodic):
            self.when.check_end()  # attached to a loop: say it now, not at its first backward
        self._arm_capture()

    def _arm_capture(self) -> None:
        """Each storage keeps what the coming step's dense gradient needs (CSR: the products'
        inputs) only if the policy needs it."""
        wanted: list[bool] = []

        def want() -> bool:  # asked only by a storage that captures (a schedule may not be resolved yet)
            if not wanted:
                wanted.append(self.when.active(self.epoch) and self.wants_dense_grad())
            return wanted[0]
        for sp in self.params.values():
            sp.capture(want)

    def update_next(self) -> bool:  # whether the coming optimizer step changes the topology
        return self.when.due(self.step_count + 1, self.epoch)

    def _needs_now(self) -> Needs | None:
        """The policy's ``needs`` if it asks for a signal of the coming step."""
        needs = self.policy.needs
        return needs if needs is not None and (needs.at == "step" or self.update_next()) else None

    def wants_dense_grad(self) -> bool:
        return (needs := self._needs_now()) is not None and needs.dense  # then CSR captures, hooks set aside

    def context(self) -> Context:
        """What the policy is handed (:class:`~dynsparse.sparse.policy.Context`), never the sparsifier."""
        return Context(self.step_count, self.epoch, self.when, self.epoch_end_updates, self.generator, self.params,
                       self.signals, self.new_weights, _commit=lambda sp: sp.commit(self.optimizer))

    def remove_hooks(self) -> None:
        """Detach from the optimizer and the gradients; the loop then calls ``before_optimizer_step()``
        and ``step()`` itself (or nothing, to train densely from here on)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    # ---- the loop's hooks -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Needed only for schedules by epoch (a period or temperature as a function of the epoch,
        ``stop_epoch``, gradual pruning at epoch ends)."""
        self.epoch = epoch
        self._arm_capture()

    def before_optimizer_step(self) -> None:
        """Policy hook (DeepR noise, RigL's gradient read), then gradients masked. Done by the
        optimizer's pre-step hook when attached: an explicit call then is a harmless repeat."""
        self._before()

    @torch.no_grad()
    def _before(self) -> None:
        for sp in self.params.values():  # after model.to(...): masks follow (CSR refuses off the CPU)
            sp.follow()
        if self._hooks is not None:
            if self._before_done:
                return
            self._before_done = True
            self._hooks.restore_dense()
            # a host sync: after a load, and before a change unless changes come every step (DeepR)
            if self._verify or (self.update_next() and not isinstance(self.when, EveryStep)):
                _export.check_off_mask_zero(self)
        if self.when.active(self.epoch):
            if (needs := self._needs_now()) is not None:
                self.signals = needs.gather(self.params)
            self.policy.before_optimizer_step(self.context())
            if needs is not None and needs.at == "step":
                self.signals = {}  # read by the hook; not held on to (the dense gradients)
        for name, sp in self.params.items():
            g = sp.param.grad
            # the accumulation hook masked it and nothing has touched it since: no second pass
            if g is not None and not (self._hooks is not None and self._hooks.still_masked(name, g)):
                sp.mask_grad_(g)

    def step(self) -> None:
        """After ``optimizer.step()``: weights masked, maybe a topology change. Done by the
        optimizer's post-step hook when attached: an explicit call then does nothing."""
        if self._hooks is not None and not self._hooks.explicit_step():
            return
        self._after()

    @torch.no_grad()
    def _after(self) -> None:
        self.step_count += 1
        self._before_done, self._verify = False, False
        # Gradients were masked, and optimizer state is zero off the mask since the last topology
        # change, so zero-preserving optimizers keep weights and state zero there; _record()
        # re-masks everything after a topology change.
        if self.remask_weights:
            self.apply_masks(optimizer_state=False)
        last = self.total_steps is not None and self.step_count >= self.total_steps
        if not last and self.when.due(self.step_count, self.epoch):
            self._record(*self._update())
        self._arm_capture()

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Called after the last step of an epoch: epoch-driven policies (gradual pruning) act here."""
        if self.when.due_at_epoch_end(self.epoch, self.epoch_end_updates):
            if self._hooks is not None:
                _export.check_off_mask_zero(self)
            self.epoch_end_updates += 1
            self._record(*self._update())

    def _update(self) -> tuple[int, int]:
        with whole_masks(self.params.values()):  # FSDP2-sharded tensors decide on the whole mask
            out, self.signals = self.policy.update(self.context()), {}  # the signals were for this update
        return out

    def _record(self, pruned: int, grown: int) -> None:
        for sp in self.params.values():  # a policy that drops and grows by hand, not through DropGrow
            sp.commit(self.optimizer)
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
        optimizer = self.optimizer if optimizer_state and self.mask_optimizer_state else None
        for sp in self.params.values():
            sp.apply_masks(optimizer)

    # ---- statistics -------------------------------------------------------------------------
    def densities(self) -> dict[str, float]:
        return {n: sp.density for n, sp in self.params.items()}

    def num_active_weights(self) -> int:
        return sum(sp.num_active * sp.slice_size for sp in self.params.values())

    def num_sparse_weights(self) -> int:
        return sum(math.prod(sp.shape) for sp in self.params.values())

    def num_nonzero_weights(self) -> int:
        """Weights of the sparse tensors that are really nonzero: fewer than the mask entries
        (``num_active_weights``) when entries were regrown at zero and not trained since."""
        return _export.nonzero_weights(self)

    def param_counts(self) -> dict[str, int]:
        """Active weights of the sparse tensors (mask entries), those really nonzero, and the size
        of those tensors (the run's parameter accounting adds the dense rest)."""
        return _export.param_counts(self)

    def summary(self) -> str:
        """A printable table: each sparse tensor (with its other names), shape, density, mask
        entries and true nonzeros, and the totals."""
        return _export.summary(self)

    # ---- export -------------------------------------------------------------------------------
    def export(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the masks applied, as plain tensors (no dynsparse
        object): ``model.load_state_dict(sparsifier.export())`` works without dynsparse."""
        return _export.export(self)

    def sparse_tensors(self, layout: torch.layout = torch.sparse_coo) -> dict[str, torch.Tensor]:
        """Each sparse weight as a torch sparse tensor (``torch.sparse_coo``, or
        ``torch.sparse_csr`` for 2-D weights) holding its true nonzeros."""
        return _export.sparse_tensors(self, layout)

    def metrics(self) -> dict:
        """The policy's scalars (``threshold``: DSR's H, None for others) and per-layer densities."""
        return {"threshold": self.policy.metrics().get("threshold"), "densities": self.densities()}

    def totals(self) -> dict[str, int]:
        # int(): a policy may count on the device (DeepR, to stay free of host syncs)
        return {"total_pruned": int(self.total_pruned), "total_grown": int(self.total_grown)}

    def drain_events(self) -> list[RewireEvent]:
        events, self.events = self.events, []
        return events

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": {n: sp.topology() for n, sp in self.params.items()},
                "step_count": self.step_count, "epoch": self.epoch, "epoch_end_updates": self.epoch_end_updates,
                "totals": list(self.totals().values()),
                "generator": self.generator.get_state(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self._load_masks(state["masks"])
        self.step_count, self.epoch = int(state["step_count"]), int(state["epoch"])
        # checkpoints from before epoch_end_updates kept the prune count in the pruning policy
        self.epoch_end_updates = int(state.get("epoch_end_updates", state["policy"].get("done", 0)))
        self.total_pruned, self.total_grown = (int(v) for v in state["totals"])
        self.generator.set_state(state["generator"].to("cpu"))  # loaded with map_location="cuda" (a resume)
        self.policy.load_state_dict(state["policy"])
        self.apply_masks()
        self._verify = True

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
            sp.load_topology(masks[n], self.optimizer)
