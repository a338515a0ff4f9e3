"""The ResNet-50 (v1, bottleneck) twin on the batch-innermost layout ``[C, H, W, B]``: its
bottleneck convs (1x1, 3x3 with the stride, 1x1) truly sparse, like
:func:`~dynsparse.sparse.layers.csr_conv.convert_wideresnet` for the WRN.

The stem (7x7 conv, batch norm, ReLU, 3x3 max pooling) stays dense on ``[B, C, H, W]`` and the
layout is converted once after it; the downsample shortcuts (1x1 conv + batch norm) run as one
matrix product on the layout (masked, if selected); ``fc`` takes the pooled ``[B, C]``.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.sparse.kernels.cbhw import batch_norm_cbhw, batch_norm_relu_cbhw
from dynsparse.sparse.kernels.conv import to_cbhw
from dynsparse.sparse.layers.csr_conv import CSRConv2d, conv1x1_cbhw, csr_conv_from_conv

__all__ = ["convert_resnet", "is_resnet", "resnet_block_convs"]

_PARTS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")


def _bottlenecks(model: nn.Module) -> list[tuple[str, Any]] | None:
    out = []
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}", None)
        if not isinstance(layer, nn.Sequential):
            return None
        out += [(f"layer{i}.{j}", b) for j, b in enumerate(layer)]
    return out if out and all(all(hasattr(b, a) for a in _PARTS) for _, b in out) else None


def is_resnet(model: nn.Module) -> bool:
    """Whether ``model`` is the package's bottleneck ResNet-50: its class says so (``csr_twin``, on
    that class only: a look-alike such as an SE-ResNet has modules the twin would skip), and its
    structure is conv1, bn1, maxpool, layer1-4 of blocks with conv1-3/bn1-3/downsample, fc."""
    return (vars(type(model)).get("csr_twin") == "resnet50"
            and isinstance(getattr(model, "conv1", None), nn.Conv2d)
            and isinstance(getattr(model, "bn1", None), nn.BatchNorm2d)
            and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d)
            and isinstance(getattr(model, "fc", None), nn.Linear) and _bottlenecks(model) is not None)


def resnet_block_convs(model: nn.Module) -> list[str]:
    return [f"{name}.{c}.weight" for name, _ in (_bottlenecks(model) or []) for c in ("conv1", "conv2", "conv3")]


def convert_resnet(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, CSRConv2d]:
    """``model`` (see :func:`is_resnet`) in place: bottleneck convs -> :class:`CSRConv2d`, forward on the layout."""
    new = {}
    for name, block in _bottlenecks(model) or []:
        for c in ("conv1", "conv2", "conv3"):
            layer = csr_conv_from_conv(getattr(block, c), masks[f"{name}.{c}.weight"])
            setattr(block, c, layer)
            new[f"{name}.{c}.weight"] = layer
    model.forward = types.MethodType(_converted_forward, model)
    return new


def _converted_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out = to_cbhw(self.maxpool(F.relu(self.bn1(self.conv1(x)))))  # the only layout conversion
    for _, b in _bottlenecks(self) or []:
        y = batch_norm_relu_cbhw(b.bn1, b.conv1(out))
        y = batch_norm_relu_cbhw(b.bn2, b.conv2(y))
        y = batch_norm_cbhw(b.bn3, b.conv3(y))
        if b.downsample is not None:
            conv, bn = b.downsample[0], b.downsample[1]
            out = batch_norm_cbhw(bn, conv1x1_cbhw(conv.weight, out, conv.stride[0]))
        out = F.relu(y + out)
    return self.fc(out.mean(dim=(1, 2)).t())  # global average pooling: [C, B] -> [B, C]
