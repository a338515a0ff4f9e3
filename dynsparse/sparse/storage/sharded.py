"""Masks for parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor
parameters split by rows over a 1-D device mesh, ``Shard(0)``).

Each rank keeps the mask of its own rows only. Between topology changes everything is local:
the mask is shown to the model as a DTensor with the parameter's placement, so the gradient
hook, the weight re-masking and the optimizer state masking (Adam's moments are DTensors) run
on the local shards unchanged, with no communication.

A topology change needs the whole tensor to decide, and must decide the same on every rank and
the same as on one device. So, only for the duration of ``policy.update`` (:func:`whole_masks`),
every sharded tensor gathers its mask (one byte per entry), and each score a policy reads
(magnitude, gradient, momentum) is the all-gather of the local shard's scores (one float per
mask entry, not per weight at coarse granularity). The policy then runs the very code it runs on
one device (the same ``topk``, the same draws from the same generator), every rank keeps its rows
of the new mask, and the full copies are freed. Exact entry counts per tensor and DSR's global
threshold and proportional regrowth follow for free, since every rank sees every count.
Communication per update: one all-gather of the masks and one per score tensor read, i.e. about
one FSDP forward's parameter traffic; nothing at the other steps.

Checkpoints: ``topology()`` is a DTensor mask, so ``torch.distributed.checkpoint`` saves the
sparsifier's ``state_dict`` sharded and loads it on any number of ranks; ``load_topology``
takes a DTensor, or a full mask saved by an unsharded run.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard, cast

import torch
import torch.distributed as dist
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.storage import FlatIndices
from dynsparse.sparse.storage.masked import SparseParam

if TYPE_CHECKING:  # imported at run time only where needed: it costs ~1 s of every process's start
    from torch.distributed.tensor import DTensor


def is_sharded(t) -> TypeGuard[DTensor]:
    # no DTensor exists before torch.distributed.tensor is imported (FSDP2 imports it)
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


@dataclass
class ShardedParam(SparseParam):
    """A :class:`SparseParam` whose ``mask`` holds this rank's rows (the whole mask only inside
    :func:`whole_masks`); ``num_active`` and every count are of the whole tensor."""
    mask_shape: tuple = ()
    row0: int = 0
    chunk: int = 0
    _local: torch.Tensor | None = None

    @classmethod
    def from_full(cls, name: str, param: nn.Parameter, granularity: int, full_mask: torch.Tensor,
                  active: int) -> ShardedParam:
        check_placement(name, cast("DTensor", param))  # an FSDP2 parameter is also a DTensor
        mesh = cast("DTensor", param).device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        rows_total = param.shape[0]
        chunk = -(-rows_total // world)  # FSDP2 splits rows as torch.chunk does
        row0 = min(rank * chunk, rows_total)
        rows = cast("DTensor", param).to_local().shape[0]
        if row0 + rows > rows_total or rows != max(min(chunk, rows_total - row0), 0):
            raise DynsparseError(f"{name}: local shard of {rows} rows at row {row0} is not FSDP2's row split of "
                                 f"{rows_total} rows over {world} ranks")
        local = full_mask[row0:row0 + rows].clone()
        return cls(name, param, granularity, local, active, mask_shape=tuple(full_mask.shape), row0=row0, chunk=chunk)

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def dparam(self) -> DTensor:
        """``param`` seen as the DTensor it also is (an FSDP2 parameter is both)."""
        return cast("DTensor", self.param)

    @property
    def num_entries(self) -> int:
        return math.prod(self.mask_shape)

    @property
    def rows(self) -> int:
        return self.dparam.to_local().shape[0]

    def _group(self):
        return self.dparam.device_mesh.get_group()

    def _gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's rows (shards padded to one size: uneven splits)."""
        world = self.dparam.device_mesh.size()
        padded = local.new_zeros((self.chunk, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self._group())
        return torch.cat(parts)[:self.mask_shape[0]]

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self._group())
        return t

    def _derived(self, key: str, make):
        # the mask tensor is replaced on gather and scatter: key the cache by identity too
        version = (id(self.mask), self.mask._version)
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            hit = self._cache[key] = (version, make())
        return hit[1]

    # ---- the whole mask, during a topology change -------------------------------------------
    def gather(self) -> None:
        self._local = self.mask
        self.mask = self._gather_rows(self.mask.to(torch.uint8)).bool()

    def scatter(self) -> None:
        self.mask = self.mask[self.row0:self.row0 + self.rows].clone()
        self._local = None
        self._cache.clear()

    # ---- local work (no communication) ------------------------------------------------------
    def mask_view(self) -> DTensor:
        """This rank's mask as a DTensor placed like the parameter, broadcasting against it."""
        if self._local is not None:
            raise DynsparseError(f"{self.name}: the local mask is not available during a topology change")
        extra = (1,) * (self.param.dim() - self.granularity)
        shape = tuple(self.mask_shape) + extra

        def make():
            from torch.distributed.tensor import DTensor
            local = self.mask.view(self.mask.shape + extra).to(self.param.dtype)
            return DTensor.from_local(local, self.dparam.device_mesh, self.dparam.placements, run_check=False,
                                      shape=torch.Size(shape), stride=_contiguous_stride(shape))
        return self._derived("float", make)

    # ---- scores: the whole tensor's, from every shard ----------------------------------------
    def scores(self, t: torch.Tensor) -> torch.Tensor:
        if not is_sharded(t):
            return super().scores(t)
        local = t.to_local().detach().abs()
        if self.granularity != t.dim():
            local = local.flatten(self.granularity).mean(-1)
        # explicit row length: a rank may hold no row at all (fewer rows than ranks)
        return self._gather_rows(local.reshape(local.shape[0], math.prod(self.mask_shape[1:]))).reshape(-1)

    def apply_(self) -> None:
        """Zero the weights off the mask: this rank's rows, also while the whole mask is held (DeepR
        zeroes its drops inside an update to take the signs)."""
        if self._local is None:
            super().apply_()
            return
        local = self.dparam.to_local().detach()
        mine = self.rows_of(self.mask)
        local.mul_(mine.view(mine.shape + (1,) * (local.dim() - mine.dim())).to(local.dtype))

    def activate(self, flat_idx: FlatIndices, values: torch.Tensor | None = None) -> None:
        self.mask.view(-1)[flat_idx] = True
        self.num_active += flat_idx.numel()
        if values is not None and flat_idx.numel():  # each rank writes the rows it holds
            per_row = math.prod(self.mask_shape[1:])
            lo = self.row0 * per_row
            mine = (flat_idx >= lo) & (flat_idx < lo + self.rows * per_row)
            w = self.dparam.to_local().detach().view(self.rows * per_row, self.slice_size)
            w[flat_idx[mine] - lo] = values[mine].to(w)

    # ---- DeepR: draws over the whole tensor, applied to this rank's rows ---------------------
    def rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole tensor shaped like the mask (or the parameter)."""
        return whole[self.row0:self.row0 + self.rows]

    def add_to_active_grad(self, values: torch.Tensor) -> None:
        """``values`` is drawn for the whole tensor (identically on every rank): add our part."""
        g = self.param.grad
        if g is None:
            return
        local = cast("DTensor", g).to_local()
        idx = torch.nonzero(self.mask.view(-1)).view(-1)  # this rank's active entries, in the order of its rows
        start = self.entries_before(idx.numel())
        local.index_put_(torch.unravel_index(idx, local.shape), values[start:start + idx.numel()].to(local),
                         accumulate=True)

    def signs(self) -> torch.Tensor:
        """Signs of this rank's rows."""
        return torch.sign(self.dparam.to_local().detach()).to(torch.int8)

    def state_for_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        return self.placed(t)

    def state_from_checkpoint(self, t: torch.Tensor) -> torch.Tensor:
        """A DTensor (any placement), or the whole tensor of an unsharded run: our rows."""
        return self.rows_of(t.full_tensor() if is_sharded(t) else t)

    def load_values(self, dense: torch.Tensor) -> None:
        raise DynsparseError(f"{self.name}: loading dense values into an FSDP2-sharded parameter is not supported "
                             "(--copy-mask-from takes an unsharded run)")

    def add_whole_(self, delta: torch.Tensor) -> None:
        """Add a whole-tensor ``delta`` (drawn identically on every rank) to this rank's rows."""
        self.dparam.to_local().detach().add_(self.rows_of(delta))

    def gather_flags(self, local: torch.Tensor) -> torch.Tensor:
        """Flat bool flags of the whole tensor from each rank's flags of its rows (one byte each)."""
        per_row = math.prod(self.mask_shape[1:])
        return self._gather_rows(local.reshape(local.shape[0], per_row).to(torch.uint8)).bool().reshape(-1)

    def entries_before(self, count: int) -> int:
        """Sum of ``count`` over the ranks holding earlier rows: where this rank's active entries
        start in the whole tensor's flat active list (one small all-gather)."""
        world = self.dparam.device_mesh.size()
        mine = torch.tensor([count], dtype=torch.long, device=self.mask.device)
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=self._group())
        return int(torch.cat(parts)[:self.dparam.device_mesh.get_local_rank()].sum())

    # ---- what is stored ------------------------------------------------------------------------
    def masked_weight(self) -> torch.Tensor:
        """The whole weight (every rank takes part), zeros off the mask."""
        return cast("DTensor", self.param.detach() * self.mask_view()).full_tensor()

    def off_mask_nonzero(self) -> torch.Tensor:
        local = self.dparam.to_local().detach() * cast("DTensor", self.inverse_mask_view()).to_local()
        return self._all_sum(local.ne(0).sum())

    def nonzero(self) -> torch.Tensor:
        return self._all_sum(self.dparam.to_local().detach().ne(0).sum())

    def topology(self) -> DTensor:
        """The mask as a DTensor (rows sharded like the parameter) for distributed checkpoints."""
        return self.placed(self.mask.clone())

    def placed(self, local: torch.Tensor) -> DTensor:
        """This rank's rows of a mask-shaped tensor as a DTensor placed like the parameter."""
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(local, self.dparam.device_mesh, self.dparam.placements, run_check=False,
                                  shape=torch.Size(self.mask_shape), stride=_contiguous_stride(self.mask_shape))

    def load_topology(self, saved: torch.Tensor, optimizer=None) -> None:
        """A DTensor mask (any sharding: ``torch.distributed.checkpoint`` fills ours), or a whole
        mask or index list as an unsharded run saves it."""
        if is_sharded(saved):
            saved = saved.full_tensor()
        self.gather()
        try:
            super().load_topology(saved, optimizer)
        finally:
            self.scatter()


