"""How a sparsifier attaches to a training loop it does not own: optimizer step hooks and
gradient-accumulation hooks, so a loop that only calls ``optimizer.step()`` is sparse.

* Each sparse parameter's gradient is masked as it is accumulated
  (``register_post_accumulate_grad_hook``), so gradient clipping, logging and the optimizer see
  masked gradients, micro-batch by micro-batch.
* A policy that reads the gradient off the mask (RigL before an update, SNFS every step: its
  ``wants_dense_grad()``) gets it: the off-mask part is set aside before masking, summed over
  micro-batches (a fresh accumulation is told apart by the gradient's identity and version),
  and handed back for the policy's ``before_optimizer_step``. If the masked gradient was scaled
  meanwhile (``GradScaler.unscale_``, ``clip_grad_norm_``) the set-aside part gets the same
  factor: the ratio of the masked gradient's ``|g|`` sum now to that sum when the backward pass
  ended (after DDP's averaging), so no version counter is trusted (``unscale_`` bumps none on
  CPU); a power-of-two scale comes out exact. Under ``torch.distributed`` the set-aside part is
  averaged over ranks as DDP averages gradients (one more all-reduce at the steps that need it).
* ``optimizer.step()`` runs the sparsifier's before-step work in a pre-hook (or, when the
  optimizer is given a closure that computes the gradients, as Lightning does, right after
  the closure) and its after-step work in a post-hook. A step that never runs (``GradScaler``
  skipped it for an inf/nan gradient) does not count.
"""
from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.distributed as dist

from dynsparse.sparse.storage.sharded import is_sharded


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StepHooks:
    def __init__(self, s) -> None:
        self.s = s
        self.captured: dict[str, torch.Tensor] = {}  # off-mask gradient set aside, per tensor
        self.seen: dict[str, tuple] = {}  # (weakref to grad, its version after masking)
        self.totals: dict[str, tuple] = {}  # (weakref to grad, masked |grad| sum when the backward ended)
        self._totals_queued = False
        self.stepped = False  # the post-hook ran since the loop's last explicit step()
        self.entered = False  # optimizer.step() began since the last step
        self.handles = [s.optimizer.register_step_pre_hook(self._pre), s.optimizer.register_step_post_hook(self._post)]
        for name, sp in s.params.items():
            if sp.param.requires_grad:
                self.handles.append(sp.param.register_post_accumulate_grad_hook(partial(self._on_grad, name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.captured, self.seen, self.totals = [], {}, {}, {}

    # ---- gradients --------------------------------------------------------------------------
    @torch.no_grad()
    def _on_grad(self, name: str, param: torch.Tensor) -> None:
        g, s = param.grad, self.s
        if g is None:
            return
        sp = s.params[name]
        if sp.capturing:  # CSR: a skipped step's captured products must not outlive its gradient
            sp.note_grad(g)
            self._queue_totals()
            return  # nothing stored off the active entries to mask or set aside
        # the masked storage: the off-mask part set aside before masking, if a policy wants it
        capture = s.when.active(s.epoch) and s.wants_dense_grad()
        off = sp.off_topology_grad(g) if capture else None
        if off is not None:
            prev = self.seen.get(name)
            # the same tensor, changed only by this accumulation: earlier micro-batches are still in it
            accumulating = prev is not None and prev[0]() is g and g._version == prev[1] + 1 and name in self.captured
            self.captured[name] = self.captured[name].add_(off) if accumulating else off
            self._queue_totals()
        sp.mask_grad_(g)
        self.seen[name] = (weakref.ref(g), g._version)

    def _queue_totals(self) -> None:
        """Note the masked gradients' sizes once this backward pass has ended. Queued from a
        callback: DDP queues its averaging when the last bucket is ready, after this hook's first
        call, and the engine runs callbacks queued by callbacks after those queued before."""
        if not self._totals_queued:
            self._totals_queued = True
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(self._record_totals))

    @torch.no_grad()
    def _record_totals(self) -> None:
        self._totals_queued = False
        for name, sp in self.s.params.items():
            g = sp.param.grad
            if g is not None and (name in self.captured or sp.capturing):
                self.totals[name] = (weakref.ref(g), g.abs().sum())

    def still_masked(self, name: str, g: torch.Tensor) -> bool:
        """Whether ``g`` is the gradient the accumulation hook masked, unchanged since."""
        seen = self.seen.get(name)
        return seen is not None and seen[0]() is g and g._version == seen[1]

    @torch.no_grad()
    def restore_dense(self) -> None:
        """Add the set-aside off-mask gradient back, for a policy's ``before_optimizer_step``; a
        CSR weight's captured products get the scale its gradient got since the backward."""
        self._totals_queued = False  # a backward that raised never ran its callbacks
        for name, sp in self.s.params.items():
            ref, total = self.totals.get(name, (lambda: None, None))
            if sp.capturing and ref() is not None and ref() is sp.param.grad:
                sp.scale_capture(torch.where(total > 0, sp.param.grad.abs().sum() / total, torch.ones_like(total)))
        world = _world_size()
        for name, off in self.captured.items():
            g = self.s.params[name].param.grad
            # the masked part was all-reduced by DDP; this part was not (every rank, same order).
            # FSDP2 reduce-scatters the whole gradient before this hook: nothing to add then
            if world > 1 and not is_sharded(off):
                off.div_(world)
                dist.all_reduce(off)
            if g is None:
                continue
            ref, total = self.totals.get(name, (lambda: None, None))
            if ref() is g:  # scaled since the backward (unscale_, clipping): the same factor; else x/x = 1
                off.mul_(torch.where(total > 0, g.abs().sum() / total, torch.ones_like(total)))
            g.add_(off)
        self.captured, self.totals = {}, {}

    # ---- the optimizer's step -----------------------------------------------------------------
    def _pre(self, optimizer, args, kwargs):
        self.entered = True
        # args[0] is the optimizer itself (torch passes the bound call's arguments)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.s._before()
            return None

        def then_sparsify():
            loss = closure()
            self.s._before()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": then_sparsify}
        return (args[0], then_sparsify, *args[2:]), kwargs

    def _post(self, optimizer, args, kwargs) -> None:
        self.entered = False
        self.s._after()
        self.stepped = True

    def explicit_step(self) -> bool:
        """Whether the loop's own ``sparsifier.step()`` still has work to do: not when the
        post-hook did it, nor when ``optimizer.step()`` never ran (a skipped step)."""
        if self.stepped:
            self.stepped = False
            return False
        if not self.entered:
            self.s._before_done = False
            return False
        return True
