"""The ResNet twins on the batch-innermost layout ``[C, H, W, B]``: the package's ResNet-50 (v1,
bottleneck) and torchvision's ``ResNet`` family (``resnet18``/``34`` of basic blocks,
``resnet50``/``101``/``152`` and ``wide_resnet50_2``/``101_2`` of bottlenecks), their block convs
truly sparse, like :func:`~dynsparse.sparse.layers.csr_conv.convert_wideresnet` for the WRN.

Block convs: a bottleneck's 1x1, 3x3 (with the stride) and 1x1; a basic block's two 3x3 (the
first with the stride). The stem (conv, batch norm, ReLU, max pooling) stays dense on
``[B, C, H, W]``, run as the network's own modules, and the layout is converted once after it;
the downsample shortcuts (1x1 conv + batch norm) run as one matrix product on the layout
(masked, if selected); global average pooling on the layout, then ``fc`` on ``[B, C]``.

torchvision's classes are recognized by identity (module ``torchvision.models.resnet`` and
name, never a subclass or a look-alike, whose forward may do more than the twin's; torchvision
is not imported here), with exact ``nn.BatchNorm2d`` norms and ``nn.ReLU`` activations in the
blocks: a ResNet built with another ``norm_layer``, or whose blocks' ``relu`` was replaced, is not
converted. Forward hooks on the blocks or their modules are not run by the twin (as for the
WRN). Grouped or dilated convs (ResNeXt, ``replace_stride_with_dilation``) are refused by
:func:`~dynsparse.sparse.layers.csr_conv.check_convertible`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.sparse.kernels.cbhw import batch_norm_cbhw, batch_norm_relu_cbhw
from dynsparse.sparse.kernels.conv import to_cbhw
from dynsparse.sparse.layers.csr_conv import CSRConv2d, conv1x1_cbhw, swap_block_convs

__all__ = ["convert_resnet", "is_resnet", "resnet_block_convs", "resnet_kind", "resnet_refusal"]

_TORCHVISION = "torchvision.models.resnet"
# block kind -> its convs and batch norms, in the order its forward runs them
_CONVS = {"bottleneck": ("conv1", "conv2", "conv3"), "basic": ("conv1", "conv2")}
_BNS = {"bottleneck": ("bn1", "bn2", "bn3"), "basic": ("bn1", "bn2")}


def _torchvision(obj: object, name: str) -> bool:
    return type(obj).__module__ == _TORCHVISION and type(obj).__name__ == name


def _block_kind(block: nn.Module, package: bool) -> str | None:
    if package:  # the package's Bottleneck (the engine may not import the models: by structure)
        kind = "bottleneck"
    elif _torchvision(block, "BasicBlock"):
        kind = "basic"
    elif _torchvision(block, "Bottleneck"):
        kind = "bottleneck"
    else:
        return None
    if not all(isinstance(getattr(block, c, None), nn.Conv2d) for c in _CONVS[kind]):
        return None
    if not all(type(getattr(block, b, None)) is nn.BatchNorm2d for b in _BNS[kind]):  # the layout's batch norm
        return None
    if not package and type(getattr(block, "relu", None)) is not nn.ReLU:  # the twin's blocks apply ReLU
        return None
    ds = getattr(block, "downsample", False)
    if ds is None:
        return kind
    # run as conv1x1_cbhw + batch_norm_cbhw: exactly a bias-free unpadded 1x1 conv and a batch norm
    if (type(ds) is not nn.Sequential or len(ds) != 2 or type(ds[0]) is not nn.Conv2d
            or type(ds[1]) is not nn.BatchNorm2d or ds[0].kernel_size != (1, 1) or ds[0].padding != (0, 0)
            or ds[0].bias is not None or ds[0].groups != 1 or ds[0].stride[0] != ds[0].stride[1]):
        return None
    return kind


def _blocks(model: nn.Module, package: bool) -> list[tuple[str, Any, str]] | None:
    """(name, block, kind) of every block of layer1-4, or None if one is not a known block."""
    out = []
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}", None)
        if type(layer) is not nn.Sequential:
            return None
        for j, b in enumerate(layer):
            kind = _block_kind(b, package)
            if kind is None:
                return None
            out.append((f"layer{i}.{j}", b, kind))
    return out or None


def resnet_kind(model: nn.Module) -> str | None:
    """``"ResNet-50"`` for the package's bottleneck ResNet-50 (its class says so: ``csr_twin``, on
    that class only), ``"torchvision ResNet"`` for torchvision's ``ResNet`` itself, or None. The
    structure is checked too: conv1, bn1, maxpool, layer1-4 of known blocks (see the module doc),
    fc; for torchvision also its ``relu`` and an ``avgpool`` to 1x1."""
    package = vars(type(model)).get("csr_twin") == "resnet50"
    if not (package or _torchvision(model, "ResNet")):
        return None
    if not (isinstance(getattr(model, "conv1", None), nn.Module) and type(getattr(model, "bn1", None)) is nn.BatchNorm2d
            and isinstance(getattr(model, "maxpool", None), nn.Module) and isinstance(getattr(model, "fc", None),
                                                                                        nn.Module)):
        return None
    if not package:
        pool = getattr(model, "avgpool", None)
        if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
            return None
        if not isinstance(getattr(model, "relu", None), nn.Module):
            return None
    if _blocks(model, package) is None:
        return None
    return "ResNet-50" if package else "torchvision ResNet"


def is_resnet(model: nn.Module) -> bool:
    """Whether ``model`` has a ResNet twin (see :func:`resnet_kind`)."""
    return resnet_kind(model) is not None


def _model_blocks(model: nn.Module) -> list[tuple[str, Any, str]]:
    """(name, block, kind) of a recognized ResNet (before or after conversion), by its structure
    alone: never an empty list for a network whose later change fails the checks of :func:`_blocks`."""
    return [(f"layer{i}.{j}", b, "bottleneck" if hasattr(b, "conv3") else "basic")
            for i in range(1, 5) for j, b in enumerate(getattr(model, f"layer{i}", None) or [])]


def resnet_block_convs(model: nn.Module) -> list[str]:
    """The names of the block conv weights (``layer1.0.conv1.weight``, ...), in forward order."""
    return [f"{name}.{c}.weight" for name, _, kind in _model_blocks(model) for c in _CONVS[kind]]


def convert_resnet(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, CSRConv2d]:
    """``model`` (see :func:`resnet_kind`) in place: block convs -> :class:`CSRConv2d` with the
    entries ``masks[name]`` (shaped like the weight) marks, forward on the layout. Every other
    module stays the same object; names stay the dense network's. Returns the new convs."""
    return swap_block_convs(model, [(name, block, _CONVS[kind]) for name, block, kind in _model_blocks(model)],
                            masks, _converted_forward)


