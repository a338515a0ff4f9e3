"""Truly sparse ``Conv2d`` layers and a WRN on the batch-innermost ``[C, H, W, B]`` layout.

:class:`CSRConv2d` keeps its weight as a :class:`~dynsparse.sparse.layers.csr_linear.CSRWeight` of the
``[out, in * kh * kw]`` view (the flat index of entry ``(oc, ic, ki, kj)`` is that of the dense
``[out, in, kh, kw]`` weight), so storage, ``set_topology`` with the optimizer's state remapped,
checkpoints and export are the linear layers'; the products are the compiled kernels of
:mod:`~dynsparse.sparse.kernels.conv` (numba, the ``kernels`` extra).

Activations stay ``[C, H, W, B]`` between layers: batch norm, ReLU, residual adds, 1x1
shortcuts and global average pooling work on that layout (:func:`batch_norm_cbhw`, ...), and the
layout is converted once at the network's input (after its first, dense, conv). Converting
around every layer cost most of the kernels' advantage (issue 27).

Behind the engine through :func:`~dynsparse.sparse.storage.convert.to_csr` (``Sparsifier(...,
backend="csr")``, ``--sparse-backend csr``), which converts a WideResNet in place with
:func:`convert_wideresnet`. A dense weight gradient for growth by gradient (RigL, SNFS) is formed
from the captured ``(x, dy)`` pairs of the products (:class:`ConvGradientCapture`), only at the
steps a policy asks for it.
"""
from __future__ import annotations

import functools
import types
from typing import Any, cast

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from dynsparse.errors import DynsparseError
from dynsparse.sparse.kernels.cbhw import batch_norm_cbhw, batch_norm_relu_cbhw
from dynsparse.sparse.kernels.conv import csc_of, from_cbhw, sparse_conv2d, to_cbhw
from dynsparse.sparse.layers.csr_functions import GradientCapture
from dynsparse.sparse.layers.csr_linear import CSRWeight

__all__ = ["CSRConv2d", "CSRWideResNet", "ConvGradientCapture", "batch_norm_cbhw", "conv1x1_cbhw",
           "convert_wideresnet", "csr_conv_from_conv", "is_wideresnet", "wideresnet_block_convs"]


class ConvGradientCapture(GradientCapture):
    """The captured ``(x, dy)`` pairs (``[C, H, W, B]``) of a convolution; rows of the dense
    weight gradient ``[out, in * k * k]`` are formed by PyTorch's dense weight-gradient
    convolution, only for the rows asked for."""

    def __init__(self, in_channels: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conf = (in_channels, kernel_size, stride, padding)

    def dense_grad_rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.pairs:
            raise RuntimeError("no gradient captured yet: run a forward and backward after capture_gradient()")
        c_in, k, stride, pad = self.conf
        out = None
        for x, dy in self.pairs:
            g = conv2d_weight(from_cbhw(x), (stop - start, c_in, k, k), from_cbhw(dy[start:stop]),
                                            stride=stride, padding=pad).reshape(stop - start, -1)
            out = g if out is None else out.add_(g)
        assert out is not None
        return out if self.factor is None else out.mul_(self.factor)


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
        weight.dense_shape = (weight.shape[0], in_channels, kernel_size, kernel_size)
        weight.capture_factory = functools.partial(ConvGradientCapture, in_channels, kernel_size, stride, padding)
        self.in_channels, self.out_channels = in_channels, weight.shape[0]
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self._t_key: tuple | None = None
        self._t = None

    def _transposed(self):
        # the index by input channel, rebuilt only when the pattern changed (set_topology and
        # checkpoint loads replace or rewrite the index tensors); the key holds the tensors
        # themselves, compared by identity: an id() of a freed tensor can come back
        crow, col = self.weight.crow_indices, self.weight.col_indices
        key = self._t_key
        if key is None or key[0] is not crow or key[2] is not col or key[1] != crow._version or key[3] != col._version:
            self._t = csc_of(crow, col, self.in_channels, self.kernel_size ** 2)
            self._t_key = (crow, crow._version, col, col._version)
        return self._t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, w = self.kernel_size, self.weight
        # every training forward until released: micro-batches of an accumulated step all count
        capture = w._capture if w._capture_armed and torch.is_grad_enabled() else None
        # under autocast (--amp bf16) the kernels stay in the values' float32, as the CSR linear's products do
        with torch.autocast(x.device.type, enabled=False):
            return sparse_conv2d(x.to(w.values.dtype), w.values, w.crow_indices, w.col_indices,
                                 (self.out_channels, self.in_channels, k, k), self.stride, self.padding,
                                 self._transposed(), capture)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, in, k, k]`` weight (zeros off the pattern)."""
        k = self.kernel_size
        return self.weight.to_dense().view(self.out_channels, self.in_channels, k, k)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


def check_convertible(conv: nn.Conv2d, name: str = "") -> None:
    """One line (DynsparseError) if :class:`CSRConv2d` cannot run ``conv``."""
    kh, kw = conv.kernel_size
    if (isinstance(conv.padding, str) or conv.bias is not None or kh != kw or conv.stride[0] != conv.stride[1]
        or conv.padding[0] != conv.padding[1] or conv.stride[0] not in (1, 2) or conv.padding_mode != "zeros"
            or conv.dilation != (1, 1) or conv.groups != 1):
        raise DynsparseError(f"CSRConv2d supports bias-free, square, undilated, ungrouped convs of stride 1 or 2 with "
                             f"zero padding; {name or 'got'} {conv}: use backend 'auto' or 'masked' (both keep it "
                             "masked)")


def csr_conv_from_conv(conv: nn.Conv2d, mask: torch.Tensor) -> CSRConv2d:
    """A :class:`CSRConv2d` with ``conv``'s weights where ``mask`` (shaped like the weight) is True."""
    check_convertible(conv)
    kh, _ = conv.kernel_size
    assert not isinstance(conv.padding, str)  # check_convertible refuses string padding
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
        blocks = [cast(dict[str, Any], b) for b in self.blocks]  # ModuleDicts of the parts built above
        return _wrn_cbhw(self.conv1, [(b["bn1"], b["conv1"], b["bn2"], b["conv2"], b["shortcut"] if "shortcut" in b
                                       else None) for b in blocks], self.bn1, self.fc, x)


