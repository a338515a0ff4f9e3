"""The engine's view of a CSR convolution weight (:class:`~dynsparse.sparse.layers.csr_conv.CSRConv2d`):
:class:`~dynsparse.sparse.storage.csr.CSRParam` with the dense weight's ``[out, in, kh, kw]``
shape and the masked storage's conv rules, per weight (:class:`CSRConvParam`, sub-kernel
granularity 4) or per whole ``kh x kw`` kernel (:class:`CSRKernelParam`, granularity 2).

A topology of whole kernels is a set of entries: the CSR weight stores every weight of an active
kernel (``kh * kw`` consecutive entries of its row), and the handles a policy sees are kernels:
drop-side positions in the list of active kernels, grow-side flat ``out * in`` indices. A kernel's
score is the mean ``|t|`` over its weights, as the masked storage computes it.
"""
from __future__ import annotations

import math

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.layers.csr_functions import GradientCapture, merge_sorted
from dynsparse.sparse.layers.csr_linear import CSRWeight
from dynsparse.sparse.storage import DenseScores, GrowScores, Handles
from dynsparse.sparse.storage.csr import CSRParam, RowScores


class CSRConvParam(CSRParam):
    """A CSR conv weight masked per weight (``--sub-kernel-granularity 4``)."""

    granularity = 4

    def __init__(self, name: str, weight: CSRWeight) -> None:
        if weight.dense_shape is None or len(weight.dense_shape) != 4:
            raise DynsparseError(f"{name}: a CSR conv weight needs its dense [out, in, kh, kw] shape")
        super().__init__(name, weight)

    @property
    def shape(self) -> torch.Size:
        assert self.weight.dense_shape is not None  # checked at construction
        return torch.Size(self.weight.dense_shape)

    def new_weights_std(self) -> float:
        # the masked storage's conv rule (the original's re-initialization): sqrt(2 / (out * kh * kw))
        s = self.shape
        return math.sqrt(2.0 / (s[0] * s[2] * s[3]))


class KernelRowScores(RowScores):
    """Grow-side scores per kernel: the mean ``|g|`` over each kernel's weights."""

    def __init__(self, capture: GradientCapture, shape: tuple[int, int], k: int) -> None:
        super().__init__(capture, shape)
        self.k = k

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._mean(self.capture.dense_grad_rows(start, stop)).abs_().view(-1, self.k).mean(-1)


class CSRKernelParam(CSRConvParam):
    """A CSR conv weight masked per ``kh x kw`` kernel (``--sub-kernel-granularity 2``)."""

    granularity = 2

    def __init__(self, name: str, weight: CSRWeight) -> None:
        super().__init__(name, weight)
        self.k = self.shape[2] * self.shape[3]
        self.slice_size = self.k
        if weight.num_active % self.k:
            raise DynsparseError(f"{name}: {weight.num_active} stored weights are not whole {self.k}-weight kernels")

    # ---- sizes: in kernels ----------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return self.weight.num_active // self.k + self._pending

    @num_active.setter
    def num_active(self, value: int) -> None:
        self._pending = value - self.weight.num_active // self.k

    @property
    def num_entries(self) -> int:
        return self.shape[0] * self.shape[1]

    def _grid(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    def alive(self) -> torch.Tensor:
        if self._alive is None:
            self._alive = torch.ones(self.weight.num_active // self.k, dtype=torch.bool, device=self.device)
        return self._alive

    def active_indices(self) -> Handles:
        return Handles(torch.arange(self.weight.num_active // self.k, device=self.device))

    def kernel_flat(self) -> torch.Tensor:
        """Sorted flat ``out * in`` indices of the active kernels."""
        return self.weight.active_flat()[::self.k] // self.k

    def _entries(self, kernels: torch.Tensor) -> torch.Tensor:
        return (kernels.reshape(-1, 1) * self.k + torch.arange(self.k, device=kernels.device)).reshape(-1)

    # ---- scores ---------------------------------------------------------------------------------
    def scores(self, t: torch.Tensor) -> torch.Tensor:
        # the stored values (or their gradient) per active kernel, or a dense [out, in*k] tensor per kernel
        return t.detach().abs().reshape(-1, self.k).mean(-1)

    def dense_scores(self, t: torch.Tensor) -> GrowScores:
        # a dense [out, in, kh, kw] tensor: the mean |t| per kernel, over the [out, in] grid
        return DenseScores(t.detach().abs().reshape(-1, self.k).mean(-1))

    def active_mean(self, scores: GrowScores) -> torch.Tensor:
        return scores.flat()[self.kernel_flat()].sum() / max(self.num_active, 1)

    # ---- grow -----------------------------------------------------------------------------------
    def _taken(self) -> torch.Tensor:
        taken = self.kernel_flat()
        for flat, _ in self._adds:
            taken = merge_sorted(taken, torch.sort(torch.unique(flat[::self.k] // self.k)).values)
        return taken

    def activate(self, flat: torch.Tensor, values: torch.Tensor | None = None) -> None:
        if flat.numel():
            self._adds.append((self._entries(flat), None if values is None else values.reshape(-1)))
            self.num_active += flat.numel()

    def swap_random(self, drop, count, generator, new_std=None):
        raise DynsparseError(f"{self.name}: DeepR's exchange needs per-weight masks (--sub-kernel-granularity 4)")

    def gradient_scores(self) -> RowScores | None:
        capture = self.weight._capture
        return None if capture is None or not capture.pairs else KernelRowScores(capture, self.weight.shape, self.k)

    @torch.no_grad()
    def commit(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self._alive is None and not self._adds:
            return
        keep = self.alive().repeat_interleave(self.k)
        flat = torch.cat([f for f, _ in self._adds]) if self._adds else keep.new_empty(0, dtype=torch.long)
        values = None
        if any(v is not None for _, v in self._adds):
            values = torch.cat([v if v is not None else torch.zeros(f.numel(), device=self.device)
                                for f, v in self._adds])
        expected = self.num_active
        self.weight.set_topology(keep, flat, values, optimizer)
        self._alive, self._adds, self._pending = None, [], 0
        if self.num_active != expected:
            raise DynsparseError(f"{self.name}: {self.num_active} kernels after a change, expected {expected}")

    # ---- checkpoints ----------------------------------------------------------------------------
    def topology(self) -> torch.Tensor:
        """Sorted flat indices of the active kernels (the masked storage saves a bool ``[out, in]`` mask)."""
        return self.kernel_flat()

    @torch.no_grad()
    def load_topology(self, saved: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        if saved.dtype == torch.bool:
            if saved.numel() != self.num_entries:
                raise DynsparseError(f"checkpoint mask of {self.name} has shape {tuple(saved.shape)}, expected "
                                     f"{tuple(self.shape[:2])} (a different --sub-kernel-granularity?)")
            saved = torch.nonzero(saved.reshape(-1)).view(-1)
        super().load_topology(self._entries(saved.to(self.device, torch.int64).view(-1)), optimizer)
