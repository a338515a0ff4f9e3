"""The three networks of the original experiments, and which of their weights are sparse.

Contract:

- :func:`create_model` builds ``mnist_mlp`` (LeNet-300-100), ``cifar10_WideResNet`` (Zagoruyko
  pre-activation WRN) or ``imagenet_resnet50`` (torchvision-style ResNet-50 v1) as plain
  ``nn.Module``\\ s with ordinary ``nn.Linear``/``nn.Conv2d`` layers: the masks live outside the
  model, so no custom layer classes are needed. Shapes, initialisation and parameter counts
  match the reference code (IntelAI/dynamic-reparameterization, ``model.py``).
- :func:`sparse_parameter_names` lists, by fully qualified name, the weights that the reference
  code reparameterizes as sparse; every other parameter stays dense. It also works on any user
  model (default: the weights of every ``nn.Conv1d/2d/3d`` and ``nn.Linear``).
- :func:`layer_type` says whether a parameter belongs to a conv (``"conv"``) or a linear
  (``"fc"``) layer, which is how the reference code picks between its conv and fc sparsities.

Module attribute names follow the reference code (``fc_int``, ``block1.layer.0.conv1``,
``convShortcut``, ...) so that per-layer tables and names can be compared with it directly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.sparse.masks import conv_and_linear_weights

MODEL_NAMES: tuple[str, ...] = ("mnist_mlp", "cifar10_WideResNet", "imagenet_resnet50")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Which of --initial-sparsity-conv / --initial-sparsity-fc each model's sparse layers use.
SPARSE_LAYER_TYPES: dict[str, tuple[str, ...]] = {
    "mnist_mlp": ("fc",), "cifar10_WideResNet": ("conv",), "imagenet_resnet50": ("conv", "fc")}


def dataset_of(model_name: str) -> str:
    """The dataset a registered model is built for: ``"mnist"``, ``"cifar10"`` or ``"imagenet"``."""
    if model_name not in MODEL_NAMES:
        raise unknown_choice("model", model_name, MODEL_NAMES)
    return model_name.split("_", 1)[0]


def _init_conv_and_bn(model: nn.Module) -> None:
    # Convs N(0, sqrt(2 / (kh * kw * out_channels))), the reference init for every conv (sparse or
    # not); BatchNorm weight 1, bias 0.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MnistMLP(nn.Module):
    """LeNet-300-100: 784 -> 300 -> 100 -> ``num_classes``.

    With ``batch_norm`` a BatchNorm1d follows every linear layer, the logits included (``bn3``),
    and the linears have no bias, as in the reference. Without it, the linears carry biases
    instead. Any input is flattened to ``(N, 784)``. Linear weights keep PyTorch's default
    U(+-1/sqrt(fan_in)) init, which is what the reference ``DynamicLinear`` draws.
    """

    def __init__(self, num_classes: int = 10, batch_norm: bool = True) -> None:
        super().__init__()
        bias = not batch_norm
        self.fc1 = nn.Linear(784, 300, bias=bias)
        self.fc_int = nn.Linear(300, 100, bias=bias)
        self.fc2 = nn.Linear(100, num_classes, bias=bias)
        norm = nn.BatchNorm1d if batch_norm else (lambda _features: nn.Identity())
        self.bn1, self.bn2, self.bn3 = norm(300), norm(100), norm(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        x = F.relu(self.bn2(self.fc_int(x)))
        return self.bn3(self.fc2(x))

    def sparse_parameter_names(self, sparse_resnet_downsample: bool = False) -> list[str]:
        """All three linear weights (the flag only concerns ResNet and is ignored)."""
        return ["fc1.weight", "fc_int.weight", "fc2.weight"]


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
        out = F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1)
        return self.fc(out.flatten(1))

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
    Init: He-normal fan-out convs, BN weight 1 / bias 0, fc PyTorch default.
    """

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
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

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


def _check_channels(channels: list[int], widen_factor: float) -> None:
    if widen_factor <= 0 or min(channels) < 1:
        raise DynsparseError(
            f"widen_factor must be > 0 and large enough to leave every layer at least one "
            f"channel, got {widen_factor} (channels {channels})"
        )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist_mlp": lambda num_classes, layers, widen_factor, batch_norm:
        MnistMLP(num_classes, batch_norm),
    "cifar10_WideResNet": lambda num_classes, layers, widen_factor, batch_norm:
        WideResNet(layers, widen_factor, num_classes),
    "imagenet_resnet50": lambda num_classes, layers, widen_factor, batch_norm:
        ResNet50(widen_factor, num_classes),
}
assert tuple(_BUILDERS) == MODEL_NAMES


def create_model(name: str, *, num_classes: int = 10, layers: int = 28, widen_factor: float = 10.0,
                 batch_norm: bool = True) -> nn.Module:
    """Build a registered model with fresh (global-RNG) initialisation.

    ``layers`` is used by the WRN only, ``batch_norm`` by the MLP only, ``widen_factor`` by WRN
    and ResNet-50 (its default 10 is the reference CLI's WRN default; it would make a huge
    ResNet). Raises :class:`DynsparseError` for an unknown name (listing the valid ones), a WRN
    depth that is not 6n+4 with n >= 1, a non-positive ``widen_factor`` or ``num_classes``.
    """
    if name not in _BUILDERS:
        raise unknown_choice("model", name, MODEL_NAMES)
    if widen_factor <= 0:
        raise DynsparseError(f"widen_factor must be > 0, got {widen_factor}")
    if num_classes < 1:
        raise DynsparseError(f"num_classes must be >= 1, got {num_classes}")
    return _BUILDERS[name](num_classes, layers, widen_factor, batch_norm)


def sparse_parameter_names(model: nn.Module, *, sparse_resnet_downsample: bool = False) -> list[str]:
    """Fully qualified names of the weights to sparsify, in ``named_parameters()`` order.

    A model that defines ``sparse_parameter_names(sparse_resnet_downsample=...)`` (all models
    here) decides for itself. For any other model: the ``weight`` of every ``nn.Conv1d/2d/3d``
    and ``nn.Linear``; biases, norms and embeddings stay dense.
    """
    own = getattr(model, "sparse_parameter_names", None)
    if callable(own):
        return list(own(sparse_resnet_downsample=sparse_resnet_downsample))
    return conv_and_linear_weights(model)


def layer_type(model: nn.Module, name: str) -> str:
    """``"conv"`` or ``"fc"`` for the parameter ``name`` of a conv or linear module of ``model``.

    Raises :class:`DynsparseError` if ``model`` has no such parameter or it belongs to another
    kind of module (the caller then has no conv/fc sparsity to give it).
    """
    params = dict(model.named_parameters())
    if name not in params:
        raise DynsparseError(f"model has no parameter {name!r}")
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    raise DynsparseError(
        f"parameter {name!r} belongs to a {type(module).__name__}, not a conv or linear layer"
    )
