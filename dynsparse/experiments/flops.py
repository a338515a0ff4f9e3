"""Training FLOPs of each method, counted as in the RigL paper (Evci et al. 2020, appendix H).

A multiply-add counts as 2 FLOPs; only conv and linear layers are counted. With ``f_D`` the dense
forward cost per sample and ``f_S`` the sparse one (each sparse layer's cost times its density),
a training step costs (per sample):

* cost ``dense`` (dense, tied): ``3 f_D`` (forward, and backward for activations and weights);
* ``sparse`` (static, SET, DSR, DeepR, pruning): ``3 f_S``, with ``f_S`` following the per-layer
  densities epoch by epoch (DSR moves parameters, pruning shrinks them);
* ``dense-grad-at-updates`` (RigL): ``(3 f_S dT + 2 f_S + f_D) / (dT + 1)`` while the topology
  is updated (the dense gradient only at update steps), ``3 f_S`` after;
* ``dense-grad-every-step`` (SNFS): ``2 f_S + f_D`` (its momentum needs the dense gradient every step).

A method's cost kind is its registered ``cost`` (``@register_policy``, via
:data:`dynsparse.training.engine_adapter.METHODS`).

``multiplier`` is the whole run's cost divided by dense training's over the same epochs; the
dense training before pruning is not included.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from dynsparse.errors import unknown_choice
from dynsparse.models import create_model, dataset_of
from dynsparse.training.engine_adapter import METHODS

INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "imagenet": (3, 224, 224)}


def layer_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Dense forward FLOPs per sample of every conv/linear weight, by parameter name (meta tensors)."""
    flops: dict[str, int] = {}
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def hook(module, inputs, output):
        prefix = names[id(module)]
        key = f"{prefix}.weight" if prefix else "weight"
        w = module.weight
        if isinstance(module, nn.Linear):
            flops[key] = 2 * w.shape[0] * w.shape[1]
        else:
            flops[key] = 2 * w[0].numel() * output.shape[1] * output[0, 0].numel()

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return flops


def model_layer_flops(config: dict, num_classes: int = 10) -> dict[str, int]:
    with torch.device("meta"):
        model = create_model(config["model"], num_classes=num_classes, layers=config.get("layers", 28),
                             widen_factor=config.get("widen_factor", 10.0),
                             batch_norm=not config.get("no_batch_norm", False),
                             hidden_sizes=tuple(config.get("hidden_sizes", (300, 100))))
    model.eval()
    return layer_flops(model, INPUT_SHAPES[dataset_of(config["model"])])


def training_multiplier(method: str, flops: dict[str, int], densities_per_epoch: list[dict[str, float]],
                        *, period: int = 100, update_end: float = 0.75) -> float:
    """The run's training FLOPs relative to dense training (see the module docstring)."""
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    cost_kind = METHODS[method].cost
    dense = sum(flops.values())
    if cost_kind == "dense" or not densities_per_epoch:
        return 1.0
    epochs = len(densities_per_epoch)
    costs = []
    for e, dens in enumerate(densities_per_epoch):
        f_s = dense - sum(flops[n] * (1 - d) for n, d in dens.items() if n in flops)
        if cost_kind == "dense-grad-at-updates":
            cost = (3 * f_s * period + 2 * f_s + dense) / (period + 1) if e < update_end * epochs else 3 * f_s
        elif cost_kind == "dense-grad-every-step":
            cost = 2 * f_s + dense if e < update_end * epochs else 3 * f_s
        else:
            cost = 3 * f_s
        costs.append(cost)
    return statistics.fmean(costs) / (3 * dense)
