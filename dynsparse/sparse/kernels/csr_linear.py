"""Compiled CPU kernels for the CSR linear layer's products (numba, the optional ``kernels`` extra).

The same three products as :mod:`dynsparse.sparse.layers.csr_functions`, on the same layouts (activations
feature-major ``[features, B]``, row-major, float32), for the CSR pattern ``(crow, col)`` of ``W``:

- ``sddmm``: the weight gradient at the active entries, ``dW_e = <dy^T[r_e], x^T[c_e]>`` (a dot
  product of two contiguous rows of ``B`` floats per entry), parallel over blocks of rows of
  equal entry counts; each thread owns its entries of ``dW``: no atomics. It replaces
  ``torch.sparse.sampled_addmm``, which was the largest single kernel of the MLP step.
- ``spmm``: ``W @ d`` (forward), each output row accumulated in one buffer of ``B`` floats and
  written once, parallel over rows.
- ``spmm_t``: ``W^T @ d`` (input gradient) over ``W^T``'s pattern, reading ``values[t_perm[e]]``
  inside the loop, so the permuted copy of the values (a separate gather) is never made.

Which of them run instead of PyTorch's products is :func:`choose` (``set_mode``): ``"torch"``
(PyTorch's products only: exactly the code path, and the sums, from before these kernels),
``"numba"`` (these kernels for every float32 CPU layer; the tests' reference comparison), ``"auto"``
(the default: only what was measured faster, ``AUTO_OPS`` for layers of at least ``AUTO_MIN_WORK``
multiply-adds per product, PyTorch otherwise and whenever numba is missing). The same mode governs
two layout fixes of ``layers.csr_functions`` after a CSR layer: a dense ``nn.Linear`` on the feature-major
activations (``linear``) and batch norm + ReLU fused (``batch_norm_relu``, with ``kernels.cbhw``'
kernels, for at least ``AUTO_MIN_ELEMENTS`` activations). numba's threads follow
``torch.get_num_threads()``, so ``--threads`` and ``torch.set_num_threads`` govern both.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from dynsparse.errors import DynsparseError

__all__ = ["AUTO_MIN_ELEMENTS", "AUTO_MIN_WORK", "AUTO_OPS", "MODES", "OPS", "available", "choose", "choose_fused",
           "follow_torch_threads", "get_mode", "kernels", "set_mode", "sddmm", "spmm", "spmm_t"]

MODES = ("auto", "numba", "torch")
_mode = "auto"
_lock = threading.Lock()
_compiled: dict | None = None
_available: bool | None = None
_prefetch = None  # numba intrinsic, set by _build

# ``auto`` runs a product with these kernels when active entries x batch is at least this (the
# multiply-adds of one product). Below it numba's call overhead (~10-20 us) and PyTorch's kernels
# being as fast leave nothing to gain, and small layers (e.g. the bit-identity check's 784-300-100
# MLP) keep PyTorch's exact sums. Measured: `python benchmarks/bench_csr_kernels.py` (per-op
# table in benchmarks/results/csr_kernels.md).
AUTO_MIN_WORK = 1 << 24


def available() -> bool:
    """Whether numba is installed (the compiled CSR products need it)."""
    global _available
    if _available is None:
        try:
            import numba  # noqa: F401
        except ImportError:
            _available = False
        else:
            _available = True
    return _available


def set_mode(mode: str) -> str:
    """Which products the CSR linear layers run: ``auto`` (default), ``numba`` or ``torch``.
    Returns the previous mode. ``numba`` without numba installed stops with one line."""
    global _mode
    if mode not in MODES:
        raise DynsparseError(f"unknown CSR kernel mode {mode!r}; valid choices: {', '.join(MODES)}")
    if mode == "numba" and not available():
        raise DynsparseError("CSR kernel mode 'numba' needs numba: pip install 'dynsparse[kernels]'")
    previous, _mode = _mode, mode
    return previous


def get_mode() -> str:
    return _mode


# ``auto`` fuses batch norm + ReLU after a CSR layer (``layers.csr_functions.batch_norm_relu``, with
# ``kernels.cbhw``' kernels) for activations of at least this many elements (features x batch).
AUTO_MIN_ELEMENTS = 1 << 20

OPS = ("forward", "input_grad", "weight_grad")
# The products ``auto`` runs compiled (above AUTO_MIN_WORK): only those measured faster than
# PyTorch's on the development machine (benchmarks/results/csr_kernels.md).
AUTO_OPS = frozenset({"weight_grad"})


def choose(op: str, values: torch.Tensor, batch: int) -> bool:
    """Whether product ``op`` (one of ``OPS``) of a layer with these ``values`` at this batch size
    runs compiled: by the mode, numba present, float32 on CPU; for ``auto`` also the op and size."""
    if _mode == "torch" or values.dtype != torch.float32 or values.device.type != "cpu":
        return False
    if _mode == "numba":
        return True
    return op in AUTO_OPS and values.numel() * batch >= AUTO_MIN_WORK and available()


def choose_fused(h: torch.Tensor) -> bool:
    """Whether batch norm + ReLU on these activations run fused (compiled), like :func:`choose`."""
    if _mode == "torch" or h.dtype != torch.float32 or h.device.type != "cpu":
        return False
    return _mode == "numba" or (h.numel() >= AUTO_MIN_ELEMENTS and available())


def _build() -> dict:
    try:
        import numba
        from numba import njit, prange
    except ImportError as e:
        raise DynsparseError("the compiled CSR products need numba: pip install 'dynsparse[kernels]'") from e
    from dynsparse.sparse.kernels.conv import match_torch_threads
    match_torch_threads(numba)  # numba shares PyTorch's OpenMP runtime: its own default count would change PyTorch's
    opts = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}
    U = numba.uint64  # unsigned offsets: no negative-index wraparound checks, so the loops vectorize
    global _prefetch
    # a module global, not a closure variable: numba keys its cache by the closure's contents,
    # and an intrinsic object pickles differently in every process (the cache would never hit)
    _prefetch = _prefetch_intrinsic()
    # Every entry reads a whole row of B floats at a random column: the table (e.g. 5 MB at 10000
    # features, batch 128) is not in L1/L2, so the loops wait on memory unless the row of the
    # entry AHEAD entries later is requested first (as FBGEMM's embedding_bag kernel does).
    AHEAD = 8

    # nt: the thread count, passed in (calling numba.get_num_threads inside would stop caching).
    # Rows are split into nt blocks of about equal entry counts (the work is per entry).
    @njit(**opts)
    def sddmm(crow, col, dyt, xt, out, nt):
        rows, b = dyt.shape
        dyf, xf = dyt.reshape(-1), xt.reshape(-1)
        nnz = crow[rows]
        ub = U(b)
        for t in prange(nt):
            r0 = np.searchsorted(crow[:rows], (nnz * t) // nt, "left")
            r1 = np.searchsorted(crow[:rows], (nnz * (t + 1)) // nt, "left") if t + 1 < nt else rows
            for r in range(r0, r1):
                d0 = U(r) * ub
                e, e1 = crow[r], crow[r + 1]
                # four entries per pass: the dy row is loaded once for four dot products
                while e + 4 <= e1:
                    for k in range(4):
                        p = U(col[min(e + k + AHEAD, nnz - 1)]) * ub
                        for i in range(U(0), ub, U(16)):
                            _prefetch(xf, p + i)
                    x0, x1 = U(col[e]) * ub, U(col[e + 1]) * ub
                    x2, x3 = U(col[e + 2]) * ub, U(col[e + 3]) * ub
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for i in range(ub):
                        dv = dyf[d0 + i]
                        s0 += dv * xf[x0 + i]
                        s1 += dv * xf[x1 + i]
                        s2 += dv * xf[x2 + i]
                        s3 += dv * xf[x3 + i]
                    out[e], out[e + 1], out[e + 2], out[e + 3] = s0, s1, s2, s3
                    e += 4
                while e < e1:
                    p = U(col[min(e + AHEAD, nnz - 1)]) * ub
                    for i in range(U(0), ub, U(16)):
                        _prefetch(xf, p + i)
                    x0 = U(col[e]) * ub
                    s0 = np.float32(0.0)
                    for i in range(ub):
                        s0 += dyf[d0 + i] * xf[x0 + i]
                    out[e] = s0
                    e += 1

    @njit(**opts)
    def gather_rows(crow, col, perm, val, d, out, nt):
        # out[r] = sum over entries e of row r of val[perm[e]] * d[col[e]]; perm is None for W
        # itself (forward) and t_perm for W^T (input gradient): no permuted copy of the values
        rows, b = out.shape
        df, of = d.reshape(-1), out.reshape(-1)
        nnz = crow[rows]
        ub = U(b)
        for t in prange(nt):
            r0 = np.searchsorted(crow[:rows], (nnz * t) // nt, "left")
            r1 = np.searchsorted(crow[:rows], (nnz * (t + 1)) // nt, "left") if t + 1 < nt else rows
            acc = np.empty(b, np.float32)  # a fresh buffer: LLVM then knows it aliases nothing
            for r in range(r0, r1):
                acc[:] = 0.0
                e, e1 = crow[r], crow[r + 1]
                # four entries per pass over the accumulator: a quarter of its loads and stores
                while e + 4 <= e1:
                    for k in range(4):
                        p = U(col[min(e + k + AHEAD, nnz - 1)]) * ub
                        for i in range(U(0), ub, U(16)):
                            _prefetch(df, p + i)
                    if perm is None:
                        w0, w1, w2, w3 = val[e], val[e + 1], val[e + 2], val[e + 3]
                    else:
                        w0, w1, w2, w3 = val[perm[e]], val[perm[e + 1]], val[perm[e + 2]], val[perm[e + 3]]
                    s0, s1 = U(col[e]) * ub, U(col[e + 1]) * ub
                    s2, s3 = U(col[e + 2]) * ub, U(col[e + 3]) * ub
                    for i in range(ub):
                        acc[i] += w0 * df[s0 + i] + w1 * df[s1 + i] + w2 * df[s2 + i] + w3 * df[s3 + i]
                    e += 4
                while e < e1:
                    p = U(col[min(e + AHEAD, nnz - 1)]) * ub
                    for i in range(U(0), ub, U(16)):
                        _prefetch(df, p + i)
                    w0 = val[e] if perm is None else val[perm[e]]
                    s0 = U(col[e]) * ub
                    for i in range(ub):
                        acc[i] += w0 * df[s0 + i]
                    e += 1
                o = U(r) * ub
                for i in range(ub):
                    of[o + i] = acc[i]

    return {"sddmm": sddmm, "gather_rows": gather_rows}


def _prefetch_intrinsic():
    """``prefetch(array_1d, index)``: LLVM's prefetch of the cache line holding that element
    (read, high locality); a hint with no effect on results."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, arr, idx):
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()
        return types.void(arr, idx), codegen

    return prefetch


