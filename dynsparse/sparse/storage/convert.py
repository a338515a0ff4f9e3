"""CSR conversion, the one place where modules are swapped: :func:`to_csr`.

``Sparsifier(..., backend="csr"|"auto")`` draws every topology first (the masked storage's draws,
from the same generator, so the backend changes cost and never answers), then calls
:func:`to_csr` with the masks of the tensors it stores as CSR. A user may call it directly, in
the manner of ``torch.ao``'s ``convert``: the model is changed in place and the optimizer's
param groups and state are rewritten (the dense weight replaced by the value vector, its
per-weight state cut to the active entries).

What converts:

- an ``nn.Linear`` weight: the module becomes a :class:`~dynsparse.sparse.layers.csr_linear.CSRLinear` (the
  bias stays the same parameter);
- the block convs of a WideResNet (the CLI's ``cifar10_WideResNet``), all of them together: the
  sparse convolutions run on the batch-innermost layout ``[C, H, W, B]``, which cannot be kept
  across arbitrary modules, so the conversion is per known architecture. The whole network
  becomes its layout twin in place (:func:`~dynsparse.sparse.layers.csr_conv.convert_wideresnet`: the
  block convs become :class:`~dynsparse.sparse.layers.csr_conv.CSRConv2d`, the forward runs on the
  layout, converted once after the first conv; the first conv, batch norms, 1x1 shortcuts and
  fc stay the same dense modules and parameter objects; selected, the first conv and the
  shortcuts stay masked, ``fc`` may be CSR as any linear). Masks shaped like the weight store
  single weights; masks of its first two dims (``--sub-kernel-granularity 2``) whole kernels;
- the block convs of a ResNet, the same way (:mod:`~dynsparse.sparse.layers.csr_resnet`: the stem,
  max pooling included, stays dense before the layout conversion; the downsample shortcuts run
  as a matrix product on the layout): the package's ResNet-50 (``imagenet_resnet50``, its
  bottleneck convs) and torchvision's ``ResNet`` class itself (``torchvision:resnet18``/``34``:
  both 3x3 convs of every basic block; ``resnet50``/``101``/``152``, ``wide_resnet50_2``/``101_2``:
  the bottleneck convs), recognized by class identity, never a subclass; grouped or dilated
  convs (ResNeXt, ``replace_stride_with_dilation``) are refused.

Anything else is refused in one line (``backend="auto"`` keeps it masked).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.layers.csr_functions import CSR_DTYPES, dtype_message
from dynsparse.sparse.layers.csr_linear import csr_linear_from_linear, dense_state_dict
from dynsparse.sparse.storage.csr import CSRParam, check_on_cpu

log = logging.getLogger(__name__)

__all__ = ["CONV_CROSSOVER_DENSITY", "WIDE_FAN_IN", "prefer_csr_conv", "to_csr", "wideresnet_csr_plan"]

# Density below which a CSR conv layer's training step (forward + both gradients) beats PyTorch's
# dense (oneDNN) convolution, by (kernel size, stride, wide): wide = a fan-in (in_channels * k * k)
# above WIDE_FAN_IN. Each value is the lowest crossover measured among the shapes of its class
# (WRN-28-2's at CIFAR size, ResNet-18/50's at 64x64 and 32x32 inputs): the spatial size, which
# moves the crossover, is not known when ``auto`` decides, and in these networks the wide layers are
# the late, small ones, whose crossovers are lower. From `python benchmarks/bench_sparse_conv.py
# --repeats 5 --threads 1 2 --shapes all --wrn --name sparse_conv_quiet` at commit edc2c6f, 1
# thread, batch 128, quiet machine (load 1.3): benchmarks/results/sparse_conv_quiet.md, its table
# "Crossover by (kernel, stride, fan-in class)" (1x1 narrow: above the grid, its top 0.5). The
# masked network is slower than the dense one, so against it the crossovers are higher.
WIDE_FAN_IN = 1152
CONV_CROSSOVER_DENSITY: dict[tuple[int, int, bool], float] = {
    (3, 1, False): 0.242, (3, 2, False): 0.202, (1, 1, False): 0.5,
    (3, 1, True): 0.154, (3, 2, True): 0.222, (1, 1, True): 0.184}


def prefer_csr_conv(density: float, kernel_size: int, stride: int, fan_in: int) -> bool:
    """Whether a conv layer at ``density`` with ``fan_in`` inputs per output (in_channels * k * k)
    trains faster as CSR on CPU (below the measured crossover of its class; classes never measured:
    no)."""
    limit = CONV_CROSSOVER_DENSITY.get((kernel_size, stride, fan_in > WIDE_FAN_IN))
    return limit is not None and density < limit


def _linear_owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear] | None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr != "weight" or type(module) is not nn.Linear:
        return None
    parent_name, _, child = module_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child, module


def is_conv_weight(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr == "weight" and isinstance(model.get_submodule(module_name) if module_name else model, nn.Conv2d)


def _architecture(model: nn.Module):
    """(name, block convs, converter) of a known conv architecture, or None."""
    from dynsparse.sparse.layers.csr_conv import convert_wideresnet, is_wideresnet, wideresnet_block_convs
    from dynsparse.sparse.layers.csr_resnet import convert_resnet, resnet_block_convs, resnet_kind
    if is_wideresnet(model):
        return "WideResNet", wideresnet_block_convs(model), convert_wideresnet
    kind = resnet_kind(model)
    if kind is not None:
        return kind, resnet_block_convs(model), convert_resnet
    return None


def wideresnet_csr_plan(model: nn.Module, names, masks: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """The block convs of a WideResNet (or a ResNet: :mod:`~dynsparse.sparse.layers.csr_resnet`) among
    ``names`` if they can be stored as CSR together, [] if ``names`` holds no conv weight; otherwise
    one line saying why not (DynsparseError). The network's other convs among ``names`` (the first
    conv, the 1x1 shortcuts) stay masked: its twin runs them as the same dense modules. Everything is checked
    before any module changes (each conv's form, and each of ``masks``' shape when given)."""
    convs = [n for n in names if is_conv_weight(model, n)]
    if not convs:
        return []
    supported = ("backend 'csr' stores nn.Linear weights and the block convs of a WideResNet or a ResNet-50 (the "
                 "package's) or of a torchvision ResNet (resnet18 to resnet152; all of them)")
    arch = _architecture(model)
    if arch is None:
        from dynsparse.sparse.layers.csr_resnet import resnet_refusal
        why = resnet_refusal(model)  # a torchvision ResNet with other blocks or norms: say which
        what = f"a torchvision ResNet whose twin would run another forward: {why}" if why else type(model).__name__
        raise DynsparseError(f"{supported}; {convs[0]} is a conv weight of a {what}: use backend 'auto' (or "
                             "'masked') to keep conv weights masked")
    kind, blocks, _ = arch
    other = [n for n in convs if n not in blocks]
    if other:  # the twin runs the first conv and the 1x1 shortcuts as the same dense modules
        log.info("%s stay masked: on a %s only the block convs are stored as CSR", ", ".join(other), kind)
    missing = [n for n in blocks if n not in convs]
    if missing:
        raise DynsparseError(f"{supported}: the network runs on another layout, so every block conv must be sparse; "
                             f"{missing[0]} is not selected")
    from dynsparse.sparse.kernels import conv as conv_kernels
    if not conv_kernels.available():
        raise DynsparseError("CSR convolutions need numba: pip install 'dynsparse[kernels]' (or use backend 'masked')")
    from dynsparse.sparse.layers.csr_conv import check_convertible
    params = dict(model.named_parameters())
    for n in blocks:
        conv = model.get_submodule(n.rpartition(".")[0])
        assert isinstance(conv, nn.Conv2d)  # is_conv_weight said so
        check_convertible(conv, n)
        w, m = params[n], None if masks is None else masks.get(n)
        if m is not None and tuple(m.shape) not in (tuple(w.shape), tuple(w.shape[:2])):
            raise DynsparseError(f"mask of {n} has shape {tuple(m.shape)}; a CSR conv takes one of the weight's shape "
                                 f"{tuple(w.shape)} (per weight) or of its kernels {tuple(w.shape[:2])} (per kernel): "
                                 "--sub-kernel-granularity 4 or 2")
        check_on_cpu(n, params[n].device)
        if params[n].dtype != torch.float32:
            raise DynsparseError(f"{n}: CSR convolutions hold float32 values, not {params[n].dtype}: keep the model's "
                                 "weights in float32, or use backend 'masked'")
    return blocks


def _swap_in_optimizer(optimizer: torch.optim.Optimizer | None, old: torch.Tensor, new: nn.Parameter,
                       flat: torch.Tensor) -> None:
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {k: v.reshape(-1)[flat].clone() if torch.is_tensor(v) and v.shape == old.shape else v
                                for k, v in state.items()}


def to_csr(model: nn.Module, optimizer: torch.optim.Optimizer | None,
           masks: Mapping[str, torch.Tensor]) -> dict[str, CSRParam]:
    """Store the weights named in ``masks`` (bool, shaped like the weight; a conv's may be shaped
    like its first two dims: whole kernels) as CSR, keeping their values where the mask is True:
    the modules are replaced in ``model`` and, in ``optimizer``, each dense weight by its value
    vector (its per-weight state, e.g. SGD momentum or Adam moments, cut to the active entries).
    Returns the engine's storage object per name, in ``masks`` order. See the module doc for what
    converts; anything else raises a one-line :class:`~dynsparse.errors.DynsparseError`."""
    params = dict(model.named_parameters())
    convs = wideresnet_csr_plan(model, list(masks), masks)
    arch = _architecture(model) if convs else None  # before any module changes (fc may become CSR)
    other = [n for n in masks if n not in convs and is_conv_weight(model, n)]
    if other:
        raise DynsparseError(f"to_csr stores the block convs of a WideResNet or a ResNet; {other[0]} is another conv: "
                             "leave it out")
    out: dict[str, CSRParam] = {}
    for name in masks:
        if name in convs:
            continue
        owner = _linear_owner(model, name)
        p = params.get(name)
        if owner is None or p is None:
            shape = "" if p is None else f" (shape {tuple(p.shape)})"
            raise DynsparseError(f"backend 'csr' stores nn.Linear weights and the block convs of a WideResNet or a "
                                 f"ResNet; "
                                 f"{name}{shape} is neither: use backend 'auto' to keep such tensors masked")
        check_on_cpu(name, p.device)
        if p.dtype not in CSR_DTYPES:
            raise DynsparseError(f"{name}: {dtype_message(p.dtype)}")
        parent, child, linear = owner
        module = csr_linear_from_linear(linear, masks[name])
        setattr(parent, child, module)
        if linear.bias is not None:
            module.bias = linear.bias  # the same parameter: the optimizer keeps it
        _swap_in_optimizer(optimizer, linear.weight, module.weight.values, module.weight.active_flat())
        out[name] = CSRParam(name, module.weight)
    if convs:
        assert arch is not None  # wideresnet_csr_plan found one
        out.update(_convert_network(model, optimizer, {n: masks[n] for n in convs}, params, arch[2]))
    save_pretrained_dense(model)
    return {n: out[n] for n in masks}


def _convert_network(model, optimizer, masks, params, convert) -> dict[str, CSRParam]:
    from dynsparse.sparse.storage.csr_conv import CSRConvParam, CSRKernelParam
    entry_masks, kernels = {}, set()
    for n, m in masks.items():
        w = params[n]
        if m.shape == w.shape[:2]:  # per kernel: every weight of an active kernel is stored
            kernels.add(n)
            m = m[:, :, None, None].expand(w.shape)
        elif m.shape != w.shape:
            raise DynsparseError(f"mask of {n} has shape {tuple(m.shape)}; a CSR conv takes one of the weight's shape "
                                 f"{tuple(w.shape)} or of its kernels {tuple(w.shape[:2])}")
        entry_masks[n] = m.bool()
    layers = convert(model, entry_masks)
    out: dict[str, CSRParam] = {}
    for n, layer in layers.items():
        _swap_in_optimizer(optimizer, params[n], layer.weight.values, layer.weight.active_flat())
        out[n] = (CSRKernelParam if n in kernels else CSRConvParam)(n, layer.weight)
    log.info("converted %s to CSR: %d block convs run on the batch-innermost layout", type(model).__name__, len(out))
    return out


def save_pretrained_dense(model: nn.Module) -> None:
    """A HuggingFace model with CSR layers: its ``save_pretrained`` (which ``Trainer.save_model``
    calls) writes the ordinary architecture's dense weights, which ``from_pretrained`` loads; the
    CSR ``state_dict`` (values and indices) would load as a randomly initialized model. Bound as
    a method, so that a deep copy of the model saves the copy."""
    if callable(getattr(model, "save_pretrained", None)) and "save_pretrained" not in vars(model):
        # (torch's stubs type Module.__setattr__'s value as a Tensor or Module; any value works)
        model.save_pretrained = types.MethodType(_save_pretrained_dense, model)  # type: ignore[assignment]


def _save_pretrained_dense(self: Any, *args, state_dict=None, **kwargs):
    if state_dict is None or any(k.endswith(".crow_indices") for k in state_dict):
        state_dict = dense_state_dict(self)
    return type(self).save_pretrained(self, *args, state_dict=state_dict, **kwargs)
