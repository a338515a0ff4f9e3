"""One training run: wires data, model, optimizer, sparsifier, loop, logging and checkpoints.

Run directory ``RUNS_DIR/{model}_{job_idx}`` (or ``RUNS_DIR/NAME``) holds, each written atomically:
``config.json`` (resolved configuration and evidence: command, commit, device, versions),
``metrics.jsonl`` (one line per epoch), ``reallocations.jsonl`` (one line per topology update),
``summary.json``, ``checkpoint.pt`` (everything needed to resume exactly) and ``initial.pt``
(the state before training, like the original's ``{run}_initial``).

``--resume`` with this run's own directory or checkpoint continues exactly where it stopped
(epoch, optimizer, masks, DSR threshold, random generators, history). With another run's, it
starts this run from that run's weights, optimizer state and masks (the original's behaviour,
used by the pruning jobs), at ``--start-epoch``.
"""
from __future__ import annotations

import fnmatch
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

import dynsparse
from dynsparse.config import TrainConfig
from dynsparse.data import build_data, resolve_data_root
from dynsparse.errors import DynsparseError
from dynsparse.io import atomic_torch_save, atomic_write_json, atomic_write_text
from dynsparse.models import create_model, dataset_of, layer_type, sparse_parameter_names
from dynsparse.schedule import Schedules, load_schedules
from dynsparse.sparse import DSR, SET, SNFS, DeepR, RigL, Sparsifier, Static, make_densities
from dynsparse.sparse.pruning import GradualPruning, mnist_output_layer_targets
from dynsparse.tied import TiedModel
from dynsparse.train import NullSparsifier, evaluate, set_lr, summarize, train_one_epoch