def _converted_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    relu = self.relu if _torchvision(self, "ResNet") else F.relu  # the package's ResNet-50 has no relu module
    out = to_cbhw(self.maxpool(relu(self.bn1(self.conv1(x)))))  # the only layout conversion
    for _, b, kind in _model_blocks(self):
        y = batch_norm_relu_cbhw(b.bn1, b.conv1(out))
        if kind == "bottleneck":
            y = batch_norm_relu_cbhw(b.bn2, b.conv2(y))
            y = batch_norm_cbhw(b.bn3, b.conv3(y))
        else:
            y = batch_norm_cbhw(b.bn2, b.conv2(y))
        if b.downsample is not None:
            conv, bn = b.downsample[0], b.downsample[1]
            out = batch_norm_cbhw(bn, conv1x1_cbhw(conv.weight, out, conv.stride[0]))
        out = F.relu(y + out)
    return self.fc(out.mean(dim=(1, 2)).t())  # global average pooling: [C, B] -> [B, C]


def resnet_refusal(model: nn.Module) -> str | None:
    """Why a model of torchvision's ``ResNet`` class has no twin, in a few words (None if it has
    one, or is not of that class)."""
    if not _torchvision(model, "ResNet") or is_resnet(model):
        return None
    for i in range(1, 5):
        for j, b in enumerate(getattr(model, f"layer{i}", None) or []):
            if _block_kind(b, False) is None:
                return (f"its block layer{i}.{j} ({type(b).__module__}.{type(b).__name__}) is not torchvision's "
                        "BasicBlock or Bottleneck itself with nn.BatchNorm2d norms, nn.ReLU and a 1x1 conv + "
                        "nn.BatchNorm2d downsample")
    return ("its stem, layers or pooling are not torchvision's (bn1 an nn.BatchNorm2d, layer1-4 nn.Sequential, avgpool "
            "an nn.AdaptiveAvgPool2d to 1x1)")
