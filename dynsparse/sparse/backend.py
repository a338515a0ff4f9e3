"""Where each sparse tensor lives: ``masked`` (the dense tensor and a mask: any layer, any device)
or ``csr`` (:mod:`dynsparse.sparse.csr`: only the active values, for linear weights; memory and
time proportional to the active entries; CPU only: refused on any other device). ``auto`` picks
CSR for a linear weight on CPU whose density is below the measured crossover at the training
batch size (:func:`~dynsparse.sparse.csr.prefer_csr`), masked otherwise.

Building the storage draws the topology the masked storage would draw from the same generator,
then moves a CSR layer's active values out of its ``nn.Linear``: the module is replaced by a
:class:`~dynsparse.sparse.csr.CSRLinear` and, in the optimizer, the dense weight by the value
vector. So the backend changes cost, not answers. Layers that are already CSR in the model
(built sparse, e.g. ``MnistMLP(sparse_density=...)``, so that no dense weight ever exists) keep
their topology.
"""
from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.sparse.csr import CSRWeight, csr_linear_from_linear, dense_state_dict, prefer_csr
from dynsparse.sparse.csr_ops import CSR_DTYPES, dtype_message
from dynsparse.sparse.csr_param import CSRParam, check_on_cpu
from dynsparse.sparse.draws import count_for_density, keep_nonzeros_mask, nonzero_entries, random_mask
from dynsparse.sparse.masks import SparseParam, effective_granularity
from dynsparse.sparse.sharded import ShardedParam, full_weight, is_sharded

log = logging.getLogger(__name__)
BACKENDS = ("masked", "csr", "auto")


