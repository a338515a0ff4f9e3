"""Standard models by name: ``--model torchvision:NAME`` and ``--model timm:NAME``.

The model is built untrained (no pretrained weights, nothing downloaded) with the data's number
of classes. Such models have no ``sparse_parameter_names`` of their own, so the library's rule
picks the sparse layers: the weight of every conv and linear layer (the classifier included);
``--initial-sparsity-conv`` and ``--initial-sparsity-fc`` set their sparsities as for the
built-in models. They train on ImageFolder data (the ``imagenet`` loader: ``DATA/train`` and
``DATA/val``, 224-pixel crops).
"""
from __future__ import annotations

import difflib

from torch import nn

from dynsparse.errors import DynsparseError

PREFIXES = ("torchvision:", "timm:")
DATASET = "imagenet"

# Models whose auxiliary heads would make the training forward pass return a tuple.
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}


def is_zoo_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def _library(name: str):
    lib, _, model = name.partition(":")
    if not model:
        raise DynsparseError(f"--model {name} names no model: write {lib}:NAME, e.g. torchvision:resnet18")
    if lib == "torchvision":
        try:
            import torchvision.models
        except ImportError:
            raise DynsparseError(f"--model {name} needs torchvision: pip install 'dynsparse[imagenet]'") from None
        return lib, model, torchvision.models.list_models(module=torchvision.models)
    try:
        import timm
    except ImportError:
        raise DynsparseError(f"--model {name} needs timm, which is not installed: pip install timm") from None
    return lib, model, timm.list_models()


def check_zoo_name(name: str) -> None:
    """Raise a one-line :class:`DynsparseError` unless ``name`` is a model the library has."""
    lib, model, names = _library(name)
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
        examples = [n for n in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16",
                                "convnext_tiny", "resnet50d") if n in names][:5] or sorted(names)[:5]
        hint = f"did you mean {' or '.join(f'{lib}:{c}' for c in close)}? " if close else ""
        raise DynsparseError(f"unknown {lib} model {model!r}; {hint}{len(names)} classification models, e.g. "
                             f"{', '.join(f'{lib}:{e}' for e in examples)}")


def create_zoo_model(name: str, num_classes: int) -> nn.Module:
    """An untrained ``torchvision:NAME`` or ``timm:NAME`` classifier with ``num_classes`` outputs."""
    check_zoo_name(name)
    lib, _, model = name.partition(":")
    try:
        if lib == "torchvision":
            import torchvision.models
            return torchvision.models.get_model(model, weights=None, num_classes=num_classes, **_NO_AUX.get(model, {}))
        import timm
        return timm.create_model(model, pretrained=False, num_classes=num_classes)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DynsparseError(f"cannot build {name} with {num_classes} classes: {str(e).splitlines()[0]}") from None