def kernels() -> dict:
    """The compiled kernels (compiled, or loaded from numba's cache, on first use)."""
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = _build()
    return _compiled


def _threads() -> int:
    import numba
    return max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))


def follow_torch_threads() -> None:
    """numba's thread count for kernels that read it themselves (``kernels.cbhw``): PyTorch's, so
    ``--threads`` and ``torch.set_num_threads`` govern them too."""
    import numba

    from dynsparse.sparse.kernels.conv import match_torch_threads
    match_torch_threads(numba)


def sddmm(crow: torch.Tensor, col: torch.Tensor, dyt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """The weight gradient at the entries of ``(crow, col)``: ``(dyt @ xt^T)[r_e, c_e]`` for
    contiguous float32 ``dyt`` ``[out, B]`` and ``xt`` ``[in, B]``, aligned with the values."""
    out = torch.empty(col.numel(), dtype=torch.float32)
    with torch.profiler.record_function("csr_kernels::sddmm"):  # named in profiles (the step breakdown)
        kernels()["sddmm"](crow.numpy(), col.numpy(), dyt.detach().numpy(), xt.detach().numpy(), out.numpy(),
                           _threads())
    return out


def spmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``W @ d`` (row-major ``[out, B]``) for contiguous float32 ``d`` ``[in, B]``."""
    out = torch.empty(crow.numel() - 1, d.shape[1], dtype=torch.float32)
    with torch.profiler.record_function("csr_kernels::spmm"):
        kernels()["gather_rows"](crow.numpy(), col.numpy(), None, values.detach().numpy(), d.detach().numpy(),
                                 out.numpy(), _threads())
    return out


def spmm_t(t_crow: torch.Tensor, t_col: torch.Tensor, t_perm: torch.Tensor, values: torch.Tensor,
           d: torch.Tensor) -> torch.Tensor:
    """``W^T @ d`` (row-major ``[in, B]``) over ``W^T``'s pattern (``values[t_perm]`` its values)."""
    out = torch.empty(t_crow.numel() - 1, d.shape[1], dtype=torch.float32)
    with torch.profiler.record_function("csr_kernels::spmm_t"):
        kernels()["gather_rows"](t_crow.numpy(), t_col.numpy(), t_perm.numpy(), values.detach().numpy(),
                                 d.detach().numpy(), out.numpy(), _threads())
    return out
