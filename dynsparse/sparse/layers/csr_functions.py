"""The truly sparse linear weight's products: index bookkeeping and the autograd Function.

A weight ``W`` of shape ``[out, in]`` is stored as its active values (a 1-D tensor, in row-major
order of their positions) and int32 CSR indices (``crow`` of length out+1, ``col``); the
transpose ``W^T`` needed by the input gradient shares the values through a permutation
``t_perm`` (``W^T.values = values[t_perm]``) with its own ``t_crow``/``t_col``. Cost of every
product is proportional to the number of active values, never to ``out * in``:

- forward ``y = x @ W^T``: ``W @ x^T`` as a sum-``embedding_bag`` (see :func:`spmm`);
- input gradient ``dx = dy @ W``: ``W^T @ dy^T``, the same way;
- weight gradient at the active positions only: ``torch.sparse.sampled_addmm`` (an SDDMM), whose
  result has ``W``'s pattern, so its values line up with ``values``; for large layers the compiled
  SDDMM of :mod:`dynsparse.sparse.kernels.csr_linear` where it is measured faster (its ``auto`` mode).

The parameter is the plain value vector, so every ``torch.optim`` optimizer works on it (Adam and
AdamW refuse a sparse-layout parameter).
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from dynsparse.errors import DynsparseError
from dynsparse.sparse.draws import sample_flat  # noqa: F401  (re-exported: csr_linear's random topologies)
from dynsparse.sparse.kernels import csr_linear as csr_kernels

# torch warns once per process that CSR support is in beta; the kernels used here are tested
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

INDEX_DTYPE = torch.int32  # embedding_bag and sampled_addmm run it at the speed of int64, half the memory


def crow_from_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """CSR row pointer (int32, length ``num_rows + 1``) of the row ids of the entries (any order)."""
    counts = torch.bincount(rows, minlength=num_rows)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(INDEX_DTYPE)


def rows_of(crow: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Row id of every stored entry, from a CSR row pointer."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device, dtype=dtype), counts)


def csr_from_flat(flat: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow, col)`` int32 of sorted unique flat indices ``row * in + col``."""
    rows = torch.div(flat, shape[1], rounding_mode="floor")
    crow = crow_from_rows(rows, shape[0])
    rows.mul_(shape[1]).neg_().add_(flat)  # in place: the widest layers' index arrays are GiBs each
    return crow, rows.to(INDEX_DTYPE)


def transpose_indices(crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t_perm, t_crow, t_col)`` of ``W^T`` for the pattern ``(crow, col)`` of ``W``.

    Entries are stored row-major, so a stable sort by column gives column-major order with rows
    ascending inside each column: exactly the CSR order of ``W^T`` (cheaper than sorting flat
    indices of ``W^T``). The row pointer of ``W^T`` is a count per column, which needs no order."""
    t_perm = torch.sort(col, stable=True).indices
    t_col = rows_of(crow, INDEX_DTYPE).index_select(0, t_perm)
    t_crow = crow_from_rows(col, shape[1])
    return t_perm.to(INDEX_DTYPE), t_crow, t_col


def merge_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of two sorted, individually distinct int64 tensors, without a full sort
    (``a`` is large, e.g. the active entries; ``b`` small, e.g. the ones just dropped)."""
    if a.numel() and b.numel():
        pos = torch.searchsorted(a, b).clamp_(max=a.numel() - 1)
        b = b[a[pos] != b]
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    out[torch.arange(a.numel(), device=a.device) + torch.searchsorted(b, a)] = a
    out[torch.arange(b.numel(), device=a.device) + torch.searchsorted(a, b)] = b
    return out