def _wrn_cbhw(conv1, blocks, bn1, fc, x: torch.Tensor) -> torch.Tensor:
    """The pre-activation WRN's forward on ``[C, H, W, B]``; ``blocks``: (bn1, conv1, bn2, conv2,
    shortcut or None) each, the convs :class:`CSRConv2d`."""
    out = to_cbhw(conv1(x))  # the only layout conversion (its input has 3 channels)
    for b1, c1, b2, c2, shortcut in blocks:
        pre = batch_norm_relu_cbhw(b1, out)
        y = c2(batch_norm_relu_cbhw(b2, c1(pre)))
        out = y + (conv1x1_cbhw(shortcut.weight, pre, c1.stride) if shortcut is not None else out)
    out = batch_norm_relu_cbhw(bn1, out).mean(dim=(1, 2))  # global average pooling: [C, B]
    return fc(out.t())


_BLOCK_PARTS = ("bn1", "conv1", "bn2", "conv2", "convShortcut")


def _wrn_blocks(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    layers: list[nn.Sequential] = []
    for g in ("block1", "block2", "block3"):
        layer = getattr(getattr(model, g, None), "layer", None)
        if not isinstance(layer, nn.Sequential):
            return None
        layers.append(layer)
    out = [(f"block{i + 1}.layer.{j}", b) for i, layer in enumerate(layers) for j, b in enumerate(layer)]
    return out if all(all(hasattr(b, a) for a in _BLOCK_PARTS) for _, b in out) else None


def is_wideresnet(model: nn.Module) -> bool:
    """Whether ``model`` is the package's pre-activation WideResNet: its class says so (``csr_twin``,
    set on that class only: the engine does not import the models, and a look-alike's forward may
    differ from the twin's), and its structure is conv1, block1-3 of blocks with
    bn1/conv1/bn2/conv2/convShortcut, bn1, fc."""
    return (vars(type(model)).get("csr_twin") == "wideresnet"
            and isinstance(getattr(model, "conv1", None), nn.Conv2d)
            and isinstance(getattr(model, "bn1", None), nn.BatchNorm2d)
            and isinstance(getattr(model, "fc", None), nn.Linear) and _wrn_blocks(model) is not None)


def wideresnet_block_convs(model: nn.Module) -> list[str]:
    """The names of a WideResNet's block conv weights (``block1.layer.0.conv1.weight``, ...)."""
    return [f"{name}.{c}.weight" for name, _ in (_wrn_blocks(model) or []) for c in ("conv1", "conv2")]


def convert_wideresnet(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, CSRConv2d]:
    """Make ``model`` (a WideResNet, see :func:`is_wideresnet`) its batch-innermost twin, in place:
    every block conv becomes a :class:`CSRConv2d` with the entries ``masks[name]`` (shaped like the
    weight) marks, and the model's ``forward`` runs the whole network on ``[C, H, W, B]`` (as
    :class:`CSRWideResNet`). Every other module stays the same object, so the optimizer keeps its
    parameters, and names stay the dense network's (checkpoints, export). Returns the new convs."""
    blocks = _wrn_blocks(model)
    assert blocks is not None
    return swap_block_convs(model, [(name, block, ("conv1", "conv2")) for name, block in blocks], masks,
                            _converted_forward)


def swap_block_convs(model: nn.Module, blocks, masks: dict[str, torch.Tensor], forward) -> dict[str, CSRConv2d]:
    """The in-place conversion both twins share: each ``(name, block, conv attributes)`` of
    ``blocks`` gets a :class:`CSRConv2d` per conv with the entries ``masks["<name>.<conv>.weight"]`` marks,
    and ``forward`` is bound to the instance (a deep copy rebinds it to the copy; the class keeps
    its own forward). Returns the new convs by weight name."""
    new = {}
    for name, block, convs in blocks:
        for c in convs:
            layer = csr_conv_from_conv(getattr(block, c), masks[f"{name}.{c}.weight"])
            setattr(block, c, layer)
            new[f"{name}.{c}.weight"] = layer
    model.forward = types.MethodType(forward, model)
    return new


def _converted_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    blocks = [(b.bn1, b.conv1, b.bn2, b.conv2, b.convShortcut) for _, b in _wrn_blocks(self) or []]
    return _wrn_cbhw(self.conv1, blocks, self.bn1, self.fc, x)
