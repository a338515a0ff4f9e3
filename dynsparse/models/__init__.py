"""The three networks of the original experiments, and which of their weights are sparse.

Contract:

- :func:`create_model` builds ``mnist_mlp`` (LeNet-300-100), ``cifar10_WideResNet`` (Zagoruyko
  pre-activation WRN) or ``imagenet_resnet50`` (torchvision-style ResNet-50 v1) as plain
  ``nn.Module``\\ s with ordinary ``nn.Linear``/``nn.Conv2d`` layers: the masks live outside the
  model, so no custom layer classes are needed. Shapes, initialisation and parameter counts
  match the reference code (IntelAI/dynamic-reparameterization, ``model.py``).
- :func:`sparse_parameter_names` lists, by fully qualified name, the weights that the reference
  code reparameterizes as sparse; every other parameter stays dense. It also works on any user
  model: there the library's default rule, :func:`~dynsparse.sparse.select.select_weights`.
- :func:`layer_type` says whether a parameter belongs to a conv (``"conv"``) or a linear
  (``"fc"``) layer, which is how the reference code picks between its conv and fc sparsities.

Module attribute names follow the reference code (``fc_int``, ``block1.layer.0.conv1``,
``convShortcut``, ...) so that per-layer tables and names can be compared with it directly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.models.convnets import Bottleneck, ResNet50, WideBasicBlock, WideResNet  # noqa: F401 (re-exported)
from dynsparse.sparse.layers.csr_functions import batch_norm, batch_norm_relu, linear
from dynsparse.sparse.select import is_matrix_weight, select_weights

MODEL_NAMES: tuple[str, ...] = ("mnist_mlp", "cifar10_WideResNet", "imagenet_resnet50")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Which of --initial-sparsity-conv / --initial-sparsity-fc each model's sparse layers use.
SPARSE_LAYER_TYPES: dict[str, tuple[str, ...]] = {
    "mnist_mlp": ("fc",), "cifar10_WideResNet": ("conv",), "imagenet_resnet50": ("conv", "fc")}


def dataset_of(model_name: str) -> str:
    """The dataset a registered model is built for: ``"mnist"``, ``"cifar10"`` or ``"imagenet"``
    (``torchvision:NAME`` and ``timm:NAME`` models train on ImageFolder data: ``"imagenet"``)."""
    from dynsparse.models import zoo
    if zoo.is_zoo_name(model_name):
        zoo.check_zoo_name(model_name)
        return zoo.DATASET
    if model_name not in MODEL_NAMES:
        raise unknown_choice("model", model_name, (*MODEL_NAMES, "torchvision:NAME", "timm:NAME"))
    return model_name.split("_", 1)[0]


class MnistMLP(nn.Module):
    """LeNet-300-100: 784 -> 300 -> 100 -> ``num_classes``, or any ``hidden_sizes``.

    With ``batch_norm`` a BatchNorm1d follows every linear layer, the logits included (``bn3``),
    and the linears have no bias, as in the reference. Without it, the linears carry biases
    instead, initialised to zero as the reference's ``DynamicLinear`` does. Any input is flattened
    to ``(N, 784)``. Linear weights keep PyTorch's default U(+-1/sqrt(fan_in)) init, which is what
    the reference ``DynamicLinear`` draws.

    Layers are named ``fc1``, then ``fc_int``, ``fc_int2``, ... for the hidden-to-hidden ones, then
    ``fc2``; norms ``bn1`` ... ``bn{len(hidden_sizes) + 1}``: the default is the reference's model,
    parameter for parameter and draw for draw. With ``sparse_density`` every linear but the output
    one is a :class:`~dynsparse.sparse.layers.csr_linear.CSRLinear` of that density, built without a dense
    weight (for wide layers), its positions and values drawn from a generator seeded by the
    global RNG.
    """

    def __init__(self, num_classes: int = 10, batch_norm: bool = True,
                 hidden_sizes: tuple[int, ...] = (300, 100), sparse_density: float | None = None) -> None:
        super().__init__()
        if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
            raise DynsparseError(f"hidden_sizes must be one or more positive widths, got {tuple(hidden_sizes)}")
        bias = not batch_norm
        sizes = (784, *map(int, hidden_sizes), num_classes)
        self.fc_names = ["fc1", *[f"fc_int{i if i > 1 else ''}" for i in range(1, len(sizes) - 2)], "fc2"]
        for i, name in enumerate(self.fc_names):
            if sparse_density is not None and name != "fc2":
                from dynsparse.sparse.layers.csr_linear import CSRLinear
                gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
                layer: nn.Module = CSRLinear(sizes[i], sizes[i + 1], bias=bias, density=sparse_density, generator=gen)
            else:
                layer = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
            setattr(self, name, layer)
        norm = nn.BatchNorm1d if batch_norm else (lambda _features: nn.Identity())
        for i, width in enumerate(sizes[1:], start=1):
            setattr(self, f"bn{i}", norm(width))
        if bias:  # the reference's DynamicLinear zeroes its bias (init_parameters)
            for name in self.fc_names:
                nn.init.zeros_(getattr(self, name).bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, name in enumerate(self.fc_names, start=1):
            h, norm = linear(getattr(self, name), x), getattr(self, f"bn{i}")
            x = batch_norm(norm, h) if name == "fc2" else batch_norm_relu(norm, h)
        return x

    def sparse_parameter_names(self, sparse_resnet_downsample: bool = False) -> list[str]:
        """Every linear weight (the flag only concerns ResNet and is ignored); a CSR layer's
        weight is named the same (``<layer>.weight``), its trainable tensor is ``<layer>.weight.values``."""
        return [f"{name}.weight" for name in self.fc_names]


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist_mlp": lambda num_classes, layers, widen_factor, batch_norm, hidden_sizes:
        MnistMLP(num_classes, batch_norm, hidden_sizes),
    "cifar10_WideResNet": lambda num_classes, layers, widen_factor, batch_norm, hidden_sizes:
        WideResNet(layers, widen_factor, num_classes),
    "imagenet_resnet50": lambda num_classes, layers, widen_factor, batch_norm, hidden_sizes:
        ResNet50(widen_factor, num_classes),
}
assert tuple(_BUILDERS) == MODEL_NAMES


def create_model(name: str, *, num_classes: int = 10, layers: int = 28, widen_factor: float = 10.0,
                 batch_norm: bool = True, hidden_sizes: tuple[int, ...] = (300, 100),
                 sparse_density: float | None = None) -> nn.Module:
    """Build a registered model with fresh (global-RNG) initialisation.

    ``layers`` is used by the WRN only, ``batch_norm`` and ``hidden_sizes`` by the MLP only, ``widen_factor`` by WRN
    and ResNet-50 (its default 10 is the reference CLI's WRN default; it would make a huge
    ResNet). Raises :class:`DynsparseError` for an unknown name (listing the valid ones), a WRN
    depth that is not 6n+4 with n >= 1, a non-positive ``widen_factor`` or ``num_classes``.
    ``torchvision:NAME`` and ``timm:NAME`` build an untrained standard model (:mod:`dynsparse.models.zoo`).
    """
    if name.startswith(("torchvision:", "timm:")):  # standard models: dynsparse/models/zoo.py
        from dynsparse.models.zoo import create_zoo_model
        return create_zoo_model(name, num_classes)
    if name not in _BUILDERS:
        raise unknown_choice("model", name, MODEL_NAMES)
    if widen_factor <= 0:
        raise DynsparseError(f"widen_factor (--widen-factor) must be > 0, got {widen_factor}")
    if num_classes < 1:
        raise DynsparseError(f"num_classes must be >= 1, got {num_classes}")
    if sparse_density is not None:  # mnist_mlp's hidden layers built in CSR form (--sparse-backend)
        return MnistMLP(num_classes, batch_norm, tuple(hidden_sizes), sparse_density=sparse_density)
    return _BUILDERS[name](num_classes, layers, widen_factor, batch_norm, tuple(hidden_sizes))


def sparse_parameter_names(model: nn.Module, *, sparse_resnet_downsample: bool = False) -> list[str]:
    """Fully qualified names of the weights to sparsify, in ``named_parameters()`` order.

    A model that defines ``sparse_parameter_names(sparse_resnet_downsample=...)`` (all models
    here: the paper's choices) decides for itself. Any other model (``torchvision:``/``timm:``, a
    user's own) gets the library's default rule, :func:`~dynsparse.sparse.select.select_weights`:
    every weight used as a matrix product (README, "What is sparse").
    """
    own = getattr(model, "sparse_parameter_names", None)
    if callable(own):
        return list(own(sparse_resnet_downsample=sparse_resnet_downsample))
    return select_weights(model)


def layer_type(model: nn.Module, name: str) -> str:
    """``"conv"`` or ``"fc"`` for the parameter ``name`` of ``model``: ``"conv"`` for a conv or
    conv-transpose weight, ``"fc"`` for every other weight the default rule selects (linear,
    bilinear, attention projections, a module's declared ``sparse_weights``).

    Raises :class:`DynsparseError` if ``model`` has no such parameter or it belongs to another
    kind of module (the caller then has no conv/fc sparsity to give it).
    """
    params = dict(model.named_parameters())
    from dynsparse.sparse.layers.csr_linear import CSRWeight
    if name not in params and isinstance(dict(model.named_modules()).get(name), CSRWeight):
        return "fc"  # a linear weight stored in CSR form (its parameter is <name>.values)
    if name not in params:
        raise DynsparseError(f"model has no parameter {name!r}")
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, nn.Linear) or is_matrix_weight(attr, module):
        return "fc"
    raise DynsparseError(
        f"parameter {name!r} belongs to a {type(module).__name__}, not a conv or linear layer"
    )
