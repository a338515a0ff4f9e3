"""From a run's configuration to the object the training loop calls at every step, and the
model-size report. This is the one place that turns the original's method flags into a policy.

* :func:`build_sparsifier`: a :class:`~dynsparse.sparse.Sparsifier` with the method's policy and
  budget, a :class:`~dynsparse.tied.TiedModel` for ``--tied``, or a ``NullSparsifier`` for
  plain dense training;
* :func:`param_counts`: sparse, tied, fixed and learnable parameter counts (the original's
  ``get_model_size``), counted from masks, never from weight values.
"""
from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from dynsparse.config import TrainConfig
from dynsparse.errors import DynsparseError
from dynsparse.models import layer_type, sparse_parameter_names
from dynsparse.schedule import Schedules
from dynsparse.sparse import DSR, SET, SNFS, DeepR, RigL, Sparsifier, Static, make_densities
from dynsparse.sparse.pruning import GradualPruning, mnist_output_layer_targets
from dynsparse.tied import TiedModel
from dynsparse.train import NullSparsifier

log = logging.getLogger(__name__)


def _densities(cfg: TrainConfig, model: nn.Module) -> dict[str, float]:
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


def prune_targets(cfg: TrainConfig, model: nn.Module, names: list[str]) -> dict[str, float]:
    """Final sparsity per tensor in prune mode, with the original's mnist_mlp output-layer case."""
    fc, special = cfg.prune_target_sparsity_fc, None
    if cfg.model == "mnist_mlp" and fc > 0.9:
        fc, special = mnist_output_layer_targets(fc)
    targets = {}
    for n in names:
        if layer_type(model, n) == "conv":
            targets[n] = cfg.prune_target_sparsity_conv
        else:
            shape = tuple(dict(model.named_parameters())[n].shape)
            targets[n] = special if special is not None and shape == (10, 100) else fc
    return targets


def build_sparsifier(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     schedules: Schedules, steps_per_epoch: int = 1):
    """The object the loop calls at every step, as the original flags ask: a Sparsifier with the
    method's policy, a TiedModel (``--tied``; call before building the optimizer, it replaces
    weights by banks), or NullSparsifier for plain dense training."""
    densities = _densities(cfg, model)
    method = cfg.method()
    if method == "tied":
        # the original passed the granularity where a bool was meant, so it always tied per weight
        granularity = cfg.sub_kernel_granularity if cfg.tied_per_kernel else 4
        return TiedModel(model, densities, granularity=granularity, seed=cfg.seed + 1,
                         rescale_gradient=cfg.rescale_tied_gradient, l1_coeff=cfg.L1_loss_coeff,
                         group_lasso=cfg.conv_group_lasso)
    if method in ("dsr", "set", "deepr", "rigl", "snfs") and all(d == 1.0 for d in densities.values()):
        raise DynsparseError(f"{method} needs a sparse layer, but every sparse-eligible layer of {cfg.model} "
                             f"is at sparsity 0: raise --initial-sparsity-conv/--initial-sparsity-fc")
    if method in ("dense", "static") and all(d == 1.0 for d in densities.values()) and not cfg.L1_loss_coeff:
        return NullSparsifier()
    if method == "prune" and cfg.threshold_prune:
        log.warning("--threshold-prune has no effect with --prune (as in the original): pruning is per layer; "
                    "--global-prune prunes by a global magnitude")
    end_step = max(int(cfg.update_end * cfg.total_epochs * steps_per_epoch), 1)
    policies = {
        "rigl": lambda: RigL(fraction=cfg.drop_fraction or 0.3, end_step=end_step, period=cfg.update_period),
        # Dettmers & Zettlemoyer update once per epoch (their prune rate 0.5 is per epoch)
        "snfs": lambda: SNFS(fraction=cfg.drop_fraction or 0.5, end_step=end_step,
                             period=cfg.update_period or steps_per_epoch),
        "dsr": lambda: DSR(n_prune=cfg.n_prune_params, scaling=cfg.rewire_scaling),
        "set": lambda: SET(fraction=cfg.rewire_fraction, scaling=cfg.rewire_scaling),
        "deepr": lambda: DeepR(eta=cfg.DeepR_eta),
        "prune": lambda: GradualPruning(prune_targets(cfg, model, list(densities)), iterations=cfg.prune_iterations,
                                        start_epoch=cfg.start_pruning_after_epoch, frequency=cfg.prune_epoch_frequency,
                                        cubic=cfg.cubic_prune_schedule, global_threshold=cfg.global_prune),
    }
    return Sparsifier(model, optimizer, policy=policies.get(method, Static)(), densities=densities,
                      granularity=cfg.sub_kernel_granularity,
                      new_weights="initial" if cfg.big_new_weights else "zero", seed=cfg.seed + 1,
                      period=schedules.rewire_period_at, temperature=schedules.deepr_temperature,
                      stop_epoch=None if method == "prune" else cfg.stop_rewire_epoch,
                      l1_coeff=cfg.L1_loss_coeff, group_lasso=cfg.conv_group_lasso,
                      mask_optimizer_state=not cfg.keep_optimizer_state)


def param_counts(model: nn.Module, sparsifier) -> dict[str, int]:
    """The original's model-size report: sparse (active entries of sparse tensors, in weights),
    tied (bank entries), fixed (every other parameter, dense) and learnable (their sum), plus the
    total size of the model and ``params_nonzero`` (= learnable, counted from masks, not values)."""
    total = sum(p.numel() for p in model.parameters())
    sparse = tied = sparse_total = 0
    if isinstance(sparsifier, Sparsifier):
        sparse, sparse_total = sparsifier.num_active_weights(), sparsifier.num_sparse_weights()
    elif isinstance(sparsifier, TiedModel):
        tied = sparse_total = sparsifier.num_tied()
    fixed = total - sparse_total
    return {"params_total": total, "params_sparse_total": sparse_total, "params_sparse": sparse,
            "params_tied": tied, "params_fixed": fixed, "params_learnable": fixed + sparse + tied,
            "params_nonzero": fixed + sparse + tied}
