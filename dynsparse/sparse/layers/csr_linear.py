"""Truly sparse storage for linear weights: memory and time proportional to the active entries.

:class:`CSRWeight` stores a weight of shape ``[out, in]`` as ``values`` (an ``nn.Parameter``
holding only the active values, row-major) and int32 CSR index buffers; :class:`CSRLinear` is
the ``nn.Linear`` built on it. Contract for the engine (policies see flat indices, never storage):

- ``active_flat()``: sorted int64 flat indices ``row * in + col`` of the active entries, aligned
  with ``values``; ``num_active`` / ``num_entries`` count them.
- ``set_topology(keep, add_flat, add_values=None, optimizer=None)``: drop the entries where
  ``keep`` is False, insert ``add_flat``, keep the same ``nn.Parameter`` object and remap every
  optimizer state tensor shaped like ``values`` (survivors keep theirs, new entries start at
  zero; scalar state such as Adam's ``step`` is untouched). Cost O(nnz), no dense tensor.
- ``capture_gradient()``: the next backward keeps ``x`` and ``dy``; ``dense_grad_rows(a, b)``
  then gives rows ``a:b`` of the dense weight gradient, for grow-by-gradient policies.
- ``to_dense()``, ``to_sparse_csr()`` export; ``CSRWeight.random`` builds without any dense
  tensor. ``state_dict`` holds ``values``, ``crow_indices``, ``col_indices``; loading resizes
  them, so checkpoints whose per-layer counts changed (DSR) load into a fresh module.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.layers.csr_functions import (
    INDEX_DTYPE,
    GradientCapture,
    check_flat,
    csr_from_flat,
    flat_of,
    merge_pattern,
    merge_sorted,
    rows_of,
    sample_flat,
    sparse_linear,
    transpose_indices,
)

__all__ = ["CROSSOVER_DENSITY", "CSRLinear", "CSRWeight", "csr_linear_from_linear", "dense_state_dict",
           "prefer_csr", "sample_flat"]

INITS = ("linear", "zeros")


# Density below which a CSR linear layer's full training step beats the masked dense one, per
# batch size (4096x4096 layer, 1 CPU thread, float32, `python benchmarks/bench_truly_sparse.py`,
# nothing else running): the median of four runs on the embedding_bag products, whose
# "crossover_density" were 0.339 / 0.237 / 0.196 (commit 4ad35fe), 0.333 / 0.240 / 0.220
# (1fa1198), 0.270 / 0.272 / 0.206 (1fa1198, 15 rounds) and 0.325 / 0.278 / 0.223 (0bdec98, 15
# rounds: benchmarks/results/truly_sparse.json) at batch 32 / 128 / 512. ``auto`` reads this table.
CROSSOVER_DENSITY: dict[int, float] = {32: 0.329, 128: 0.256, 512: 0.213}


def prefer_csr(density: float, batch_size: int) -> bool:
    """Whether a linear layer at ``density`` trains faster as CSR at ``batch_size`` on CPU: below
    the measured crossover, interpolated in log-log between batch sizes, clamped outside them."""
    sizes = sorted(CROSSOVER_DENSITY)
    b = min(max(batch_size, sizes[0]), sizes[-1])
    for lo, hi in zip(sizes, sizes[1:]):
        if lo <= b <= hi:
            t = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo))
            limit = math.exp((1 - t) * math.log(CROSSOVER_DENSITY[lo]) + t * math.log(CROSSOVER_DENSITY[hi]))
            return density < limit
    return density < CROSSOVER_DENSITY[sizes[0]]

class CSRWeight(nn.Module):
    """A sparse ``[out, in]`` weight: ``values`` (parameter) + int32 CSR indices (buffers)."""

    crow_indices: torch.Tensor  # buffers, declared for the type checker
    col_indices: torch.Tensor

    def __init__(self, shape: tuple[int, int], flat: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        flat = flat.to(torch.int64)
        if values.dim() != 1 or values.numel() != flat.numel():
            raise DynsparseError(f"need one value per active entry: {values.numel()} values for {flat.numel()} indices")
        check_flat(flat, self.num_entries)
        crow, col = csr_from_flat(flat.to(values.device), self.shape)
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        # W^T's pattern is derived, so it is not saved (and cannot disagree with a checkpoint)
        for name in ("t_perm", "t_crow", "t_col"):
            self.register_buffer(name, torch.empty(0, dtype=INDEX_DTYPE, device=values.device), persistent=False)
        self._capture: GradientCapture | None = None
        self._capture_armed = False
        # what a capture holds and how it forms dense gradient rows (a convolution sets its own)
        self.capture_factory: Callable[[], GradientCapture] = GradientCapture
        # the dense weight's shape for export (a convolution's [out, in, kh, kw]); None: ``shape``
        self.dense_shape: tuple[int, ...] | None = None
        self._refresh_transpose()

    # construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, out_features: int, in_features: int, density: float, generator: torch.Generator, *,
               init: str | torch.Tensor = "linear", device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> CSRWeight:
        """Exactly ``int(density * out * in + 0.1)`` entries at uniform positions, never a dense
        tensor or mask. ``init``: ``"linear"`` (nn.Linear's U(-1/sqrt(in), 1/sqrt(in))),
        ``"zeros"``, or a 1-D tensor of that many values."""
        if not 0.0 < density <= 1.0:
            raise DynsparseError(f"density must be in (0, 1], got {density}")
        n = out_features * in_features
        k = max(int(density * n + 0.1), 1)  # never an empty layer
        flat = sample_flat(n, k, generator, device=device)
        if isinstance(init, torch.Tensor):
            values = init.to(device=device, dtype=dtype)
        elif init == "linear":
            bound = 1.0 / math.sqrt(in_features)
            values = (torch.rand(k, generator=generator, device=generator.device,
                                 dtype=dtype) * (2 * bound) - bound).to(device)
        elif init == "zeros":
            values = torch.zeros(k, device=device, dtype=dtype)
        else:
            raise DynsparseError(f"unknown init {init!r}; valid choices: {', '.join(INITS)} or a tensor of values")
        return cls((out_features, in_features), flat, values)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor) -> CSRWeight:
        """The entries of ``weight`` where the bool ``mask`` is True (same values, same order)."""
        if weight.dim() != 2 or mask.shape != weight.shape:
            raise DynsparseError(f"need a 2-D weight and a mask of its shape, got {tuple(weight.shape)} and "
                                 f"{tuple(mask.shape)}")
        flat = torch.nonzero(mask.reshape(-1)).view(-1)
        return cls((weight.shape[0], weight.shape[1]), flat, weight.detach().reshape(-1)[flat])

    # topology ---------------------------------------------------------------------------------
    @property
    def num_entries(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_active(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.num_active / self.num_entries

    def active_flat(self) -> torch.Tensor:
        """Sorted int64 flat indices ``row * in + col`` of the active entries, aligned with ``values``."""
        return flat_of(self.crow_indices, self.col_indices, self.shape)

    def mask_rows(self, start: int, stop: int) -> torch.Tensor:
        """Dense bool mask of rows ``start:stop`` (for block-wise scans such as RigL's growth)."""
        a, b = int(self.crow_indices[start]), int(self.crow_indices[stop])
        block = torch.zeros(stop - start, self.shape[1], dtype=torch.bool, device=self.values.device)
        rows = rows_of(self.crow_indices[start:stop + 1] - a)
        block[rows, self.col_indices[a:b].long()] = True
        return block

    def sample_inactive(self, count: int, generator: torch.Generator,
                        exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``count`` sorted flat indices drawn uniformly among inactive entries not in ``exclude``
        (e.g. the positions just dropped, which the original DSR never regrows at once)."""
        taken = self.active_flat()
        if exclude is not None and exclude.numel():
            taken = merge_sorted(taken, torch.unique(exclude.to(taken)))
        return sample_flat(self.num_entries, count, generator, exclude=taken, device=self.values.device)

    @torch.no_grad()
    def set_topology(self, keep: torch.Tensor, add_flat: torch.Tensor, add_values: torch.Tensor | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
        """Drop the active entries where ``keep`` (bool, aligned with ``active_flat()``) is False
        and insert the flat indices ``add_flat`` (any order, distinct, inactive after the drop)
        with ``add_values`` (default zero). The ``values`` parameter stays the same object; its
        ``.grad`` and the optimizer's per-entry state follow their entries, new entries get zero."""
        n_old = self.num_active
        if keep.dtype != torch.bool or keep.shape != (n_old,):
            raise DynsparseError(f"keep must be a bool tensor of shape {(n_old,)}, "
                                 f"got {keep.dtype} {tuple(keep.shape)}")
        add_flat = add_flat.to(device=self.values.device, dtype=torch.int64).reshape(-1)
        add_sorted, order = torch.sort(add_flat)
        if add_values is not None:
            add_values = add_values.reshape(-1)
            if add_values.numel() != add_flat.numel():
                raise DynsparseError(f"{add_values.numel()} add_values for {add_flat.numel()} new entries")
            add_values = add_values[order]
        check_flat(add_sorted, self.num_entries, what="add_flat")
        n_add = add_sorted.numel()
        if int(keep.sum()) + n_add == 0:
            raise DynsparseError("set_topology would leave the weight with no active entry")
        crow, col, src = merge_pattern(self.crow_indices, self.col_indices, keep, add_sorted, self.shape)

        def remap(t: torch.Tensor, fill: torch.Tensor | None, src: torch.Tensor = src) -> torch.Tensor:
            tail = fill.to(t.dtype) if fill is not None else t.new_zeros(n_add)
            return torch.cat([t, tail]).index_select(0, src)

        p = self.values
        if optimizer is not None:
            for state in ([optimizer.state[p]] if p in optimizer.state else []):
                for key, t in state.items():
                    if torch.is_tensor(t) and t.dim() == 1 and t.shape == p.shape:
                        state[key] = remap(t, None)
        grad = None if p.grad is None else remap(p.grad, None)
        p.grad = None  # a gradient of the old size may not stay on a resized parameter
        data = remap(p.data, add_values)
        if data.shape != p.shape:
            # Autograd keeps the parameter's gradient accumulator, with the old size, while any
            # graph that used it is alive (a loop's previous ``loss``); setting data of another
            # dtype is what makes it drop that accumulator, so pass through one first.
            p.data = data.to(torch.float64 if data.dtype != torch.float64 else torch.float32)
        p.data = data
        p.grad = grad
        self.crow_indices, self.col_indices = crow, col
        del src, remap
        self._refresh_transpose()

    def _refresh_transpose(self) -> None:
        self.t_perm, self.t_crow, self.t_col = transpose_indices(self.crow_indices, self.col_indices, self.shape)

    # gradients ---------------------------------------------------------------------------------
    def capture_gradient(self) -> None:
        """Keep ``x`` and ``dy`` of the coming forwards/backwards (summed, as micro-batches of one
        step accumulate) for :meth:`dense_grad_rows`, until :meth:`release_gradient`."""
        self._capture, self._capture_armed = self.capture_factory(), True

    def dense_grad_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the dense gradient ``dy^T @ x`` (summed over the batch) of the
        captured backward: ``[stop - start, in]``. Call :meth:`release_gradient` when done."""
        if self._capture is None:
            raise DynsparseError("dense_grad_rows needs capture_gradient() before the forward and backward")
        return self._capture.dense_grad_rows(start, stop)

    def release_gradient(self) -> None:
        self._capture, self._capture_armed = None, False

    def matmul_t(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` for ``x`` of shape ``[..., in]``."""
        # every training forward until released: micro-batches of an accumulated step all count
        capture = self._capture if self._capture_armed and torch.is_grad_enabled() else None
        return sparse_linear(x, self.values, self.crow_indices, self.col_indices, self.t_perm, self.t_crow,
                             self.t_col, self.shape, bias, capture)

    # export and checkpoints ---------------------------------------------------------------------
    def to_sparse_csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_indices.long(), self.col_indices.long(), self.values.detach().clone(),
                                       self.shape, check_invariants=False)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.num_entries, dtype=self.values.dtype, device=self.values.device)
        dense[self.active_flat()] = self.values.detach()
        return dense.view(self.dense_shape or self.shape)

    def nbytes(self) -> int:
        """Bytes of values and every index buffer (the weight's own memory, without optimizer state)."""
        return sum(t.numel() * t.element_size() for t in (self.values, *self.buffers()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A checkpoint's entry count may differ from this module's (DSR moves entries between
        # layers): resize to the incoming tensors, then let the default loader copy.
        crow = state_dict.get(prefix + "crow_indices")
        if crow is not None and crow.numel() != self.shape[0] + 1:
            error_msgs.append(f"{prefix}crow_indices has {crow.numel()} entries, expected {self.shape[0] + 1} "
                              f"for a [{self.shape[0]}, {self.shape[1]}] weight")
            return
        with torch.no_grad():
            if prefix + "values" in state_dict:
                self.values.data = self.values.data.new_empty(state_dict[prefix + "values"].shape)
            if prefix + "col_indices" in state_dict:
                self.col_indices = self.col_indices.new_empty(state_dict[prefix + "col_indices"].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh_transpose()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.num_active}, density={self.density:.3g}"


class CSRLinear(nn.Module):
    """``nn.Linear`` with a :class:`CSRWeight`; ``weight.values`` is the trainable parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float = 1.0,
                 generator: torch.Generator | None = None, weight: CSRWeight | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            weight = CSRWeight.random(out_features, in_features, density, generator)
        if weight.shape != (out_features, in_features):
            raise DynsparseError(f"weight shape {weight.shape} is not ({out_features}, {in_features})")
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(out_features, device=weight.values.device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.matmul_t(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def csr_linear_from_linear(linear: nn.Linear, mask: torch.Tensor) -> CSRLinear:
    """A :class:`CSRLinear` with ``linear``'s values where ``mask`` is True, and its bias."""
    module = CSRLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       weight=CSRWeight.from_dense(linear.weight, mask.bool()))
    if linear.bias is not None and module.bias is not None:
        module.bias.data.copy_(linear.bias.detach())
    return module


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every CSR weight exported as an ordinary dense ``<name>``."""
    out = {}
    csr = {name: m for name, m in model.named_modules() if isinstance(m, CSRWeight)}
    for key, value in model.state_dict().items():
        owner = next((n for n in csr if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
        elif key == owner + ".values":
            out[owner] = csr[owner].to_dense()
    return out
