"""Truly sparse ``Conv2d`` layers and a WRN on the batch-innermost ``[C, H, W, B]`` layout.

:class:`CSRConv2d` keeps its weight as a :class:`~dynsparse.sparse.csr.CSRWeight` of the
``[out, in * kh * kw]`` view (the flat index of entry ``(oc, ic, ki, kj)`` is that of the dense
``[out, in, kh, kw]`` weight), so storage, ``set_topology`` with the optimizer's state remapped,
checkpoints and export are the linear layers'; the products are the compiled kernels of
:mod:`~dynsparse.sparse.conv_kernels` (numba, the ``kernels`` extra).

Activations stay ``[C, H, W, B]`` between layers: batch norm, ReLU, residual adds, 1x1
shortcuts and global average pooling work on that layout (:func:`batch_norm_cbhw`, ...), and the
layout is converted once at the network's input (after its first, dense, conv). Converting
around every layer cost most of the kernels' advantage (issue 27).

Not yet behind the engine: ``--sparse-backend csr`` does not build these layers; the engine's
gradient capture (RigL/SNFS growth) has no convolution form here.
"""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.cbhw_ops import batch_norm_cbhw, batch_norm_relu_cbhw
from dynsparse.sparse.conv_kernels import csc_of, sparse_conv2d, to_cbhw
from dynsparse.sparse.csr import CSRWeight

__all__ = ["CSRConv2d", "CSRWideResNet", "batch_norm_cbhw", "conv1x1_cbhw", "csr_conv_from_conv"]


class CSRConv2d(nn.Module):
    """A bias-free ``nn.Conv2d`` (square kernel, stride 1 or 2) with a CSR weight, on ``[C, H, W, B]``."""

    def __init__(self, weight: CSRWeight, in_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        if weight.shape[1] != in_channels * kernel_size * kernel_size:
            raise DynsparseError(f"CSR weight shape {weight.shape} is not [out, "
                                 f"{in_channels}*{kernel_size}*{kernel_size}]")
        if stride not in (1, 2):
            raise DynsparseError(f"sparse conv stride must be 1 or 2, got {stride}")
        self.weight = weight
        self.in_channels, self.out_channels = in_channels, weight.shape[0]
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self._t_key: tuple | None = None
        self._t = None

    def _transposed(self):
        # the index by input channel, rebuilt only when the pattern changed (set_topology and
        # checkpoint loads replace or rewrite the index tensors)
        crow, col = self.weight.crow_indices, self.weight.col_indices
        key = (id(crow), crow._version, id(col), col._version, col.numel())
        if key != self._t_key:
            self._t = csc_of(crow, col, self.in_channels, self.kernel_size ** 2)
            self._t_key = key
        return self._t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        return sparse_conv2d(x, self.weight.values, self.weight.crow_indices, self.weight.col_indices,
                             (self.out_channels, self.in_channels, k, k), self.stride, self.padding, self._transposed())

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, in, k, k]`` weight (zeros off the pattern)."""
        k = self.kernel_size
        return self.weight.to_dense().view(self.out_channels, self.in_channels, k, k)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


def csr_conv_from_conv(conv: nn.Conv2d, mask: torch.Tensor) -> CSRConv2d:
    """A :class:`CSRConv2d` with ``conv``'s weights where ``mask`` (shaped like the weight) is True."""
    kh, kw = conv.kernel_size
    if (isinstance(conv.padding, str) or conv.bias is not None or kh != kw or conv.stride[0] != conv.stride[1]
        or conv.padding[0] != conv.padding[1]
            or conv.dilation != (1, 1) or conv.groups != 1):
        raise DynsparseError(f"CSRConv2d supports bias-free, square, undilated, ungrouped convs; got {conv}")
    flat_w = conv.weight.detach().reshape(conv.out_channels, -1)
    weight = CSRWeight.from_dense(flat_w, mask.reshape(flat_w.shape).bool())
    return CSRConv2d(weight, conv.in_channels, kh, conv.stride[0], conv.padding[0])


def conv1x1_cbhw(weight: torch.Tensor, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """A dense 1x1 conv (``weight`` ``[out, in, 1, 1]``) on ``[C, H, W, B]``: one matrix product."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    c, h, w, b = x.shape
    return torch.mm(weight.view(weight.shape[0], c), x.reshape(c, -1)).view(-1, h, w, b)


class CSRWideResNet(nn.Module):
    """A :class:`~dynsparse.convnets.WideResNet` whose sparse convs (both 3x3 convs of every
    block) are :class:`CSRConv2d`, run batch-innermost. Built from a dense WRN and its masks
    (``{parameter name: bool mask}``); the first conv, batch norms, shortcuts and fc are the WRN's
    own modules (shared), the dense block convs are not kept."""

    def __init__(self, wrn: Any, masks: dict[str, torch.Tensor]) -> None:  # Any: the engine may not import convnets
        super().__init__()
        self.conv1, self.bn1, self.fc = wrn.conv1, wrn.bn1, wrn.fc
        self.blocks = nn.ModuleList()
        for gname in ("block1", "block2", "block3"):
            for i, block in enumerate(getattr(wrn, gname).layer):
                parts = nn.ModuleDict({"bn1": block.bn1, "bn2": block.bn2})
                if block.convShortcut is not None:
                    parts["shortcut"] = block.convShortcut
                for conv in ("conv1", "conv2"):
                    name = f"{gname}.layer.{i}.{conv}.weight"
                    if name not in masks:
                        raise DynsparseError(f"no mask for {name}; CSRWideResNet needs one per block conv")
                    parts[conv] = csr_conv_from_conv(getattr(block, conv), masks[name])
                self.blocks.append(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = to_cbhw(self.conv1(x))  # the only layout conversion (its input has 3 channels)
        for block in self.blocks:
            b = cast(dict[str, Any], block)  # a ModuleDict of the parts built above
            pre = batch_norm_relu_cbhw(b["bn1"], out)
            y = b["conv2"](batch_norm_relu_cbhw(b["bn2"], b["conv1"](pre)))
            short = conv1x1_cbhw(b["shortcut"].weight, pre, b["conv1"].stride) if "shortcut" in b else out
            out = y + short
        out = batch_norm_relu_cbhw(self.bn1, out).mean(dim=(1, 2))  # global average pooling: [C, B]
        return self.fc(out.t())
