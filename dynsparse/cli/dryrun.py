"""``dynsparse train --dry-run``: what a run would do, without loading data or training.

Builds the model and the sparsifier exactly as a run does (same seed, same method table), with
the number of classes the data set is known to have, and looks for the data files without
reading them. Returns the text to print and the problem with the data, if any.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dynsparse.data import resolve_data_root
from dynsparse.data.datasets import CIFAR10_DIR, CIFAR10_FILES, MNIST_FILES
from dynsparse.data.imagefolder import count_images, default_workers, image_size, seconds_per_step, slow_cpu_warning
from dynsparse.errors import DynsparseError
from dynsparse.models import create_model
from dynsparse.training.checkpoint import holds_run
from dynsparse.training.config import TrainConfig
from dynsparse.training.engine_adapter import (
    build_sparsifier,
    direct_sparse_density,
    method_label,
    method_of,
    param_counts,
)
from dynsparse.training.epoch_schedules import BUNDLED_DIR, load_schedules

# classes and training samples of each data set, as the loaders will find them
KNOWN = {"mnist": (10, 60_000), "fashion_mnist": (10, 60_000), "cifar10": (10, 50_000), "imagenet": (1000, 1_281_167)}
_HOLDOUT = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 5_000, "imagenet": 10_000}


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DynsparseError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DynsparseError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return name


def data_problem(dataset: str, root: Path) -> str | None:
    """Why a run would not find ``dataset`` under ``root`` (None: the files are there)."""
    if dataset in ("mnist", "fashion_mnist"):
        name, sub = ("MNIST", "MNIST") if dataset == "mnist" else ("Fashion-MNIST", "FashionMNIST")
        dirs = (root / sub / "raw", root)
        if any(all((d / f"{s}.gz").is_file() or (d / s).is_file() for s in MNIST_FILES) for d in dirs):
            return None
        return (f"{name} not found in {dirs[0]} or {root} (a run would try to download it: needs a network)")
    if dataset == "cifar10":
        if any(all((d / n).is_file() for n in CIFAR10_FILES) for d in (root / CIFAR10_DIR, root)):
            return None
        return f"CIFAR-10 not found in {root / CIFAR10_DIR} or {root} (a run would try to download it: needs a network)"
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        return f"ImageFolder data not found: missing {' and '.join(m + '/' for m in missing)} in {root}"
    return None


def _num_classes(dataset: str, root: Path) -> tuple[int, str]:
    classes, _ = KNOWN[dataset]
    if dataset == "imagenet" and (root / "train").is_dir():
        found = sum(1 for d in (root / "train").iterdir() if d.is_dir())
        if found:
            return found, f"{found} classes (class folders in {root / 'train'})"
    return classes, f"{classes} classes" + (" (assumed: no class folders found)" if dataset == "imagenet" else "")


def _steps(schedule, start: int, end: int) -> str:
    """A piecewise-constant schedule over epochs [start, end): ``0.1 (epochs 0-13), 0.02 (14-17)``."""
    marks = [start] + [e for e in schedule.epochs if start < e < end]
    return ", ".join(f"{schedule(a):g} (epoch{'s' * (b - a > 1)} {a}{f'-{b - 1}' if b - a > 1 else ''})"
                     for a, b in zip(marks, marks[1:] + [max(end, start + 1)]))


def describe(cfg: TrainConfig) -> tuple[str, str | None]:
    """The dry-run summary of ``cfg`` and the data problem (None when the data is there)."""
    dataset = cfg.dataset_name
    root = resolve_data_root(cfg.data)
    device = _resolve_device(cfg.device)
    classes, classes_text = _num_classes(dataset, root)
    problem = data_problem(dataset, root)
    num_train = KNOWN[dataset][1] - (_HOLDOUT[dataset] if cfg.validate_set else 0)
    if dataset == "imagenet" and problem is None:  # ImageFolder data: its own count, not ImageNet's
        num_train = max(count_images(root) - (_HOLDOUT[dataset] if cfg.validate_set else 0), 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the model a run would start from
        model = create_model(cfg.model, num_classes=classes, layers=cfg.layers, widen_factor=cfg.widen_factor,
                             batch_norm=not cfg.no_batch_norm, hidden_sizes=cfg.hidden_sizes,
                             sparse_density=direct_sparse_density(cfg))  # wide layers: never a dense weight
        schedules = load_schedules(cfg.schedule_file, default_lr=cfg.lr)
        tied = build_sparsifier(cfg, model, None, schedules) if cfg.tied else None
        optimizer = torch.optim.SGD(model.parameters(), lr=schedules.lr(cfg.start_epoch), momentum=cfg.momentum)
        sparsifier = tied or build_sparsifier(cfg, model, optimizer, schedules,
                                              steps_per_epoch=math.ceil(num_train / cfg.batch_size))
    counts = param_counts(model, sparsifier)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    if cfg.resume:
        state = f"resumes from {cfg.resume}"
    elif holds_run(run_dir):
        state = "overwrites the run there" if cfg.overwrite else "holds a run: training would be refused " \
            "(pass --resume or --overwrite)"
    else:
        state = "new"
    lines = [
        f"method       {method_of(cfg)}" + (f" ({method_label(cfg)})" if method_label(cfg) != method_of(cfg) else ""),
        f"model        {cfg.model}: {counts['params_total']:,} parameters, {counts['params_learnable']:,} learnable "
        f"({100 * counts['params_learnable'] / max(counts['params_total'], 1):.2f}%)",
        f"data         {'ImageFolder data (train/, val/)' if dataset == 'imagenet' else dataset} in {root}: "
        + ("found" if problem is None else "MISSING") + f"; {classes_text}",
        f"device       {device}" + (f" (from --device {cfg.device})" if cfg.device != device else ""),
        f"run dir      {run_dir} ({state})",
        f"schedule     {cfg.total_epochs} epoch{'s' * (cfg.total_epochs != 1)}, batch {cfg.batch_size}, "
        f"lr {_steps(schedules.lr, cfg.start_epoch, cfg.total_epochs)}"
        + (f" (from {schedules.source}" + (", the copy bundled with dynsparse" if
                              Path(schedules.source).parent == BUNDLED_DIR else "") + ")" if cfg.schedule_file else ""),
    ]
    if dataset == "imagenet":
        size, why = image_size(root, cfg.image_size)
        lines.append(f"images       {why}; {default_workers() if cfg.workers is None else cfg.workers} loader workers")
        if device == "cpu":
            step = seconds_per_step(model, size, cfg.batch_size, classes)
            lines += [slow_cpu_warning(step, math.ceil(num_train / cfg.batch_size), cfg.total_epochs, size)
                      or f"time         about {step:.2f} s per training step on this CPU"]
    layers = getattr(sparsifier, "params", None)
    if layers:
        lines.append(f"{'sparse layer':<40} {'shape':>18} {'density':>8} {'active':>11} {'of':>11}")
        for name, sp in layers.items():
            active = sp.num_active * sp.slice_size
            lines.append(f"{name:<40} {'x'.join(map(str, sp.shape)):>18} {active / math.prod(sp.shape):>8.4f} "
                         f"{active:>11,} {math.prod(sp.shape):>11,}" + (f"  {sp.label}" if sp.label else ""))
    else:
        lines.append("sparse layers: none (dense training)" if tied is None else
                     f"tied layers: {counts['params_tied']:,} shared values")
    changed = {k: v for k, v in cfg.to_dict().items() if v != getattr(TrainConfig(), k)}
    lines.append("flags set    " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "none (all defaults)"))
    return "\n".join(lines), problem