def check_placement(name: str, param: DTensor) -> None:
    from torch.distributed.tensor import Shard
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise DynsparseError(f"{name} is a DTensor placed {tuple(param.placements)} on a {param.device_mesh.ndim}-D "
                             "mesh; sparse training supports FSDP2's fully_shard on a 1-D mesh (Shard(0)) only")


def check_policy(policy, params: dict) -> None:
    """Refuse a policy that works on per-rank views it cannot have here (``shardable = False``)."""
    if not getattr(policy, "shardable", True) and any(isinstance(sp, ShardedParam) for sp in params.values()):
        raise DynsparseError(f"{type(policy).__name__} does not support FSDP2-sharded parameters; sharded training "
                             "is tested with SET, RigL, DSR, SNFS, MEST, DeepR, gradual pruning and static masks")


@contextlib.contextmanager
def whole_masks(params):
    """Every sharded tensor holds its whole mask inside (a policy's update), its rows after."""
    sharded = [sp for sp in params if isinstance(sp, ShardedParam)]
    for sp in sharded:
        sp.gather()
    try:
        yield
    finally:
        for sp in sharded:
            sp.scatter()


def full_weight(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a possibly sharded parameter (to draw initial masks from)."""
    return p.full_tensor() if is_sharded(p) else p


def reshard_like(saved, template):
    """``saved`` (whole tensors, e.g. a sparsifier ``state_dict`` written by one process) with
    every tensor that is a DTensor in ``template`` (the live sharded state) cut to this rank's
    rows and placed like it: what ``load_state_dict`` of sharded storage and policies expects."""
    if isinstance(saved, dict) and isinstance(template, dict):
        return {k: reshard_like(v, template[k]) if k in template else v for k, v in saved.items()}
    if is_sharded(template) and torch.is_tensor(saved) and not is_sharded(saved):
        if tuple(saved.shape) != tuple(template.shape):
            return saved  # e.g. a CSR index list: the storage's own load takes whole forms
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(saved.to(template.dtype), template.device_mesh, template.placements)
    return saved