def flat_of(crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sorted int64 flat indices ``row * in + col`` of the entries of the pattern ``(crow, col)``."""
    row_starts = torch.arange(0, shape[0] * shape[1], shape[1], device=crow.device)
    return torch.repeat_interleave(row_starts, torch.diff(crow.long())).add_(col)


def merge_pattern(crow: torch.Tensor, col: torch.Tensor, keep: torch.Tensor, add_sorted: torch.Tensor,
                  shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pattern after a topology change, and where each of its entries comes from.

    ``(crow, col)`` is the pattern before, ``keep`` a bool per old entry, ``add_sorted`` the
    sorted new flat indices (inactive after the drop). Returns the new ``(crow, col)`` (int32) and
    ``src`` (int64, one per new entry): the old entry's position, or ``n_old + i`` for the i-th new
    one, so that every tensor that follows the entries is one gather from ``[old entries, new
    entries]``. O(nnz), no sort."""
    dev, (out_f, in_f) = col.device, shape
    n_old, n_add = col.numel(), add_sorted.numel()
    kept_at = torch.nonzero(keep).view(-1)
    dropped_at = torch.nonzero(~keep).view(-1)
    n_kept = kept_at.numel()
    # Merge two sorted lists without a full sort: a new entry lands after the kept ones below it
    # (the old ones below it, less the dropped ones among them); a kept one moves by the new
    # entries below it (a count, not a search).
    old = flat_of(crow, col, shape)
    pos = torch.searchsorted(old, add_sorted)
    if n_old and n_add:
        at = pos.clamp(max=n_old - 1)
        if bool(((old[at] == add_sorted) & keep[at]).any()):
            raise DynsparseError("add_flat contains entries that stay active")
    del old  # temporaries of O(nnz) are freed as soon as done: the widest layers are GiBs each
    pos -= torch.searchsorted(dropped_at, pos)
    dest_add = torch.arange(n_add, device=dev) + pos
    dest_keep = torch.bincount(pos, minlength=n_kept + 1)[:n_kept].cumsum_(0)
    dest_keep += torch.arange(n_kept, device=dev)
    # row counts adjusted by the dropped and added entries; kept columns moved, new ones written
    add_rows = torch.div(add_sorted, in_f, rounding_mode="floor")
    counts = torch.diff(crow.long())
    if dropped_at.numel():
        counts -= torch.bincount(torch.searchsorted(crow.long(), dropped_at, right=True) - 1, minlength=out_f)
    counts += torch.bincount(add_rows, minlength=out_f)
    new_crow = torch.zeros(out_f + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=new_crow[1:])
    new_col = torch.empty(n_kept + n_add, dtype=INDEX_DTYPE, device=dev)
    new_col.index_copy_(0, dest_keep, col.index_select(0, kept_at))
    new_col[dest_add] = add_rows.mul_(in_f).neg_().add_(add_sorted).to(INDEX_DTYPE)
    del add_rows, dropped_at
    src = torch.empty(n_kept + n_add, dtype=torch.int64, device=dev)
    src.index_copy_(0, dest_keep, kept_at)
    del dest_keep, kept_at
    src[dest_add] = torch.arange(n_old, n_old + n_add, device=dev)
    return new_crow.to(INDEX_DTYPE), new_col, src


def check_flat(flat: torch.Tensor, n: int, what: str = "flat indices") -> None:
    if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= n or bool((flat[1:] <= flat[:-1]).any())):
        raise DynsparseError(f"{what} must be distinct and in [0, {n})")


