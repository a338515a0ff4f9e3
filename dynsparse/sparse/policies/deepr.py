"""DeepR (Bellec et al. 2018) as the original implements it."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.dropgrow import DropGrow
from dynsparse.sparse.policies.registry import register_policy
from dynsparse.sparse.policy import Context
from dynsparse.sparse.storage import SparseStorage
from dynsparse.sparse.when import EveryStep, When


@register_policy("deepr", help="DeepR (Bellec et al. 2018; --DeepR): sign flips drop, noisy gradient steps",
                 schedule="every-step", fields={"eta": "DeepR_eta"}, context=("temperature",))
class DeepR(DropGrow):
    """Every step: before the optimizer step, add Gaussian noise of std ``sqrt(2 * eta * T)``
    (``T = temperature(epoch)``) to the gradients of active weights of tensors that are not fully
    dense; after it, drop active weights whose sign flipped since the last check and regrow as
    many at random in the same tensor, excluding those just dropped. Pair with an L1 penalty
    (``--L1-loss-coeff``). Tensors at density 1.0 get neither noise nor drops, as in the original
    (a dense tensor could not regrow what it dropped, so the total density would drift). The
    recorded signs are taken after regrowth, so with ``--big-new-weights`` they are the signs of the
    new values. Deviation: the signs are recorded after initialization, so the first
    step does not see the original's ~50% spurious sign flips (docs/deviations.md).

    FSDP2-sharded tensors (:mod:`dynsparse.sparse.storage.sharded`): every rank draws the noise of all the
    tensor's active entries and the regrowth over the whole mask from the same generator, as one
    device does, and applies its rows; each keeps the signs of its rows. Per step that costs an
    all-gather of one integer (where a rank's active entries start) and, at the update, one of
    a byte per entry (the sign flips)."""

    record_events = False


    def __init__(self, eta: float = 0.001, temperature: Callable[[int], float] = lambda epoch: 0.0,
                 when: When | None = None) -> None:
        super().__init__(when if when is not None else EveryStep())
        self.eta, self.temperature = eta, temperature
        self.signs: dict[str, torch.Tensor] = {}
        self._params: Mapping[str, SparseStorage] = {}

    def attach(self, ctx: Context) -> None:
        if any(sp.granularity != len(sp.shape) for sp in ctx.params.values()):
            raise DynsparseError("DeepR needs per-weight masks (--sub-kernel-granularity 4)")
        self.signs = {n: sp.signs() for n, sp in ctx.params.items()}
        self._params = ctx.params  # how each storage checkpoints the signs

    def before_optimizer_step(self, ctx: Context) -> None:
        std = math.sqrt(2.0 * self.eta * self.temperature(ctx.epoch))
        for sp in ctx.params.values():
            if not sp.has_gradient or sp.num_active == sp.num_entries or std == 0.0:
                continue
            # one draw for the whole tensor's active entries (a sharded tensor adds its rows' part)
            sp.add_to_active_grad(torch.randn(sp.num_active, generator=ctx.generator, device=ctx.generator.device)
                                  * std)

    # counts stay on the device (no host sync every step): Policy.update's declared ints are too narrow
    def update(self, ctx: Context) -> tuple[torch.Tensor | int, torch.Tensor | int]:  # type: ignore[override]
        """Drop the sign flips and regrow as many at random, all on the device (no host sync: this
        runs every step; the storages' ``swap_random``). Drops and grows always match, so the
        density never drifts: should the random draws find fewer free entries than there are
        flips (a tensor nearly full, or flips by the thousand), only the first flips are dropped."""
        changed: torch.Tensor | int = 0
        for sp in ctx.params.values():
            sign = self.signs[sp.name].to(sp.device)
            if sp.num_free == 0:
                continue
            # sharded: the whole tensor's flips (the mask is whole during an update)
            flips = sp.only_active(sp.gather_flags(sp.signs() * sign < 0))
            new_std = sp.new_weights_std() if ctx.new_weights == "initial" else None
            changed = changed + sp.swap_random(flips, flips.sum(), ctx.generator, new_std)
        for sp in ctx.params.values():
            ctx.commit(sp)  # CSR storage moves its values now
            sp.apply_()  # dropped weights are zero before their signs are taken
            self.signs[sp.name] = sp.signs()
        return changed, changed

    def state_dict(self) -> dict:
        # sharded: a DTensor, so distributed checkpoints save it sharded and load it on any ranks
        return {"eta": self.eta, "signs": {n: self._params[n].state_for_checkpoint(t.clone()) if n in self._params
                                           else t.clone() for n, t in self.signs.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.eta = float(state["eta"])
        signs = {}
        for n, t in state["signs"].items():
            if n in self._params:  # sharded: any placement, or the whole signs of an unsharded run
                t = self._params[n].state_from_checkpoint(t)
            signs[n] = t.to(self.signs[n].device)
        self.signs = signs
