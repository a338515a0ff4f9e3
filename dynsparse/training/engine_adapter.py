"""The adapter between the command line and the engine: which method a configuration selects,
the policy it builds, and what a training step of the method costs (for FLOPs).

``METHODS`` is derived from the one registry of methods (``@register_policy`` at each policy
class, ``dynsparse/sparse/policies/registry.py``), plus the command line's two methods that are
no policy (dense training and tied weights); the command line, the run, the FLOPs counter and
the report read it. The original's selector flags are one table in ``dynsparse.training.method_flags``.
The original's own quirks that the engine must not know about (the MNIST output-layer pruning
rule) live here too.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.models import layer_type, sparse_parameter_names
from dynsparse.sparse import (
    REGISTRY,
    AtEpochEnds,
    EveryStep,
    Periodic,
    Policy,
    PolicySpec,
    Sparsifier,
    Static,
    When,
    make_densities,
)
from dynsparse.training.config import TrainConfig
from dynsparse.training.dense_sparsifier import NoSparsity
from dynsparse.training.epoch_schedules import Schedules
from dynsparse.training.method_flags import (
    TAKES_UPDATE_PERIOD,
    check_options,
    load_plugins,
    selected_method,
    selectors_given,
)
from dynsparse.training.regularizers import sparsity_penalty
from dynsparse.training.tied_weights import TiedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What a method's policy may need beyond the flags."""

    cfg: TrainConfig
    schedules: Schedules
    steps_per_epoch: int
    targets: dict[str, float]  # final sparsity per tensor (prune mode)

    @property
    def end_step(self) -> int:
        return max(int(self.cfg.update_end * self.cfg.total_epochs * self.steps_per_epoch), 1)

    def periodic(self, period: int | None = None, *, end: bool = False) -> Periodic:
        """Every ``period`` steps (default ``--update-period``, else ``rewire_period_schedule``),
        until ``--update-end`` of training if ``end``, never from ``--stop-rewire-epoch`` on."""
        every: int | Callable[[int], int] = period if period is not None else (
            self.cfg.update_period if self.cfg.update_period is not None else self.schedules.rewire_period_at)
        return Periodic(every, end_step=self.end_step if end else None, stop_epoch=self.cfg.stop_rewire_epoch)


@dataclass(frozen=True)
class Method:
    name: str
    spec: PolicySpec | None  # None: dense training or tied weights
    cost: str = "sparse"  # FLOPs per step: dense | sparse | dense-grad-at-updates | dense-grad-every-step
    by_name: bool = True  # selectable with --method NAME (dense, tied and prune need their own flags)


class _Methods(Mapping[str, Method]):
    """The registry's methods in registration order (the report's order), between dense and
    tied; read at each access, so that a plugin's methods appear once it is imported."""

    def _table(self) -> dict[str, Method]:
        table = {"dense": Method("dense", None, cost="dense", by_name=False)}
        table.update((n, Method(n, s, s.cost, s.by_name)) for n, s in REGISTRY.items())
        table["tied"] = Method("tied", None, cost="dense", by_name=False)
        return table

    def __getitem__(self, name: str) -> Method:
        return self._table()[name]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


METHODS = _Methods()

# a policy's ``when`` under the command line, by its registered schedule
WHEN: dict[str, Callable[[TrainConfig, Context], When | None]] = {
    "periodic": lambda cfg, ctx: ctx.periodic(),
    "periodic-until-end": lambda cfg, ctx: ctx.periodic(end=True),
    "epoch-until-end": lambda cfg, ctx: ctx.periodic(ctx.steps_per_epoch if cfg.update_period is None
                                                     else cfg.update_period, end=True),
    "every-step": lambda cfg, ctx: EveryStep(stop_epoch=cfg.stop_rewire_epoch),
    "epoch-ends": lambda cfg, ctx: AtEpochEnds(start=cfg.start_pruning_after_epoch, every=cfg.prune_epoch_frequency,
                                               count=cfg.prune_iterations),
    "never": lambda cfg, ctx: None,
}
# constructor parameters a run supplies (a policy's ``context`` at registration)
SUPPLIED: dict[str, Callable[[Context], object]] = {"temperature": lambda ctx: ctx.schedules.deepr_temperature,
                                                    "targets": lambda ctx: ctx.targets}