class GradientCapture:
    """Holds the inputs and output gradients of the products run while capture is on, so that
    rows of the dense weight gradient ``dy^T @ x`` can be formed block by block later."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x^T [in, B], dy^T [out, B])
        self._done = 0  # pairs of the backward passes whose gradient has reached the weight
        self._grad: tuple | None = None  # (weakref to that gradient, its version then)
        self.factor: torch.Tensor | None = None  # the scale the values' gradient got since (GradScaler.unscale_)

    def accumulated(self, grad: torch.Tensor) -> None:
        """A backward pass's gradient reached the weight (its accumulation hook). A fresh gradient
        (the loop zeroed it: e.g. after a step ``GradScaler`` skipped) means the pairs of earlier
        passes went into a gradient that is gone: they are dropped, as the masked storage's
        set-aside gradient is. The same tensor, changed only by this accumulation: they stay."""
        prev = self._grad
        if prev is None or prev[0]() is not grad or grad._version != prev[1] + 1:
            del self.pairs[:self._done]
        self._done = len(self.pairs)
        self._grad = (weakref.ref(grad), grad._version)

    def dense_grad_rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.pairs:
            raise RuntimeError("no gradient captured yet: run a forward and backward after capture_gradient()")
        xt, dyt = self.pairs[0]
        out = dyt[start:stop] @ xt.t()
        for xt, dyt in self.pairs[1:]:
            out.add_(dyt[start:stop] @ xt.t())
        return out if self.factor is None else out.mul_(self.factor)


def spmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``W @ d`` for ``W`` given by CSR ``(crow, col, values)`` and a row-major dense ``d``
    ``[K, B]``: row-major ``[R, B]``, ``R = len(crow) - 1``.

    Row ``r`` of the result is the sum of the rows ``d[col[j]]`` weighted by ``values[j]`` over
    the entries ``j`` of row ``r``: exactly a sum-``embedding_bag`` with ``d`` as the table, the
    CSR row pointer as offsets and the values as per-sample weights. Its CPU kernel (FBGEMM's
    generated gather-accumulate) runs 1.3-2.7x faster than MKL's CSR x dense product
    (``torch.sparse.mm``) on the development machine (AMD EPYC, 1 thread; the benchmarks' layer at
    densities 0.001-0.3 and batch 32-512, and the 10000-wide MLP's layers), and it writes its
    output once: no zero fill."""
    return F.embedding_bag(col, d, crow, mode="sum", per_sample_weights=values, include_last_offset=True)


class SparseLinearFunction(torch.autograd.Function):
    """``y = x @ W^T`` for ``x`` of shape ``[B, in]``, ``W`` given by values + CSR indices.

    Works on transposed activations (``[features, B]``, row-major): the layout in which both
    sparse products gather whole rows (``embedding_bag``'s table, ``sampled_addmm``'s operands).
    The output is returned as a transposed view, so the next sparse layer (after element-wise
    ops, which keep strides, and :func:`batch_norm`) gets its operand without a copy."""

    @staticmethod
    def forward(ctx, x, values, crow, col, t_perm, t_crow, t_col, shape, capture):
        xt = x.t().contiguous()
        ctx.save_for_backward(xt, values, crow, col, t_perm, t_crow, t_col)
        ctx.shape, ctx.capture = shape, capture
        if csr_kernels.choose("forward", values, xt.shape[1]):
            return csr_kernels.spmm(crow, col, values, xt).t()
        return spmm(crow, col, values, xt).t()

    @staticmethod
    def backward(ctx, dy):
        xt, values, crow, col, t_perm, t_crow, t_col = ctx.saved_tensors
        shape = ctx.shape
        dyt = dy.t().contiguous()
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            if csr_kernels.choose("input_grad", values, dyt.shape[1]):
                dx = csr_kernels.spmm_t(t_crow, t_col, t_perm, values, dyt).t()
            else:
                dx = spmm(t_crow, t_col, values.index_select(0, t_perm), dyt).t()
        if ctx.needs_input_grad[1] and csr_kernels.choose("weight_grad", values, dyt.shape[1]):
            dvalues = csr_kernels.sddmm(crow, col, dyt, xt)  # compiled: see csr_kernels
        elif ctx.needs_input_grad[1]:
            # beta=0: the pattern's values only select positions; the result has W's pattern.
            pattern = torch.sparse_csr_tensor(crow, col, values.detach(), shape, check_invariants=False)
            dvalues = torch.sparse.sampled_addmm(pattern, dyt, xt.t(), beta=0.0).values()
        if ctx.capture is not None:
            ctx.capture.pairs.append((xt, dyt))
        return dx, dvalues, None, None, None, None, None, None, None


