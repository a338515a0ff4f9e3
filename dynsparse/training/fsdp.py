"""``dynsparse train --fsdp``: the model's parameters sharded over the ranks of a ``torchrun`` job
with FSDP2 (``torch.distributed.fsdp.fully_shard``) instead of replicated by DDP.

Every module that holds parameters is its own FSDP unit (its weights are gathered just for its
forward and backward), the root wraps the rest. The sparsifier keeps each rank's rows of every
mask and decides topology changes on the whole tensors (:mod:`dynsparse.sparse.storage.sharded`): the
same masks and, up to float summation order, the same numbers as one process.

Checkpoints are whole tensors (``checkpoint.pt`` as without ``--fsdp``, gathered on every rank,
written by rank 0), so a run resumes on any number of ranks. Methods tested sharded: dense,
static, SET, DSR, RigL, SNFS, MEST, DeepR and gradual pruning (``--prune``); others (tied
weights) are refused rather than trained untested.
"""
from __future__ import annotations

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.storage.sharded import full_weight, is_sharded, reshard_like

FSDP_METHODS = ("deepr", "dense", "dsr", "mest", "prune", "rigl", "set", "snfs", "static")


def check(cfg, method: str) -> None:
    """Refuse what FSDP2 sharding does not support, in one line."""
    if not cfg.fsdp:
        return
    if cfg.sparse_backend != "masked":
        raise DynsparseError(f"--fsdp shards dense tensors; --sparse-backend {cfg.sparse_backend} (CSR) is "
                             "single-device: use --sparse-backend masked")
    if method not in FSDP_METHODS:
        raise DynsparseError(f"--fsdp is tested with {', '.join(FSDP_METHODS)}; not with {method}")
    for flag, on in (("--copy-mask-from", bool(cfg.copy_mask_from)), ("--compile", cfg.compile),
                     ("--keep-optimizer-state", cfg.keep_optimizer_state)):
        if on:
            raise DynsparseError(f"{flag} is not supported with --fsdp")


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` every module holding parameters of its own, then the root (in place)."""
    from torch.distributed.fsdp import fully_shard
    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)
    return model


def _whole(obj):
    if isinstance(obj, dict):
        return {k: _whole(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_whole(v) for v in obj)
    return full_weight(obj).detach().clone() if torch.is_tensor(obj) else obj


def prepare(cfg, model: nn.Module, info) -> None:
    """Checks, then the model sharded (before its optimizer is built: it must hold the shards)."""
    from dynsparse.training.engine_adapter import method_of
    check(cfg, method_of(cfg))
    if not info.enabled:
        raise DynsparseError("--fsdp shards over the processes of a torchrun job: launch with "
                             "torchrun --nproc-per-node N (N >= 2)")
    shard(model)


def states(run) -> dict:
    """The run's model, optimizer and sparsifier state for ``checkpoint.pt``: whole tensors under
    ``--fsdp`` (optimizer keyed by parameter name; every rank must call it: it gathers)."""
    if not run.cfg.fsdp:
        return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "sparsifier": run.sparsifier.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True))
    state = run.sparsifier.state_dict()
    return {"model": msd, "optimizer": osd, "sparsifier": None if state is None else _whole(state)}


def load_states(run, ckpt: dict) -> dict | None:
    """The inverse of :func:`states` (each rank takes its rows); returns the sparsifier state
    to restore, placed like the live one."""
    if not run.cfg.fsdp:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt.get("sparsifier")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(run.model, run.optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    saved = ckpt.get("sparsifier")
    return None if saved is None else reshard_like(saved, run.sparsifier.state_dict())


class _Whole:
    params: dict[str, _Whole]  # set on the one standing in for the sparsifier

    def __init__(self, tensors) -> None:
        self.tensors = tensors

    def parameters(self):
        return self.tensors

    def topology(self):
        return self.tensors


def check_consistency(model: nn.Module, sparsifier, info, where: str) -> None:
    """``--debug-distributed``: :func:`dynsparse.training.distributed.check_consistency`, on the whole
    tensors when they are sharded (each rank's rows differ by design)."""
    from dynsparse.training import distributed
    if any(is_sharded(p) for p in model.parameters()):
        params = getattr(sparsifier, "params", {})
        masks = {n: _Whole(full_weight(sp.topology())) for n, sp in params.items()}
        whole, whole_sparsifier = _Whole([full_weight(p.detach()) for p in model.parameters()]), _Whole(None)
        whole_sparsifier.params = masks
        distributed.check_consistency(whole, whole_sparsifier, info, where)
        return
    distributed.check_consistency(model, sparsifier, info, where)
