"""Kernels of the truly sparse linear weight: index bookkeeping and the autograd Function.

A weight ``W`` of shape ``[out, in]`` is stored as its active values (a 1-D tensor, in row-major
order of their positions) and int32 CSR indices (``crow`` of length out+1, ``col``); the
transpose ``W^T`` needed by the input gradient shares the values through a permutation
``t_perm`` (``W^T.values = values[t_perm]``) with its own ``t_crow``/``t_col``. Cost of every
product is proportional to the number of active values, never to ``out * in``:

- forward ``y = x @ W^T``: ``torch.sparse.mm(W, x^T)``;
- input gradient ``dx = dy @ W``: ``torch.sparse.mm(W^T, dy^T)``;
- weight gradient at the active positions only: ``torch.sparse.sampled_addmm`` (an SDDMM), whose
  result has ``W``'s pattern, so its values line up with ``values``.

The parameter is the plain value vector, so every ``torch.optim`` optimizer works on it (Adam and
AdamW refuse a sparse-layout parameter).
"""
from __future__ import annotations

import warnings

import torch

# Tensors are built from indices this module keeps valid; torch's beta-state and
# invariant-check warnings would otherwise fire on every product.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

INDEX_DTYPE = torch.int32  # same speed as int64 in MKL's kernels, half the memory


def crow_from_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """CSR row pointer (int32, length ``num_rows + 1``) of sorted row ids."""
    counts = torch.bincount(rows, minlength=num_rows)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(INDEX_DTYPE)


def rows_of(crow: torch.Tensor) -> torch.Tensor:
    """Row id (int64) of every stored entry, from a CSR row pointer."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def csr_from_flat(flat: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow, col)`` int32 of sorted unique flat indices ``row * in + col``."""
    rows = torch.div(flat, shape[1], rounding_mode="floor")
    return crow_from_rows(rows, shape[0]), (flat - rows * shape[1]).to(INDEX_DTYPE)


def transpose_indices(crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t_perm, t_crow, t_col)`` of ``W^T`` for the pattern ``(crow, col)`` of ``W``.

    Entries are stored row-major, so a stable sort by column gives column-major order with rows
    ascending inside each column: exactly the CSR order of ``W^T`` (cheaper than sorting flat
    indices of ``W^T``)."""
    t_perm = torch.sort(col, stable=True).indices
    t_col = rows_of(crow)[t_perm].to(INDEX_DTYPE)
    return t_perm.to(INDEX_DTYPE), crow_from_rows(col.long()[t_perm], shape[1]), t_col


class GradientCapture:
    """Holds the inputs and output gradients of the products run while capture is on, so that
    rows of the dense weight gradient ``dy^T @ x`` can be formed block by block later."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x [B, in], dy [B, out])

    def dense_grad_rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.pairs:
            raise RuntimeError("no gradient captured yet: run a forward and backward after capture_gradient()")
        out = None
        for x, dy in self.pairs:
            block = dy[:, start:stop].t() @ x
            out = block if out is None else out.add_(block)
        return out


class SparseLinearFunction(torch.autograd.Function):
    """``y = x @ W^T`` for ``x`` of shape ``[B, in]``, ``W`` given by values + CSR indices."""

    @staticmethod
    def forward(ctx, x, values, crow, col, t_perm, t_crow, t_col, shape, capture):
        w = torch.sparse_csr_tensor(crow, col, values, shape)
        ctx.save_for_backward(x, values, crow, col, t_perm, t_crow, t_col)
        ctx.shape, ctx.capture = shape, capture
        return torch.sparse.mm(w, x.t()).t()

    @staticmethod
    def backward(ctx, dy):
        x, values, crow, col, t_perm, t_crow, t_col = ctx.saved_tensors
        shape = ctx.shape
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            wt = torch.sparse_csr_tensor(t_crow, t_col, values.index_select(0, t_perm), (shape[1], shape[0]))
            dx = torch.sparse.mm(wt, dy.t()).t()
        if ctx.needs_input_grad[1]:
            # beta=0: the pattern's values only select positions; the result has W's pattern.
            pattern = torch.sparse_csr_tensor(crow, col, values.detach(), shape)
            dvalues = torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
        if ctx.capture is not None:
            ctx.capture.pairs.append((x.detach(), dy.detach()))
        return dx, dvalues, None, None, None, None, None, None, None


def sparse_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                  t_perm: torch.Tensor, t_crow: torch.Tensor, t_col: torch.Tensor, shape: tuple[int, int],
                  bias: torch.Tensor | None = None, capture: GradientCapture | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x`` of shape ``[..., in]`` (batch dims flattened around the call)."""
    lead = x.shape[:-1]
    y = SparseLinearFunction.apply(x.reshape(-1, shape[1]), values, crow, col, t_perm, t_crow, t_col,
                                   tuple(shape), capture)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, shape[0])
