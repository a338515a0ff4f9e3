"""Batch norm + ReLU fused, on the batch-innermost ``[C, H, W, B]`` layout (numba kernels).

In a sparse WRN step the batch norms and ReLUs, unchanged by sparsity, became the largest cost
after the sparse convolutions (PyTorch: batch norm, ReLU and their backwards as four passes with
their own temporaries). Fused, each channel's contiguous ``H*W*B`` values are read twice forward
(statistics, then normalize + clamp) and twice backward, in one kernel per direction, parallel
over channels. Training mode only (batch statistics, running statistics updated as
``nn.BatchNorm2d`` does); evaluation and non-affine norms use the unfused path.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.errors import DynsparseError

__all__ = ["batch_norm_cbhw", "batch_norm_relu_cbhw"]

_lock = threading.Lock()
_compiled: dict | None = None


def _build() -> dict:
    try:
        import numpy as np
        from numba import njit, prange
    except ImportError as e:
        raise DynsparseError("fused batch norm needs numba: pip install 'dynsparse[kernels]'") from e
    import numba

    from dynsparse.sparse.kernels.conv import match_torch_threads
    match_torch_threads(numba)  # see kernels.conv.set_threads
    opts = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}

    @njit(**opts)
    def forward(x, gamma, beta, eps, y, mean, invstd):
        c, n = x.shape
        for ch in prange(c):
            xr, yr = x[ch], y[ch]
            s = 0.0  # float64 statistics: sums of ~10^5-10^6 values
            for i in range(n):
                s += xr[i]
            m = s / n
            v = 0.0
            for i in range(n):
                d = xr[i] - m
                v += d * d
            istd = 1.0 / np.sqrt(v / n + eps)
            mean[ch], invstd[ch] = m, istd
            a = np.float32(gamma[ch] * istd)
            b = np.float32(beta[ch] - m * gamma[ch] * istd)
            for i in range(n):
                t = a * xr[i] + b
                yr[i] = t if t > 0 else np.float32(0.0)

    @njit(**opts)
    def backward(x, y, g, gamma, mean, invstd, dx, dgamma, dbeta):
        c, n = x.shape
        for ch in prange(c):
            xr, yr, gr, dr = x[ch], y[ch], g[ch], dx[ch]
            m, istd = mean[ch], invstd[ch]
            sg, sgx = 0.0, 0.0
            for i in range(n):
                gi = gr[i] if yr[i] > 0 else np.float32(0.0)  # through the ReLU
                sg += gi
                sgx += gi * (xr[i] - m)
            dgamma[ch], dbeta[ch] = sgx * istd, sg
            a = np.float32(gamma[ch] * istd)
            k1, k2 = np.float32(sg / n), np.float32(sgx / n * istd * istd)
            mf = np.float32(m)
            for i in range(n):
                gi = gr[i] if yr[i] > 0 else np.float32(0.0)
                dr[i] = a * (gi - k1 - (xr[i] - mf) * k2)

    return {"forward": forward, "backward": backward}


def _kernels() -> dict:
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = _build()
    return _compiled


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        c = x.shape[0]
        x2 = x.contiguous().view(c, -1)
        y = torch.empty_like(x2)
        mean = torch.empty(c, dtype=torch.float64)
        invstd = torch.empty(c, dtype=torch.float64)
        _kernels()["forward"](x2.numpy(), gamma.detach().numpy(), beta.detach().numpy(), float(eps), y.numpy(),
                              mean.numpy(), invstd.numpy())
        ctx.save_for_backward(x2, y, gamma, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        return y.view_as(x), mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x2, y, gamma, mean, invstd = ctx.saved_tensors
        g = dy.contiguous().view_as(x2)
        dx = torch.empty_like(x2)
        dgamma = torch.empty_like(gamma)
        dbeta = torch.empty_like(gamma)
        _kernels()["backward"](x2.numpy(), y.numpy(), g.numpy(), gamma.detach().numpy(), mean.numpy(), invstd.numpy(),
                               dx.numpy(), dgamma.numpy(), dbeta.numpy())
        return dx.view_as(dy), dgamma, dbeta, None


def batch_norm_cbhw(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn`` applied to ``[C, H, W, B]``: viewed as ``[1, C, H*W*B]``, the statistics per channel
    are over the same elements as ``bn`` on ``[B, C, H, W]``; running stats updated alike (this
    is ``nn.BatchNorm2d.forward`` with the input viewed)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    y = F.batch_norm(x.reshape(1, x.shape[0], -1), bn.running_mean if keep else None, bn.running_var if keep else None,
                     bn.weight, bn.bias, batch_stats, factor, bn.eps)
    return y.view_as(x)


def batch_norm_relu_cbhw(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(bn(x))`` for ``x`` ``[C, H, W, B]`` (float32, CPU), fused in training mode; the
    running statistics and ``num_batches_tracked`` are updated exactly as ``bn`` would."""
    if not (bn.training and bn.affine and x.dtype == torch.float32 and x.device.type == "cpu"):
        return F.relu(batch_norm_cbhw(bn, x))
    y, mean, invstd = _BNReLU.apply(x, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        assert bn.running_var is not None and bn.num_batches_tracked is not None  # tracked together
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            n = x.numel() // x.shape[0]
            var = (1.0 / invstd) ** 2 - bn.eps  # biased batch variance
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_((var * n / max(n - 1, 1)).to(bn.running_var.dtype), alpha=factor)
    return y