def csr_weights(model: nn.Module) -> dict[str, CSRWeight]:
    """The model's CSR weights by module name (``fc1.weight``): the sparse tensors' names."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CSRWeight)}


def check_backend(backend: str, mask_optimizer_state: bool = True) -> None:
    if backend not in BACKENDS:
        raise unknown_choice("sparse backend", backend, BACKENDS)
    if backend != "masked" and not mask_optimizer_state:
        raise DynsparseError("mask_optimizer_state=False keeps optimizer state off the mask, which CSR storage does "
                             "not hold: use backend='masked'")


def _linear_owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear] | None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr != "weight" or type(module) is not nn.Linear:
        return None
    parent_name, _, child = module_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child, module


def _wants_csr(backend: str, name: str, p: torch.Tensor, density: float, owner, batch_size: int | None) -> bool:
    if backend == "masked":
        return False
    if backend == "csr":
        check_on_cpu(name, p.device)
        if owner is None:
            raise DynsparseError(f"backend 'csr' stores nn.Linear weights only; {name} (shape {tuple(p.shape)}) is not "
                                 "one: use backend 'auto' to keep such tensors masked")
        if p.dtype not in CSR_DTYPES:
            raise DynsparseError(f"{name}: {dtype_message(p.dtype)}")
        return True
    assert batch_size is not None  # build_params requires it for backend 'auto'
    return (owner is not None and p.device.type == "cpu" and p.dtype in CSR_DTYPES
            and prefer_csr(density, batch_size))


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


def build_params(model: nn.Module, optimizer, densities: Mapping[str, float | None], *, init: str | None,
                 granularity: int, generator: torch.Generator, backend: str, batch_size: int | None = None) -> dict:
    """One storage object per sparse tensor, in ``densities`` order (the generator's draws are in
    that order, whatever the backend)."""
    check_backend(backend)
    if backend == "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        # the crossover density depends on it (csr.CROSSOVER_DENSITY): no silent guess
        raise DynsparseError(f"backend 'auto' picks CSR or masked by the training batch size (per process): pass "
                             f"batch_size= (a whole number >= 1), got {batch_size!r}")
    named = dict(model.named_parameters())
    existing = csr_weights(model)
    out: dict = {}
    for name, density in densities.items():
        if name in existing:
            out[name] = _adopt(name, existing[name], density, init)
            continue
        assert density is not None  # only existing CSR weights (adopted above) come without one
        if not 0.0 < density <= 1.0:
            raise DynsparseError(f"density of {name} must be in (0, 1] (sparsity in [0, 1)), got {density}")
        p: torch.Tensor = named[name]
        if is_sharded(p) and backend == "csr":
            raise DynsparseError(f"backend 'csr' is single-device: {name} is sharded by FSDP2 (a DTensor); use backend "
                                 f"'masked'")
        sharded, p = is_sharded(p), full_weight(p)  # masks are drawn from the whole tensor, as on one device
        g = effective_granularity(p, granularity)
        kept = None
        if init == "from_weights":
            mask = nonzero_entries(p, g)
            kept = mask, int(mask.sum())
        elif init is None:  # weights loaded before the sparsifier keep their nonzeros
            kept = keep_nonzeros_mask(nonzero_entries(p, g), density, generator)
            if kept is not None:
                log.info("%s is already sparse: its nonzero weights are kept on the mask", name)
        mask, active = kept if kept is not None else random_mask(p.shape[:g], density, generator, p.device)
        if active == 0:
            raise DynsparseError(f"{name} would keep no entry at density {density} ({mask.numel()} entries)")
        owner = _linear_owner(model, name)
        if sharded:  # each rank keeps its rows of the mask (backend 'auto' keeps sharded tensors masked)
            out[name] = ShardedParam.from_full(name, named[name], g, mask, active)
        elif _wants_csr(backend, name, p, density, owner, batch_size):
            assert owner is not None  # _wants_csr says no (or raises) without one
            parent, child, linear = owner
            module = csr_linear_from_linear(linear, mask)
            setattr(parent, child, module)
            if linear.bias is not None:
                module.bias = linear.bias  # the same parameter: the optimizer keeps it
            _swap_in_optimizer(optimizer, linear.weight, module.weight.values, module.weight.active_flat())
            out[name] = CSRParam(name, module.weight)
        else:
            out[name] = SparseParam(name, named[name], g, mask, active)  # (p is this parameter here)
    if any(sp.storage == "csr" for sp in out.values()):
        save_pretrained_dense(model)
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


def _adopt(name: str, weight: CSRWeight, density: float | None, init: str | None) -> CSRParam:
    check_on_cpu(name, weight.values.device)  # e.g. the wide MLP built in CSR form, moved to a GPU
    if (init != "from_weights" and density is not None
            and count_for_density(weight.num_entries, density) != weight.num_active):
        raise DynsparseError(f"{name} is already a CSR weight with {weight.num_active} of {weight.num_entries} entries "
                             f"(density {weight.density:.4g}); density {density} asks for "
                             f"{count_for_density(weight.num_entries, density)}")
    return CSRParam(name, weight)


def resolve_with_csr(model: nn.Module, densities, density, include, exclude, resolve) -> dict[str, float | None]:
    """``resolve`` (:func:`~dynsparse.sparse.select.resolve_densities`) for a model that may already
    hold CSR weights: those are always sparse tensors, at their own density unless the dict
    names them (which must then agree)."""
    existing = csr_weights(model)
    if not existing:
        return resolve(model, densities, density, include, exclude)
    if isinstance(densities, str):
        raise DynsparseError(f"a budget by name ({densities!r}) needs every tensor's dense shape; the model already "
                             f"holds CSR weights ({', '.join(existing)}): give densities as a number or a dict")
    if isinstance(densities, Mapping):
        rest = {n: d for n, d in densities.items() if n not in existing}
        own = {n: float(d) for n, d in densities.items() if n in existing}
        out = resolve(model, rest, density, include, exclude) if rest else {}
        return _in_model_order(model, {**out, **{n: own.get(n) for n in existing}})
    try:
        out = resolve(model, densities, density, include, exclude)
    except DynsparseError as e:
        if not str(e).startswith("no sparse parameters"):
            raise
        out = {}  # nothing but the CSR weights is selected
    return _in_model_order(model, {**out, **dict.fromkeys(existing)})


def _in_model_order(model: nn.Module, densities: dict) -> dict:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(densities.items(), key=lambda kv: order.get(kv[0].rpartition(".")[0], len(order))))
