"""Multi-process training under ``torchrun``: setup from the environment, exact metric sums,
and the debug check that every rank holds the same masks and weights.

``torchrun --nproc-per-node N main.py FLAGS`` (or ``... $(which dynsparse) train FLAGS``) sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; the backend is ``nccl`` on CUDA and ``gloo`` on CPU.
Topology decisions are identical on every rank by construction: magnitudes are read from
synchronized weights, gradients after DDP's all-reduce, and random choices from the sparsifier's
generator, seeded the same everywhere. ``--debug-distributed`` verifies it after every update.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from dynsparse.errors import DynsparseError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cuda_index(local_rank: int) -> int:
    """This process's GPU: ``LOCAL_RANK`` among the visible devices, or device 0 when each rank
    sees one GPU (``CUDA_VISIBLE_DEVICES`` set per rank, as schedulers do)."""
    return local_rank % max(torch.cuda.device_count(), 1)


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """Read the torchrun environment, pick the device and start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank, world, local)
    want_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise DynsparseError(f"device {device_name!r} requested but CUDA is not available; use --device cpu")
    if want_cuda:
        device = torch.device("cuda", cuda_index(local) if info.enabled else (torch.device(device_name).index or 0)
                              if device_name.startswith("cuda") else 0)
        torch.cuda.set_device(device)
    elif device_name in ("auto", "cpu"):
        device = torch.device("cpu")
    else:
        raise DynsparseError(f"unknown device {device_name!r}; valid: auto, cpu, cuda, cuda:N")
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_sums(sums: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Sum every value over ranks (exact for counts; float64 for losses)."""
    if not info.enabled:
        return sums
    keys = sorted(sums)
    flat = torch.stack([sums[k].double() for k in keys])
    dist.all_reduce(flat)
    return {k: flat[i].to(sums[k].dtype) for i, k in enumerate(keys)}


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` says a collective failed because another process died or hung."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text


def all_reduce_min(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def rank_ordered_mean_hook(state, bucket):  # no annotation: DDP rejects the string form
    """DDP communication hook: the mean of the ranks' gradients summed in rank order, the same
    order for every element. The default all-reduce sums in an order that depends on where an
    element sits in DDP's gradient buckets, and DDP rebuilds its buckets after the first step, so
    with 3+ ranks (float addition of 3 values is not associative) a resumed run, whose first step
    uses fresh buckets, drifted from an uninterrupted one in the last bits. For 2 ranks the result
    is the default's, bit for bit. Costs world_size/2 times the traffic of an all-reduce: used
    for CPU (gloo) training only."""
    world = dist.get_world_size()
    mine = bucket.buffer().div_(world)
    parts = [torch.empty_like(mine) for _ in range(world)]
    fut = dist.all_gather(parts, mine, async_op=True).get_future()

    def add_in_rank_order(_):
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total
    return fut.then(add_in_rank_order)


def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart during an
    epoch, since each rank normalizes its own shard); DDP does the same before each forward."""
    if info.enabled:
        for buf in syncable_buffers(model):
            dist.broadcast(buf, 0)


def syncable_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every buffer but the index buffers of CSR weights: those are the topology, identical on all
    ranks by construction (``--debug-distributed`` checks it), and sized by it."""
    from dynsparse.sparse.layers.csr_linear import CSRWeight
    csr = {id(b) for m in model.modules() if isinstance(m, CSRWeight) for b in m.buffers()}
    return [b for b in model.buffers() if id(b) not in csr]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _checksum(tensors, device: torch.device) -> torch.Tensor:
    """An order-sensitive checksum of tensors, as float64 on ``device`` (the collective's: a dense
    run has no masks, and a CPU zero next to a CUDA sum cannot be stacked for NCCL)."""
    total = None
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1).to(device, torch.float64)
        pos = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        v = (flat * torch.sin(pos * 0.61803 + i)).sum()
        total = v if total is None else total + v
    return total if total is not None else torch.zeros((), dtype=torch.float64, device=device)


class HasParameters(Protocol):
    """A model, or the whole tensors of a sharded one (``fsdp.check_consistency``)."""

    def parameters(self) -> Iterable[torch.Tensor]: ...


def check_consistency(model: HasParameters, sparsifier, info: DistInfo, where: str) -> None:
    """Raise if any rank's masks or weights differ from the others' (compares checksums)."""
    if not info.enabled:
        return
    masks = [sp.topology() for sp in getattr(sparsifier, "params", {}).values()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    local = torch.stack([_checksum(masks, device), _checksum(model.parameters(), device)])
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        what = "masks" if lo[0] != hi[0] else "weights"
        raise DynsparseError(f"ranks disagree on the {what} {where} (checksums {lo.tolist()} vs {hi.tolist()})")


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _rank_ordered_mean(flat: torch.Tensor) -> torch.Tensor:
    world = dist.get_world_size()
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat.div(world))
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


class SparseDataParallel(torch.nn.Module):
    """DDP's work for a model whose parameters change size during training (CSR storage: a
    layer's value vector grows or shrinks at every topology change), which DDP's fixed gradient
    buckets cannot follow: before each training forward every rank takes rank 0's buffers
    (BatchNorm statistics; not the CSR indices, identical on all ranks by construction), and when
    a backward pass ends every gradient becomes the mean over ranks, summed in rank order (as
    :func:`rank_ordered_mean_hook`), in one flat message. Same answers as DDP with that hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            for buf in syncable_buffers(self.module):
                dist.broadcast(buf, 0)
        out = self.module(*args, **kwargs)
        if torch.is_grad_enabled() and torch.is_tensor(out) and out.requires_grad:
            # the hook runs as the backward starts; the queued callback once it has finished
            out.register_hook(lambda g: torch.autograd.Variable._execution_engine.queue_callback(self._sync) or g)
        return out

    @torch.no_grad()
    def _sync(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        mean = _rank_ordered_mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(mean[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sync_batch_norm(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``--sync-bn``: every batch norm takes its statistics over all processes' shards. One
    process already sees the whole batch; on CPU PyTorch's SyncBatchNorm refuses to run."""
    if not info.enabled:
        return model
    if device.type != "cuda":
        raise DynsparseError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU (gloo); without it "
                             "each process normalizes with its own shard's batch statistics (README, torchrun)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The model as trained under several processes: DDP, or :class:`SparseDataParallel` when it
    holds CSR weights. On CPU DDP sums in rank order (bit-exact resume with any number of ranks)."""
    from dynsparse.sparse.layers.csr_linear import CSRWeight
    if not info.enabled:
        return model
    if any(isinstance(m, CSRWeight) for m in model.modules()):
        return SparseDataParallel(model)
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cpu":  # resume bit-exact with any number of processes (issue 12)
        ddp.register_comm_hook(None, rank_ordered_mean_hook)
    return ddp