def feature_major(h: torch.Tensor) -> bool:
    """Whether the 2-D ``h`` ``[B, C]`` is a transposed view of a contiguous ``[C, B]`` (the
    layout a CSR layer returns; element-wise ops keep it)."""
    return h.dim() == 2 and h.shape[0] > 1 and h.shape[1] > 1 and h.stride() == (1, h.shape[0])


def batch_norm(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``norm(h)``, for a ``BatchNorm1d`` on a feature-major ``h`` run as ``[1, C, B]``.

    The same statistics over the same B values per feature (and the same running-statistic
    update, unbiased over B), but contiguous kernels: PyTorch's 2-D batch-norm kernels on a
    transposed view, and the ReLU backward that then meets two layouts, take 2x longer
    (10000 features, batch 128). The result keeps ``h``'s layout."""
    if isinstance(norm, torch.nn.BatchNorm1d) and feature_major(h):
        return norm(h.t().unsqueeze(0)).squeeze(0).t()
    return norm(h)


def batch_norm_relu(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``relu(batch_norm(norm, h))``; after a CSR layer (feature-major ``h``, a ``BatchNorm1d`` in
    training mode) fused in one compiled kernel per direction where ``csr_kernels`` chooses it
    (large activations: ``AUTO_MIN_ELEMENTS``): the same statistics, summed in float64."""
    if isinstance(norm, torch.nn.BatchNorm1d) and norm.training and norm.affine and feature_major(h) \
            and csr_kernels.choose_fused(h):
        from dynsparse.sparse.kernels.cbhw import batch_norm_relu_cbhw
        csr_kernels.follow_torch_threads()
        return batch_norm_relu_cbhw(norm, h.t()).t()  # type: ignore[arg-type]  # any [C, ...] layout
    return F.relu(batch_norm(norm, h))


def linear(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``layer(h)``; a plain ``nn.Linear`` (without hooks) on a feature-major ``h`` (after a CSR
    layer) is run as ``(W @ h^T)^T``, which keeps the layout and is 10-20x faster than PyTorch's
    ``linear`` on the transposed view (784-10000-10000-10 MLP's dense output layer, batch 128:
    ~15 against ~1 ms forward, one thread). Not in ``csr_kernels``' mode ``torch``, which keeps
    the earlier code path, and its sums, exactly."""
    if (type(layer) is torch.nn.Linear and feature_major(h) and csr_kernels.get_mode() != "torch"
            and not _has_hooks(layer)):
        y = (layer.weight @ h.t()).t()
        return y if layer.bias is None else y + layer.bias
    return layer(h)


def _has_hooks(layer: torch.nn.Module) -> bool:
    """Any hook that ``layer(h)`` would run (the layer's own or global): then it is called as such."""
    from torch.nn.modules import module as m
    return bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


# The CPU kernel of sampled_addmm (the weight gradient) takes no bfloat16 or float16
CSR_DTYPES = (torch.float32, torch.float64)


def dtype_message(dtype: torch.dtype) -> str:
    return (f"CSR weights hold float32 or float64 values, not {dtype}: keep the model's weights in float32 and train "
            "with autocast (--amp bf16), or use backend 'masked'")


def sparse_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                  t_perm: torch.Tensor, t_crow: torch.Tensor, t_col: torch.Tensor, shape: tuple[int, int],
                  bias: torch.Tensor | None = None, capture: GradientCapture | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x`` of shape ``[..., in]`` (batch dims flattened around the call)."""
    if values.dtype not in CSR_DTYPES:
        raise DynsparseError(dtype_message(values.dtype))
    lead = x.shape[:-1]
    # Under autocast (--amp bf16) the sparse products stay in the weights' dtype: the CPU kernel
    # of sampled_addmm has no bfloat16, and autocast would cast the dense operands down.
    with torch.autocast(x.device.type, enabled=False):
        y = SparseLinearFunction.apply(x.reshape(-1, shape[1]).to(values.dtype), values, crow, col, t_perm, t_crow,
                                       t_col, tuple(shape), capture)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, shape[0])
