"""Device correctness without a device: a ``TorchDispatchMode`` that sees every ATen op of a
training loop and records

* ops whose tensor arguments live on more than one device (a 0-dim CPU tensor counts as a
  scalar, as PyTorch treats it, and copies between devices are allowed: they are explicit);
* host syncs, unless the loop says a topology update is under way: ``.item()``/``int()``/
  ``bool()`` (``aten._local_scalar_dense``), ``.tolist()`` (on a CPU tensor it dispatches no op,
  so ``Tensor.tolist`` is watched directly), ``nonzero``, ``unique``, ``masked_select``,
  ``repeat_interleave`` without an output size, and indexing with a boolean mask (its output
  size is data-dependent: on a GPU each of these waits for the device).

On a CPU every tensor shares one device, so the device half only bites where a second device
exists (``meta``, or a fake CUDA device under ``FakeTensorMode``); the sync half holds anywhere
because it looks at which ops run, not at how long they take.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2,
            aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive}
BOOL_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
COPY_OPS = {aten._to_copy, aten.copy_, aten._copy_from, aten._copy_from_and_resize}


class DeviceCheck(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.updating = False  # a topology update is running: host syncs are allowed
        self.syncs: list[str] = []
        self.mixed: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func.overloadpacket not in COPY_OPS:
            devices = {t.device for t in flat if t.dim() > 0 or t.device.type != "cpu"}
            if len(devices) > 1:
                self.mixed.append(f"{func} on {sorted(map(str, devices))}")
        if not self.updating:
            packet = func.overloadpacket
            if packet in SYNC_OPS or (func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)
                                      and kwargs.get("output_size") is None):
                self.syncs.append(str(func))
            elif packet in BOOL_INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                  for i in (args[1] if len(args) > 1 else ()) or ()):
                self.syncs.append(f"{func} with a boolean index")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def update(self, on: bool = True):
        """Host syncs are allowed inside (a topology update, an epoch's end)."""
        before, self.updating = self.updating, on or self.updating
        try:
            yield
        finally:
            self.updating = before

    @contextlib.contextmanager
    def watching(self):
        """The mode, with ``Tensor.tolist`` watched too (it dispatches nothing on a CPU tensor)."""
        original = torch.Tensor.tolist
        check = self

        def tolist(t, *a, **k):
            if not check.updating:
                check.syncs.append("Tensor.tolist")
            return original(t, *a, **k)

        torch.Tensor.tolist = tolist
        try:
            with self:
                yield self
        finally:
            torch.Tensor.tolist = original
