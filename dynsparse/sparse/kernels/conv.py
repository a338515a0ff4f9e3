"""Compiled CPU kernels for a truly sparse ``Conv2d`` (numba, the optional ``kernels`` extra).

Storage: a weight of shape ``[out, in, kh, kw]`` kept as CSR of its ``[out, in*kh*kw]`` view:
``crow`` (int32, ``out + 1``), ``col`` (int32 flat ``(ic * kh + ki) * kw + kj`` per active
entry, sorted within a row) and ``values`` (float32). Activations are ``[C, H, W, B]``: the batch
innermost, so each active weight scales contiguous runs of ``B`` floats (vector loops) and no
im2col copy is made (lowering to im2col + CSR products was 4x slower than dense, issue 27).

The three kernels compute only what the active entries need:

- ``forward``: ``Y[oc, p, q, :] = sum_e w_e X[ic_e, p*s + ki_e - pad, q*s + kj_e - pad, :]``,
  parallel over output channels; each output row ``Y[oc, p]`` (``W*B`` floats) stays in L1
  while every entry of ``oc`` adds into it.
- ``input_grad``: the transpose, parallel over input channels via the transposed index
  (``csc_of``), each ``dX[ic, ih]`` row accumulated in place: no atomics, no reduction copies.
- ``weight_grad``: ``dW_e = <dY[oc], shifted X[ic_e]>`` at the active entries only, parallel
  over output channels (each thread owns its rows of ``dW``: no atomics).

The parallelism is numba's thread count capped by PyTorch's; :func:`set_threads` sets both (the
CLI's ``--threads`` does).
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import torch

from dynsparse.errors import DynsparseError

__all__ = ["available", "conv_out_size", "csc_of", "from_cbhw", "kernels", "set_threads", "sparse_conv2d", "to_cbhw"]

_lock = threading.Lock()
_compiled: dict | None = None


def available() -> bool:
    """Whether numba is installed (the compiled sparse convolution needs it)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def conv_out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _build() -> dict:
    try:
        import numba
        from numba import njit, prange
    except ImportError as e:
        raise DynsparseError("sparse convolutions need numba: pip install 'dynsparse[kernels]'") from e
    match_torch_threads(numba)
    opts = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}
    U = numba.uint64  # unsigned indices: numba then emits no negative-index wraparound, and loops vectorize

    # nt: numba's thread count, passed in (calling numba.get_num_threads inside would stop the
    # kernels from being cached). Loop order, all three kernels: output row outermost, then each
    # thread's block of channels. The input rows one output row needs (3 rows of every channel: 1.5 MB
    # at 64 channels, 16 wide, batch 128) are then read from L2 by every channel of the block, instead of the whole
    # input being streamed from L3 once per channel (measured ~1.5-2x slower).
    @njit(**opts)
    def forward(x, crow, xoff, ki_e, kj_e, val, stride, pad, y, nt):
        # xoff[e]: offset of entry e's input channel plane in x; borders clipped per entry and row
        c_out, ho, wo, b = y.shape
        _, h, w, _ = x.shape
        xf = x.reshape(-1)
        yf = y.reshape(-1)
        n, ub, sb = U(wo * b), U(b), U(stride * b)
        cb = (c_out + nt - 1) // nt
        for t in prange(nt):
            acc = np.empty(wo * b, np.float32)  # one output row, in L1 while every entry adds to it
            for p in range(ho):
                for oc in range(t * cb, min(c_out, (t + 1) * cb)):
                    acc[:] = 0.0
                    for e in range(crow[oc], crow[oc + 1]):
                        ih = p * stride - pad + ki_e[e]
                        if ih < 0 or ih >= h:
                            continue
                        kj = kj_e[e]
                        # output columns q whose input column q*stride - pad + kj lies in [0, w)
                        q0 = max(0, (pad - kj + stride - 1) // stride)
                        q1 = min(wo, (w - 1 + pad - kj) // stride + 1)
                        if q1 <= q0:
                            continue
                        wv = val[e]
                        src = U(xoff[e] + (ih * w + q0 * stride - pad + kj) * b)
                        dst = U(q0 * b)
                        if stride == 1:
                            for i in range(U((q1 - q0) * b)):
                                acc[dst + i] += wv * xf[src + i]
                        else:
                            for q in range(U(q1 - q0)):
                                sq, dq = src + q * sb, dst + q * ub
                                for i in range(ub):
                                    acc[dq + i] += wv * xf[sq + i]
                    yb = U((oc * ho + p) * wo * b)
                    for i in range(n):
                        yf[yb + i] = acc[i]

    @njit(**opts)
    def input_grad(dy, crow_t, dyoff, ki_t, kj_t, val_t, stride, pad, dx, nt):
        # gather form over the transposed index: dx[ic, ih] accumulated in one row, written once
        _, ho, wo, b = dy.shape
        c_in, h, w, _ = dx.shape
        dyf = dy.reshape(-1)
        dxf = dx.reshape(-1)
        ub, sb = U(b), U(stride * b)
        cb = (c_in + nt - 1) // nt
        for t in prange(nt):
            acc = np.empty(w * b, np.float32)
            for ih in range(h):
                for ic in range(t * cb, min(c_in, (t + 1) * cb)):
                    acc[:] = 0.0
                    for e in range(crow_t[ic], crow_t[ic + 1]):
                        kj = kj_t[e]
                        r = ih + pad - ki_t[e]
                        if r < 0 or r % stride != 0 or r // stride >= ho:
                            continue
                        # output columns q whose input column q*stride - pad + kj lies in [0, w)
                        q0 = max(0, (pad - kj + stride - 1) // stride)
                        q1 = min(wo, (w - 1 + pad - kj) // stride + 1)
                        if q1 <= q0:
                            continue
                        wv = val_t[e]
                        src = U(dyoff[e] + ((r // stride) * wo + q0) * b)
                        dst = U((q0 * stride - pad + kj) * b)
                        if stride == 1:
                            for i in range(U((q1 - q0) * b)):
                                acc[dst + i] += wv * dyf[src + i]
                        else:
                            for q in range(U(q1 - q0)):
                                dq, sq = dst + q * sb, src + q * ub
                                for i in range(ub):
                                    acc[dq + i] += wv * dyf[sq + i]
                    xb = U((ic * h + ih) * w * b)
                    for i in range(U(w * b)):
                        dxf[xb + i] = acc[i]

    @njit(**opts)
    def weight_grad(x, dy, crow, xoff, ki_e, kj_e, stride, pad, dval, nt):
        c_out, ho, wo, b = dy.shape
        _, h, w, _ = x.shape
        xf = x.reshape(-1)
        dyf = dy.reshape(-1)
        ub, sb = U(b), U(stride * b)
        cb = (c_out + nt - 1) // nt
        for t in prange(nt):  # each thread owns its channels' entries of dval: no atomics
            for e in range(crow[min(c_out, t * cb)], crow[min(c_out, (t + 1) * cb)]):
                dval[e] = 0.0
            for p in range(ho):
                for oc in range(t * cb, min(c_out, (t + 1) * cb)):
                    d = (oc * ho + p) * wo * b  # this row of dy stays in L1 across the entries
                    for e in range(crow[oc], crow[oc + 1]):
                        ih = p * stride - pad + ki_e[e]
                        if ih < 0 or ih >= h:
                            continue
                        kj = kj_e[e]
                        q0 = max(0, (pad - kj + stride - 1) // stride)
                        q1 = min(wo, (w - 1 + pad - kj) // stride + 1)
                        if q1 <= q0:
                            continue
                        src = U(xoff[e] + (ih * w + q0 * stride - pad + kj) * b)
                        dq0 = U(d + q0 * b)
                        acc = np.float32(0.0)
                        if stride == 1:
                            for i in range(U((q1 - q0) * b)):
                                acc += dyf[dq0 + i] * xf[src + i]
                        else:
                            for q in range(U(q1 - q0)):
                                sq, dq = src + q * sb, dq0 + q * ub
                                for i in range(ub):
                                    acc += dyf[dq + i] * xf[sq + i]
                        dval[e] += acc

    return {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad}


def kernels() -> dict:
    """The compiled kernels (compiled, or loaded from numba's cache, on first use)."""
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = _build()
    return _compiled


def _threads() -> int:
    import numba
    # numba's thread count (its omp layer shares the OpenMP runtime with PyTorch, so setting it here
    # would change PyTorch's too), capped by PyTorch's: set both with set_threads
    return max(1, min(numba.get_num_threads(), torch.get_num_threads()))


def set_threads(n: int) -> None:
    """Run PyTorch and the compiled kernels on ``n`` threads (numba's at most ``NUMBA_NUM_THREADS``).
    With numba's OpenMP layer both share one runtime, and a kernel launched under numba's own count
    would change PyTorch's: numba's is set first (once numba is loaded; the kernels' first use
    sets it from PyTorch's otherwise, so that plain runs do not pay numba's import)."""
    if "numba" in sys.modules:
        match_torch_threads(sys.modules["numba"], n)
    torch.set_num_threads(n)


def match_torch_threads(numba, n: int | None = None) -> None:
    """numba's thread count set to ``n`` (default: PyTorch's), at most ``NUMBA_NUM_THREADS``;
    PyTorch's left as it was. numba's first call starts its thread pool, and its OpenMP layer then
    sets the shared runtime's count to ``NUMBA_NUM_THREADS`` (the core count by default): PyTorch
    ran every later operation, and the kernels, on all cores whatever ``--threads`` said, in
    every process (each torchrun rank too). So PyTorch's count is read before and set again after."""
    torch_n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(torch_n if n is None else n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != torch_n:
        torch.set_num_threads(torch_n)


def csc_of(crow: torch.Tensor, col: torch.Tensor, c_in: int, khw: int):
    """The index by input channel: ``crow_t`` (int32, ``c_in + 1``), ``ccol_t`` (int64
    ``oc * khw + k`` per entry) and ``perm`` such that ``values[perm]`` are in that order.
    O(nnz log nnz), once per topology (callers may cache it)."""
    c_out = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(c_out, dtype=torch.int64), (crow[1:] - crow[:-1]).long())
    ic, k = col.long() // khw, col.long() % khw
    perm = torch.argsort(ic * (c_out * khw) + rows * khw + k)
    crow_t = torch.zeros(c_in + 1, dtype=torch.int32)
    crow_t[1:] = torch.cumsum(torch.bincount(ic, minlength=c_in), 0)
    return crow_t, (rows * khw + k)[perm], perm


def _offsets(col, ccol_t, kh, kw, h, w, ho, wo, b):
    """Per entry: its input channel's plane offset in ``x``, ``ki``, ``kj``; and in transposed
    order: its output channel's plane offset in ``dy``, ``ki``, ``kj``. O(nnz) per call."""
    col = col.long()
    khw = kh * kw
    kc, kt = col % khw, ccol_t % khw
    return ((col // khw) * (h * w * b), kc // kw, kc % kw,
            (ccol_t // khw) * (ho * wo * b), kt // kw, kt % kw)


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, crow, col, crow_t, ccol_t, perm, shape, stride, pad, capture):
        c_out, c_in, kh, kw = shape
        if values.dtype != torch.float32 or values.dim() != 1 or values.numel() != col.numel():
            raise DynsparseError(f"sparse conv values must be float32, one per active entry ({col.numel()}), "
                                 f"got {values.dtype} {tuple(values.shape)}")
        if x.dim() != 4 or x.shape[0] != c_in or x.dtype != torch.float32 or x.device.type != "cpu":
            raise DynsparseError(f"sparse conv input must be float32 CPU [C={c_in}, H, W, B], "
                                 f"got {tuple(x.shape)} {x.dtype} on {x.device}")
        _, h, w, b = x.shape
        ho, wo = conv_out_size(h, kh, stride, pad), conv_out_size(w, kw, stride, pad)
        if ho < 1 or wo < 1:
            raise DynsparseError(f"sparse conv input {h}x{w} is smaller than its {kh}x{kw} kernel")
        # borders are clipped per entry in the kernels: no padded copy (a fresh 10 MB buffer per
        # layer and call, whose first-touch page faults cost more than the kernel at density 0.01)
        x = x.contiguous()
        idx = _offsets(col, ccol_t, kh, kw, h, w, ho, wo, b)
        y = torch.empty(c_out, ho, wo, b, dtype=torch.float32)
        kernels()["forward"](x.numpy(), crow.numpy(), *(i.numpy() for i in idx[:3]),
                             values.detach().contiguous().numpy(), stride, pad, y.numpy(), _threads())
        ctx.save_for_backward(x, values, crow, crow_t, perm, *idx)
        ctx.conf, ctx.capture = (stride, pad), capture
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values, crow, crow_t, perm, xoff, ki_e, kj_e, dyoff, ki_t, kj_t = ctx.saved_tensors
        stride, pad = ctx.conf
        dy = dy.contiguous()
        k = kernels()
        dx = dval = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            k["input_grad"](dy.numpy(), crow_t.numpy(), dyoff.numpy(), ki_t.numpy(), kj_t.numpy(),
                            values.detach()[perm].contiguous().numpy(), stride, pad, dx.numpy(), _threads())
        if ctx.needs_input_grad[1]:
            dval = torch.empty_like(values)
            k["weight_grad"](x.numpy(), dy.numpy(), crow.numpy(), xoff.numpy(), ki_e.numpy(), kj_e.numpy(), stride, pad,
                             dval.numpy(), _threads())
        if ctx.capture is not None:  # for a dense weight gradient at an update (RigL, SNFS growth)
            ctx.capture.pairs.append((x, dy))
        return dx, dval, None, None, None, None, None, None, None, None, None


def sparse_conv2d(x, values, crow, col, shape, stride=1, padding=0, transposed=None, capture=None):
    """Sparse convolution of ``x`` ``[C, H, W, B]`` by the CSR weight (``crow``/``col`` int32,
    ``values`` float32); differentiable in ``x`` and ``values``. ``transposed`` =
    ``csc_of(crow, col, c_in, kh * kw)`` may be passed to reuse it between calls. ``capture``
    (an object with a ``pairs`` list) receives ``(x, dy)`` of the backward, from which a dense
    weight gradient can be formed later."""
    if stride not in (1, 2):
        raise DynsparseError(f"sparse conv stride must be 1 or 2, got {stride}")
    c_out, c_in, kh, kw = (int(s) for s in shape)
    if transposed is None:
        transposed = csc_of(crow, col, c_in, kh * kw)
    return _SparseConv.apply(x, values, crow, col, *transposed, (c_out, c_in, kh, kw), int(stride), int(padding),
                             capture)


def to_cbhw(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[C, H, W, B]`` (contiguous): done once at a network's input."""
    return x.permute(1, 2, 3, 0).contiguous()


def from_cbhw(x: torch.Tensor) -> torch.Tensor:
    """``[C, H, W, B]`` -> ``[B, C, H, W]`` (contiguous): done once at a network's output."""
    return x.permute(3, 0, 1, 2).contiguous()