def build_policy(spec: PolicySpec, cfg: TrainConfig, ctx: Context) -> Policy:
    """The registered policy with the options of ``cfg``: a flag's value (the original's, or its
    own in ``method_options``) where given, else the constructor's default."""
    given = dict(cfg.method_options)
    kwargs = {}
    for o in spec.options.values():
        value = getattr(cfg, o.field) if o.field else given.get(o.name)
        if value is not None:
            kwargs[o.name] = value
    for name in spec.context:
        if name not in SUPPLIED:
            raise DynsparseError(f"policy {spec.name}: a run supplies only {', '.join(SUPPLIED)}, not {name!r}")
        kwargs[name] = SUPPLIED[name](ctx)
    when = WHEN[spec.schedule](cfg, ctx)
    if when is not None:
        kwargs["when"] = when
    return spec.cls(**kwargs)


def _sparsities_all_zero(cfg: TrainConfig) -> bool:
    from dynsparse.models import SPARSE_LAYER_TYPES
    used = SPARSE_LAYER_TYPES.get(cfg.model, ("conv", "fc"))
    sparsities = {"conv": cfg.initial_sparsity_conv, "fc": cfg.initial_sparsity_fc}
    return all(sparsities[t] == 0 for t in used)


def method_of(cfg: TrainConfig) -> str:
    """The method a configuration selects: ``--method`` (or a registered method's own flag),
    else the first original flag in the table's order, else dense or static by the sparsities."""
    load_plugins(cfg.plugin)
    if cfg.method:
        if cfg.method not in METHODS or not METHODS[cfg.method].by_name:
            raise unknown_choice("method", cfg.method, [m.name for m in METHODS.values() if m.by_name])
        return cfg.method
    selected = selected_method(cfg)
    if selected:
        return selected
    return "dense" if _sparsities_all_zero(cfg) else "static"


def method_label(cfg: TrainConfig) -> str:
    """``method_of``, with dense runs narrower than the paper's baseline width called thin dense."""
    full_width = {"cifar10_WideResNet": 2.0, "imagenet_resnet50": 1.0}.get(cfg.model)
    method = method_of(cfg)
    if method == "dense" and full_width is not None and cfg.widen_factor < full_width:
        return "thin dense"
    return method


def check(cfg: TrainConfig) -> None:
    """Method-specific checks at parse time: one method, its options, and its policy's own
    validation of every value (built once on a stand-in context)."""
    chosen = selectors_given(cfg) + ([f"--method {cfg.method}"] if cfg.method else [])
    if len(chosen) > 1:
        raise DynsparseError(f"{' and '.join(chosen)} are different methods: pass one of them")
    method = METHODS[method_of(cfg)]
    if cfg.update_period is not None and (method.spec is None or method.spec.schedule not in TAKES_UPDATE_PERIOD):
        takes = sorted(s.name for s in REGISTRY.values() if s.schedule in TAKES_UPDATE_PERIOD)
        raise DynsparseError(f"--update-period is for {', '.join(takes)}; {method.name} takes its period from "
                             "rewire_period_schedule in --schedule-file")
    check_options(cfg, method.name)
    if method.spec is not None:
        from dynsparse.training.epoch_schedules import load_schedules
        build_policy(method.spec, cfg, Context(cfg, load_schedules(None), 1, {}))


