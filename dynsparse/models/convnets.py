"""The conv nets of the original experiments: the pre-activation Wide ResNet (CIFAR-10) and the
torchvision-style ResNet-50 v1 (ImageNet), with the reference code's shapes, initialisation and
attribute names (see :mod:`dynsparse.models`, which registers them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.errors import DynsparseError


def _init_conv_and_bn(model: nn.Module) -> None:
    # Convs N(0, sqrt(2 / (kh * kw * out_channels))), the reference init for every conv (sparse or
    # not); BatchNorm weight 1, bias 0.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_channels(channels: list[int], widen_factor: float) -> None:
    if widen_factor <= 0 or min(channels) < 1:
        raise DynsparseError(
            f"widen_factor (--widen-factor) must be > 0 and large enough to leave every layer at least one "
            f"channel, got {widen_factor} (channels {channels})"
        )


class WideBasicBlock(nn.Module):
    """Pre-activation block: bn1-relu-conv1(3x3, stride)-bn2-relu-conv2(3x3), no dropout.

    When the shape changes, the shortcut is a 1x1 conv applied to the *pre-activated* input
    relu(bn1(x)), as in Zagoruyko's PyTorch WRN and the reference; otherwise it is the identity.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        # The reference decides on channels only (in == out); with channels equal and stride > 1
        # it would add tensors of different sizes, so the stride check here only adds safety.
        self.equalInOut = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class _NetworkBlock(nn.Module):
    # A wrapper only so that parameter names read ``block1.layer.0.conv1.weight`` as in the reference.
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``k``: (depth-4)/6 blocks per group, channels round([16, 16k, 32k, 64k]).

    Strides 1, 2, 2 for the three groups; then bn-relu, global average pooling (the reference's
    ``avg_pool2d(8)`` on 32x32 inputs; adaptive here so other sizes work) and a biased fc.
    Init: He-normal fan-out convs, BN weight 1 / bias 0, fc bias 0, fc weight PyTorch default.
    """

    # the CSR backend converts exactly this class (not a subclass or a look-alike, whose forward may
    # differ) to its batch-innermost twin: dynsparse.sparse.layers
    csr_twin = "wideresnet"

    def __init__(self, depth: int = 28, widen_factor: float = 10.0, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise DynsparseError(
                f"WideResNet depth must satisfy (depth - 4) % 6 == 0 and depth >= 10, got {depth}"
            )
        n = (depth - 4) // 6
        ch = [int(round(c * widen_factor)) if i else c for i, c in enumerate((16, 16, 32, 64))]
        _check_channels(ch, widen_factor)
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = _NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        _init_conv_and_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        # global average pooling as a mean: adaptive_avg_pool2d's backward has no deterministic
        # CUDA kernel (torch.use_deterministic_algorithms would refuse it)
        return self.fc(F.relu(self.bn1(out)).mean((2, 3)))

    def sparse_parameter_names(self, sparse_resnet_downsample: bool = False) -> list[str]:
        """Both 3x3 convs of every block; the first conv, shortcuts and fc stay dense.

        ``sparse_resnet_downsample`` only concerns ResNet-50 and is ignored, as in the reference.
        """
        return [
            f"{name}.{conv}.weight"
            for name, m in self.named_modules() if isinstance(m, WideBasicBlock)
            for conv in ("conv1", "conv2")
        ]


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4), BN after each, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision-style ResNet-50 v1 whose base width 64 is scaled by ``widen_factor``.

    Width rule (the reference's): ``base = round(64 * widen_factor)``; the stem has ``base``
    channels and stage i has ``base * 2**i`` planes (``4 * base * 2**i`` outputs). Rounding once
    and then doubling is what reproduces the reference's thin-dense sizes (x0.54: 8,167,095 and
    x0.46: 5,771,217 parameters with 1000 classes); rounding each stage separately does not.
    Init: He-normal fan-out convs, BN weight 1 / bias 0, fc weight PyTorch default, fc bias 0.
    """

    # the CSR backend converts exactly this class (not a subclass or a look-alike, whose forward may
    # differ) to its batch-innermost twin: dynsparse.sparse.layers
    csr_twin = "resnet50"

    def __init__(self, widen_factor: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        base = int(round(64 * widen_factor))
        _check_channels([base], widen_factor)
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, 3, stride=1)
        self.layer2 = self._make_layer(base * 2, 4, stride=2)
        self.layer3 = self._make_layer(base * 4, 6, stride=2)
        self.layer4 = self._make_layer(base * 8, 3, stride=2)
        self.fc = nn.Linear(base * 8 * Bottleneck.expansion, num_classes)
        _init_conv_and_bn(self)
        nn.init.zeros_(self.fc.bias)  # the reference's fc is a DynamicLinear, whose bias starts at zero

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
        self.inplanes = out
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))  # not adaptive_avg_pool2d: see WideResNet.forward

    def sparse_parameter_names(self, sparse_resnet_downsample: bool = False) -> list[str]:
        """conv1-3 of every bottleneck and ``fc.weight``; with ``sparse_resnet_downsample`` also
        the 1x1 downsample convs. The stem conv, BN and fc bias always stay dense."""
        keep = {f"{name}.{conv}.weight"
                for name, m in self.named_modules() if isinstance(m, Bottleneck)
                for conv in ("conv1", "conv2", "conv3")}
        keep.add("fc.weight")
        if sparse_resnet_downsample:
            keep |= {f"{name}.0.weight" for name, m in self.named_modules()
                     if name.endswith(".downsample")}
        return [name for name, _ in self.named_parameters() if name in keep]
