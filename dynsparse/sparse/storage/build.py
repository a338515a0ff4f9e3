"""Where each sparse tensor lives: ``masked`` (the dense tensor and a mask: any layer, any device)
or ``csr`` (:mod:`dynsparse.sparse.layers.csr_linear`: only the active values, for linear weights and the
block convs of a WideResNet or a ResNet; memory and time proportional to the active entries; CPU only: refused
on any other device). ``auto`` picks CSR for a linear weight on CPU whose density is below the
measured crossover at the training batch size (:func:`~dynsparse.sparse.layers.csr_linear.prefer_csr`), and
for a WideResNet's or a ResNet's block convs (all or none) when each is below the crossover of its kernel size,
stride and fan-in (:func:`~dynsparse.sparse.storage.convert.prefer_csr_conv`); masked otherwise.

Building the storage draws every topology the masked storage would draw from the same generator
(all of them first), then hands the masks of the tensors to be stored as CSR to
:func:`~dynsparse.sparse.storage.convert.to_csr`, the one place where modules are swapped and the
optimizer rewritten. So the backend changes cost, not answers. Layers that are already CSR in the model
(built sparse, e.g. ``MnistMLP(sparse_density=...)``, so that no dense weight ever exists) keep
their topology.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.sparse.draws import count_for_density, keep_nonzeros_mask, nonzero_entries, random_mask
from dynsparse.sparse.layers.csr_functions import CSR_DTYPES
from dynsparse.sparse.layers.csr_linear import CSRWeight, prefer_csr
from dynsparse.sparse.storage.convert import (  # noqa: F401  (save_pretrained_dense: its former home)
    _linear_owner,
    is_conv_weight,
    prefer_csr_conv,
    save_pretrained_dense,
    to_csr,
    wideresnet_csr_plan,
)
from dynsparse.sparse.storage.csr import CSRParam, check_on_cpu
from dynsparse.sparse.storage.masked import SparseParam, effective_granularity
from dynsparse.sparse.storage.sharded import ShardedParam, full_weight, is_sharded

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


def _wants_csr(backend: str, model: nn.Module, name: str, p: torch.Tensor, density: float | None,
               batch_size: int | None) -> bool:
    """Whether ``build_params`` stores ``name`` as CSR; conv weights are decided with their whole
    network (:func:`_conv_plan`)."""
    if backend == "masked":
        return False
    if backend == "csr":
        return True  # to_csr refuses, in one line, what it cannot store
    assert batch_size is not None and density is not None  # build_params requires both for backend 'auto'
    return (_linear_owner(model, name) is not None and p.device.type == "cpu" and p.dtype in CSR_DTYPES
            and prefer_csr(density, batch_size))


def _conv_plan(backend: str, model: nn.Module, densities: Mapping[str, float | None], drawn: dict) -> set[str]:
    """The conv weights to store as CSR: with 'csr', a WideResNet's block convs (anything else is
    refused by :func:`~dynsparse.sparse.storage.convert.wideresnet_csr_plan`); with 'auto', the same
    block convs if every one is below the crossover density of its kernel size, stride and fan-in
    (:func:`~dynsparse.sparse.storage.convert.prefer_csr_conv`) and the network can be converted, else none."""
    names = [n for n in densities if n in drawn and is_conv_weight(model, n)]
    if backend == "masked" or not names:
        return set()
    masks = {n: drawn[n][0] for n in names}
    if backend == "csr":
        return set(wideresnet_csr_plan(model, names, masks))
    try:
        plan = wideresnet_csr_plan(model, names, masks)
    except DynsparseError as e:
        log.info("backend 'auto' keeps the conv weights masked: %s", e)
        return set()
    modules = dict(model.named_modules())
    for n in plan:
        conv = modules[n.rpartition(".")[0]]
        fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        if not prefer_csr_conv(drawn[n][1] / drawn[n][0].numel(), conv.kernel_size[0], conv.stride[0], fan_in):
            log.info("backend 'auto' keeps the conv weights masked: %s is above the CSR crossover density", n)
            return set()
    return set(plan)


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
    drawn: dict = {}  # every topology is drawn first, in ``densities`` order, whatever the storage
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
        drawn[name] = (mask, active, g, sharded, p)
    convs = _conv_plan(backend, model, densities, drawn)
    to_convert: dict[str, torch.Tensor] = {}
    for name, (mask, active, g, sharded, p) in drawn.items():
        if sharded:  # each rank keeps its rows of the mask (backend 'auto' keeps sharded tensors masked)
            out[name] = ShardedParam.from_full(name, named[name], g, mask, active)
        elif name in convs or (not is_conv_weight(model, name) and _wants_csr(backend, model, name, p, densities[name],
                                                                             batch_size)):
            to_convert[name] = mask
            out[name] = None  # keeps the order: filled below
        else:
            out[name] = SparseParam(name, named[name], g, mask, active)  # (p is this parameter here)
    if to_convert:
        out.update(to_csr(model, optimizer, to_convert))  # the one place where modules are swapped
    return {n: out[n] for n in densities}


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