def prune_targets(cfg: TrainConfig, model: nn.Module, names: list[str]) -> dict[str, float]:
    """Final sparsity per tensor in prune mode, with the original's mnist_mlp output-layer case."""
    fc, special = cfg.prune_target_sparsity_fc, None
    if cfg.model == "mnist_mlp" and fc > 0.9:
        fc, special = mnist_output_layer_targets(fc)
    params = dict(model.named_parameters())
    targets = {}
    for n in names:
        if layer_type(model, n) == "conv":
            targets[n] = cfg.prune_target_sparsity_conv
        else:
            targets[n] = special if special is not None and tuple(params[n].shape) == (10, 100) else fc
    return targets


def mnist_output_layer_targets(target_fc: float) -> tuple[float, float]:
    """The original's special case for ``mnist_mlp`` above 0.9 sparsity: the 10x100 output layer
    is pruned to 0.9 (keeping 100 weights) and the other two layers take up the difference, so
    the total budget is that of ``target_fc`` over all three. Returns (hidden, output) targets."""
    total = 784 * 300 + 300 * 100 + 100 * 10
    available = (1.0 - target_fc) * total - 100
    return 1.0 - available / (784 * 300 + 300 * 100), 0.9


def densities(cfg: TrainConfig, model: nn.Module) -> dict[str, float]:
    """Density per sparse tensor: the model's sparse layers minus ``--dense-layers``, spread by
    ``--budget`` (the original's per-type sparsities by default)."""
    names = sparse_parameter_names(model, sparse_resnet_downsample=cfg.sparse_resnet_downsample)
    patterns = [p.strip() for p in cfg.dense_layers.split(",") if p.strip()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise DynsparseError(f"--dense-layers {pat!r} matches no sparse layer; sparse layers: {', '.join(names)}")
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    per_type = {n: 1.0 - (cfg.initial_sparsity_conv if layer_type(model, n) == "conv" else cfg.initial_sparsity_fc)
                for n in names}
    if cfg.budget == "type":
        return per_type
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    return make_densities(cfg.budget, shapes, 1.0 - cfg.nominal_sparsity())


# Above this many entries a hidden layer of mnist_mlp is built directly in CSR form with
# --sparse-backend csr/auto (a 64 MiB dense float32 weight): never materialized, but its random
# topology is a different draw from the masked backend's. Smaller layers are built dense and
# converted, so both backends start from the same topology for a seed.
DIRECT_BUILD_ENTRIES = 1 << 24


def direct_sparse_density(cfg: TrainConfig) -> float | None:
    """The density at which ``create_model`` builds mnist_mlp's hidden layers in CSR form, or
    None to build dense (see DIRECT_BUILD_ENTRIES)."""
    sizes = (784, *cfg.hidden_sizes)
    if (cfg.model != "mnist_mlp" or cfg.sparse_backend == "masked"
            or max(a * b for a, b in zip(sizes, sizes[1:])) <= DIRECT_BUILD_ENTRIES):
        return None
    if cfg.budget != "type" or cfg.dense_layers or cfg.tied or method_of(cfg) in ("dense", "prune"):
        raise DynsparseError(f"a hidden layer of {cfg.hidden_sizes} has over {DIRECT_BUILD_ENTRIES:,} weights, so it "
                             "is built directly in CSR form at --initial-sparsity-fc: that needs --budget type, no "
                             "--dense-layers and a sparse method (not dense, prune or tied)")
    return 1.0 - cfg.initial_sparsity_fc


def build_sparsifier(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     schedules: Schedules, steps_per_epoch: int = 1):
    """The object the loop calls at every step, as the original flags ask: a Sparsifier with the
    method's policy, a TiedModel (``--tied``; call before building the optimizer, it replaces
    weights by banks), or ``NoSparsity`` for plain dense training."""
    dens = densities(cfg, model)
    method = METHODS[method_of(cfg)]
    if method.name == "tied":
        # the original passed the granularity where a bool was meant, so it always tied per weight
        granularity = cfg.sub_kernel_granularity if cfg.tied_per_kernel else 4
        return TiedModel(model, dens, granularity=granularity, seed=cfg.seed + 1,
                         rescale_gradient=cfg.rescale_tied_gradient)
    all_dense = all(d == 1.0 for d in dens.values())
    if method.name not in ("dense", "static", "prune") and all_dense:
        raise DynsparseError(f"{method.name} needs a sparse layer, but every sparse-eligible layer of {cfg.model} "
                             f"is at sparsity 0: raise --initial-sparsity-conv/--initial-sparsity-fc")
    if method.name in ("dense", "static") and all_dense and not cfg.L1_loss_coeff:
        if cfg.sparse_backend == "csr":
            raise DynsparseError("--sparse-backend csr stores sparse layers, and this run has none "
                                 "(a dense run, or every layer at sparsity 0): drop the flag")
        return NoSparsity()
    if method.name == "prune" and cfg.threshold_prune:
        log.warning("--threshold-prune has no effect with --prune (as in the original): pruning is per layer; "
                    "--global-prune prunes by a global magnitude")
    ctx = Context(cfg, schedules, steps_per_epoch, prune_targets(cfg, model, list(dens)) if method.name == "prune"
                  else {})
    policy = build_policy(method.spec, cfg, ctx) if method.spec is not None else Static()
    # attached by hooks, as in a user's own loop, so that one path is exercised everywhere (the
    # loop's explicit calls are harmless repeats); the same bits as hooks=False, every method.
    # Not under --fsdp: there the CLI's float32 DSR run with hooks took another threshold path
    # (2% more pruned over 3 epochs, unexplained; the library's float64 FSDP tests with hooks are
    # exact), so the CLI keeps the explicit calls that its FSDP tests validated
    return Sparsifier(model, optimizer, policy=policy, densities=dens, granularity=cfg.sub_kernel_granularity,
                      new_weights="initial" if cfg.big_new_weights else "zero", seed=cfg.seed + 1,
                      mask_optimizer_state=not cfg.keep_optimizer_state, hooks=not cfg.fsdp, backend=cfg.sparse_backend,
                      batch_size=cfg.batch_size)


def build_penalty(cfg: TrainConfig, sparsifier) -> Callable[[], torch.Tensor | float] | None:
    """``--L1-loss-coeff`` (or ``--conv-group-lasso``) over the sparse weights, or tied banks."""
    if not cfg.L1_loss_coeff:
        return None
    if isinstance(sparsifier, TiedModel):
        return lambda: sparsifier.penalty(cfg.L1_loss_coeff, cfg.conv_group_lasso)
    tensors = [sp.param for sp in getattr(sparsifier, "params", {}).values()]
    return lambda: sparsity_penalty(tensors, cfg.L1_loss_coeff, cfg.conv_group_lasso)


def param_counts(model: nn.Module, sparsifier) -> dict[str, int]:
    """The original's model-size report: sparse (active entries of sparse tensors, in weights),
    tied (bank entries), fixed (every other parameter, dense) and learnable (their sum, counted
    from masks), plus the total size of the model and ``params_nonzero``: the same with the
    sparse tensors' weights that are really nonzero (a connection regrown at zero by the last
    topology update is learnable but not yet nonzero); dense parameters count in full."""
    c = sparsifier.param_counts()
    # a CSR weight stores only its active values: count the dense tensor it stands for
    total = sum(p.numel() for p in model.parameters()) - c.get("stored", c["sparse_total"]) + c["sparse_total"]
    fixed = total - c["sparse_total"]
    learnable = fixed + c["sparse"] + c["tied"]
    return {"params_total": total, "params_sparse_total": c["sparse_total"], "params_sparse": c["sparse"],
            "params_tied": c["tied"], "params_fixed": fixed, "params_learnable": learnable,
            "params_nonzero": fixed + c.get("sparse_nonzero", c["sparse"]) + c["tied"]}