CHECKPOINT_FORMAT = "dynsparse-checkpoint-v1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DynsparseError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DynsparseError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


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
        return TiedModel(model, densities, granularity=cfg.sub_kernel_granularity, seed=cfg.seed + 1,
                         rescale_gradient=cfg.rescale_tied_gradient, l1_coeff=cfg.L1_loss_coeff,
                         group_lasso=cfg.conv_group_lasso)
    if method in ("dsr", "set", "deepr", "rigl", "snfs") and all(d == 1.0 for d in densities.values()):
        raise DynsparseError(f"{method} needs a sparse layer, but every sparse-eligible layer of {cfg.model} "
                             f"is at sparsity 0: raise --initial-sparsity-conv/--initial-sparsity-fc")
    if method in ("dense", "static") and all(d == 1.0 for d in densities.values()) and not cfg.L1_loss_coeff:
        return NullSparsifier()
    end_step = max(int(cfg.update_end * cfg.total_epochs * steps_per_epoch), 1)
    policies = {
        "rigl": lambda: RigL(fraction=cfg.drop_fraction or 0.3, end_step=end_step),
        "snfs": lambda: SNFS(fraction=cfg.drop_fraction or 0.5, end_step=end_step),
        "dsr": lambda: DSR(n_prune=cfg.n_prune_params, scaling=cfg.rewire_scaling),
        "set": lambda: SET(fraction=cfg.rewire_fraction),
        "deepr": lambda: DeepR(eta=cfg.DeepR_eta),
        "prune": lambda: GradualPruning(prune_targets(cfg, model, list(densities)), iterations=cfg.prune_iterations,
                                        start_epoch=cfg.start_pruning_after_epoch, frequency=cfg.prune_epoch_frequency,
                                        cubic=cfg.cubic_prune_schedule, global_threshold=cfg.threshold_prune),
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


def evidence(argv: Sequence[str] | None, device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"command": list(argv) if argv else None, "commit": commit, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "versions": {"dynsparse": dynsparse.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def load_checkpoint(path: str | Path, device: torch.device, runs_dir: str | Path | None = None) -> tuple[dict, Path]:
    """Read a checkpoint given as a file or as a run directory; one clear error for anything wrong.
    A path that does not exist is also looked up by its name in ``runs_dir`` (so a list's
    ``--resume runs/X`` finds X when the runs live elsewhere)."""
    p = Path(path)
    if not p.exists() and runs_dir is not None and (Path(runs_dir) / p.name).exists():
        p = Path(runs_dir) / p.name
    elif not p.exists() and runs_dir is not None and p.name.endswith("_initial") \
            and (Path(runs_dir) / p.name.removesuffix("_initial")).is_dir():
        p = Path(runs_dir) / p.name
    if p.is_dir():
        p = p / "checkpoint.pt"
    elif not p.exists() and p.with_name(p.name.removesuffix("_initial")).is_dir() and p.name.endswith("_initial"):
        p = p.with_name(p.name.removesuffix("_initial")) / "initial.pt"  # the original's runs/X_initial
    if not p.is_file():
        raise DynsparseError(f"checkpoint {str(path)!r} not found (expected a run directory with checkpoint.pt, or a .pt file)")
    try:
        ckpt = torch.load(p, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise DynsparseError(f"checkpoint {p} is corrupt or unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DynsparseError(f"{p} is not a dynsparse checkpoint")
    return ckpt, p


class _Run:
    """State of one run: the pieces and the history, with save/restore."""

    def __init__(self, cfg: TrainConfig, argv: Sequence[str] | None, echo: Callable[[str], None]):
        self.cfg, self.echo = cfg, echo
        self.device = resolve_device(cfg.device)
        self.dir = Path(cfg.runs_dir) / cfg.run_name
        torch.manual_seed(cfg.seed)  # model initialization; everything later uses its own generators
        self.schedules = load_schedules(cfg.schedule_file, default_lr=cfg.lr)
        self.data = build_data(dataset_of(cfg.model), resolve_data_root(cfg.data), batch_size=cfg.batch_size,
                               device=self.device, validate_set=cfg.validate_set, augment=not cfg.no_augment,
                               workers=cfg.workers, seed=cfg.seed)
        self.model = create_model(cfg.model, num_classes=self.data.num_classes, layers=cfg.layers,
                                  widen_factor=cfg.widen_factor, batch_norm=not cfg.no_batch_norm).to(self.device)
        if cfg.nesterov and cfg.momentum <= 0:
            raise DynsparseError("--nesterov True needs --momentum > 0; pass --nesterov False for plain SGD")
        tied = build_sparsifier(cfg, self.model, None, self.schedules) if cfg.tied else None
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.schedules.lr(cfg.start_epoch),
                                         momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.sparsifier = tied or build_sparsifier(cfg, self.model, self.optimizer, self.schedules,
                                                   steps_per_epoch=len(self.data.train))
        self.start_epoch = cfg.start_epoch
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.evidence = evidence(argv, self.device)

    def state(self) -> dict:
        sp = self.sparsifier
        return {"format": CHECKPOINT_FORMAT, "epoch": self.start_epoch, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sparsifier": sp.state_dict() if isinstance(sp, Sparsifier) else None,
                "history": self.history, "events": self.events}

    def restore(self, ckpt: dict, *, exact: bool) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DynsparseError(f"checkpoint does not fit this model/optimizer: {str(e).splitlines()[0][:300]}") from None
        if isinstance(self.sparsifier, Sparsifier) and ckpt.get("sparsifier") is not None:
            if exact:
                self.sparsifier.load_state_dict(ckpt["sparsifier"])
            else:  # another run's masks only; our own counters and generator
                state = self.sparsifier.state_dict()
                state["masks"] = ckpt["sparsifier"]["masks"]
                self.sparsifier.load_state_dict(state)
        if exact:
            self.start_epoch, self.history, self.events = int(ckpt["epoch"]), list(ckpt["history"]), list(ckpt["events"])


def copy_masks(run: "_Run", source: str) -> None:
    """``--copy-mask-from``: take only the masks of another run (its final checkpoint), as the
    original did; weights stay as they are (random init, or ``--resume``'s)."""
    ckpt, path = load_checkpoint(source, run.device, run.cfg.runs_dir)
    if not isinstance(run.sparsifier, Sparsifier) or ckpt.get("sparsifier") is None:
        raise DynsparseError(f"--copy-mask-from needs sparse layers here and in {path} (both runs sparse)")
    state = run.sparsifier.state_dict()
    state["masks"] = ckpt["sparsifier"]["masks"]
    run.sparsifier.load_state_dict(state)
    run.echo(f"copied the masks of {path}")


def run_training(cfg: TrainConfig, *, argv: Sequence[str] | None = None,
                 echo: Callable[[str], None] = lambda s: None) -> dict:
    """Train as ``cfg`` says; returns the summary that is also written to ``summary.json``."""
    run = _Run(cfg, argv, echo)
    ckpt_path = run.dir / "checkpoint.pt"
    continuing = False
    if cfg.resume:
        ckpt, path = load_checkpoint(cfg.resume, run.device, cfg.runs_dir)
        continuing = path.resolve() == ckpt_path.resolve()
        run.restore(ckpt, exact=continuing)
        echo(f"{'continuing' if continuing else 'starting from'} {path} at epoch {run.start_epoch}")
    if cfg.copy_mask_from and not continuing:
        copy_masks(run, cfg.copy_mask_from)
    if not continuing and ckpt_path.exists() and not cfg.overwrite:
        raise DynsparseError(f"{run.dir} already holds a run: pass --resume {run.dir} to continue it, "
                             f"--overwrite to start over, or --name/--job-idx for a new run")
    run.dir.mkdir(parents=True, exist_ok=True)
    if not continuing:
        for stale in ("metrics.jsonl", "reallocations.jsonl", "summary.json"):
            (run.dir / stale).unlink(missing_ok=True)
        atomic_torch_save(run.dir / "initial.pt", run.state())
    atomic_write_json(run.dir / "config.json", {"config": cfg.to_dict(), "method": cfg.method(),
                                                "schedule": run.schedules.source, **run.evidence})
    return _train_loop(run)


def _train_loop(run: _Run) -> dict:
    cfg, echo, data = run.cfg, run.echo, run.data
    counts = param_counts(run.model, run.sparsifier)
    echo(f"run {run.dir}: {cfg.model}, method {cfg.method()}, {counts['params_nonzero']:,} of "
         f"{counts['params_total']:,} parameters learnable, {data.num_train:,} training samples, device {run.device}")
    echo(f"{'epoch':>5} {'lr':>8} {'loss':>7} {'train%':>7} {'test%':>7} {'top5%':>7} {'val%':>7} {'nonzero':>10} {'rewires':>7} {'time':>6}")
    for epoch in range(run.start_epoch, cfg.total_epochs):
        t0 = time.perf_counter()
        lr = run.schedules.lr(epoch)
        set_lr(run.optimizer, lr)
        run.sparsifier.set_epoch(epoch)
        data.train.set_epoch(epoch)
        train = summarize(train_one_epoch(run.model, data.train, run.optimizer, run.sparsifier,
                                          progress=cfg.progress, desc=f"epoch {epoch}"))
        run.sparsifier.end_epoch()
        events = [e.as_dict() for e in run.sparsifier.drain_events()]
        run.events.extend(events)
        if not math.isfinite(train["loss"]):
            raise DynsparseError(f"training diverged at epoch {epoch} (loss {train['loss']}); lower the learning rate")
        row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_top1_running": train["top1"]}
        if not cfg.no_validate_train:
            row.update({f"train_{k}": v for k, v in summarize(evaluate(run.model, data.train_eval)).items()})
        if data.val is not None:
            row.update({f"val_{k}": v for k, v in summarize(evaluate(run.model, data.val)).items()})
        row.update({f"test_{k}": v for k, v in summarize(evaluate(run.model, data.test)).items()})
        row.update(param_counts(run.model, run.sparsifier))
        if isinstance(run.sparsifier, Sparsifier):
            row.update({"rewires": len(events), "pruned": sum(e["pruned"] for e in events),
                        "threshold": getattr(run.sparsifier.policy, "threshold", None),
                        "densities": run.sparsifier.densities()})
        row["time_s"] = time.perf_counter() - t0
        run.history.append(row)
        run.start_epoch = epoch + 1
        _write_outputs(run)
        echo(f"{epoch:>5} {lr:>8.4g} {row['train_loss']:>7.4f} {row.get('train_top1', row['train_top1_running']):>7.2f} "
             f"{row['test_top1']:>7.2f} {row['test_top5']:>7.2f} {row.get('val_top1', float('nan')):>7.2f} "
             f"{row['params_nonzero']:>10,} {row.get('rewires', 0):>7} {row['time_s']:>6.1f}")
    summary = _summary(run)
    atomic_write_json(run.dir / "summary.json", summary)
    echo(f"final test top-1 {summary['test_top1']:.2f}%, best {summary['best_test_top1']:.2f}% (epoch {summary['best_epoch']})")
    return summary


def _write_outputs(run: _Run) -> None:
    atomic_write_text(run.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.history))
    if run.events:
        atomic_write_text(run.dir / "reallocations.jsonl", "".join(json.dumps(e) + "\n" for e in run.events))
    atomic_torch_save(run.dir / "checkpoint.pt", run.state())


def _summary(run: _Run) -> dict:
    hist = run.history
    if not hist:
        raise DynsparseError(f"no epoch was trained (start epoch {run.start_epoch} >= {run.cfg.total_epochs} epochs)")
    best = max(hist, key=lambda r: r["test_top1"])
    last = hist[-1]
    out = {"run": run.cfg.run_name, "model": run.cfg.model, "method": run.cfg.method(),
           "label": run.cfg.method_label(), "sparsity": run.cfg.nominal_sparsity(),
           "sparsity_conv": run.cfg.initial_sparsity_conv, "sparsity_fc": run.cfg.initial_sparsity_fc,
           "seed": run.cfg.seed, "epochs": len(hist), "test_top1": last["test_top1"], "test_top5": last["test_top5"],
           "best_test_top1": best["test_top1"], "best_epoch": best["epoch"],
           **param_counts(run.model, run.sparsifier)}
    if "val_top1" in last:
        best_val = max(hist, key=lambda r: r["val_top1"])
        out.update({"best_val_top1": best_val["val_top1"], "best_val_epoch": best_val["epoch"],
                    "test_top1_at_best_val": best_val["test_top1"]})
    if isinstance(run.sparsifier, Sparsifier):
        out.update({"reallocations": len(run.events), "total_pruned": run.sparsifier.total_pruned,
                    "total_grown": run.sparsifier.total_grown})
    out.update({"evidence": run.evidence, "config": run.cfg.to_dict(), "history": hist})
    return out
