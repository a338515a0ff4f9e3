"""Scalar loggers beside the run's JSONL files: ``--logger csv,tensorboard,wandb``.

A logger has two methods: ``log_dict(payload, step)`` (flat or nested ``{name: number}``;
nested dicts become ``outer/inner`` tags, ``None`` and non-numbers are skipped) and ``close()``.
:func:`create_logger` builds one from names; :func:`epoch_scalars` turns an epoch row of
``metrics.jsonl`` into the scalars to log (losses, accuracies, learning rate, per-layer
densities, the DSR threshold, reallocation counts).

* ``csv``: ``RUN_DIR/scalars.csv``, one row per step, one column per tag, rewritten atomically
  each step (a resumed run keeps the rows before its first new step).
* ``tensorboard``: event files in ``RUN_DIR/tensorboard/`` (``pip install 'dynsparse[tensorboard]'``);
  a resumed run purges the events from its first new step on, a new run removes old event files.
* ``wandb``: a Weights & Biases run in ``RUN_DIR`` (``pip install 'dynsparse[wandb]'``), project
  ``$WANDB_PROJECT`` or ``dynsparse``, id kept in ``RUN_DIR/wandb_id`` so that a resumed run
  continues it; ``WANDB_MODE=offline`` works without a network.
"""
from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.outputs.atomic import atomic_write_text

LOGGER_NAMES = ("csv", "tensorboard", "wandb")


@runtime_checkable
class Logger(Protocol):
    def log_dict(self, payload: dict, step: int) -> None: ...

    def close(self) -> None: ...


def flatten(payload: Mapping, prefix: str = "") -> dict[str, float]:
    """``{"density": {"fc1.weight": 0.1}, "lr": 0.1}`` -> ``{"density/fc1.weight": 0.1, "lr": 0.1}``;
    entries that are not numbers (None, strings, lists) are left out."""
    out: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)):  # bools too, as 0/1
            out[name] = float(value)
    return out


# metrics.jsonl row key -> logged tag (accuracies and losses grouped so that dashboards pair them)
_TAGS = {"lr": "lr", "train_loss": "loss/train", "train_top1_running": "top1/train_running",
         "threshold": "dsr/threshold", "rewires": "reallocation/updates", "pruned": "reallocation/moved",
         "params_nonzero": "params/nonzero", "time_s": "time/epoch_s"}


def epoch_scalars(row: Mapping) -> dict:
    """The scalars of one epoch row of ``metrics.jsonl`` (as built in ``run._train_loop``), nested
    by kind: ``loss/{train,val,test}``, ``top1/...``, ``top5/...``, ``lr``, ``density/<layer>``,
    ``dsr/threshold``, ``reallocation/updates`` and ``reallocation/moved`` (entries pruned and
    regrown in the epoch), ``params/nonzero`` and ``time/epoch_s``."""
    out: dict = {}
    for key, value in row.items():
        if key in _TAGS:
            out[_TAGS[key]] = value
        elif key.startswith(("train_", "val_", "test_")):
            split, _, metric = key.partition("_")
            if metric in ("loss", "top1", "top5"):
                out[f"{metric}/{split}"] = value
    if isinstance(row.get("densities"), Mapping):
        out["density"] = dict(row["densities"])
    return out


class NullLogger:
    def log_dict(self, payload: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class CSVLogger:
    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        self.path = Path(run_dir) / "scalars.csv"
        self.rows: list[dict[str, str]] = []
        self.columns: list[str] = ["step"]
        if start_step > 0 and self.path.is_file():
            reader = csv.DictReader(io.StringIO(self.path.read_text()))
            self.columns = list(reader.fieldnames or ["step"])
            self.rows = [r for r in reader if int(r["step"]) < start_step]

    def log_dict(self, payload: dict, step: int) -> None:
        values = flatten(payload)
        self.columns += [k for k in values if k not in self.columns]
        self.rows = [r for r in self.rows if int(r["step"]) < step]
        self.rows.append({"step": str(step), **{k: repr(v) for k, v in values.items()}})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DynsparseError("--logger tensorboard needs the tensorboard package: "
                                 "pip install 'dynsparse[tensorboard]'") from None
        log_dir = Path(run_dir) / "tensorboard"
        if start_step == 0 and log_dir.is_dir():  # a new run: the old run's curves would mix in
            for f in log_dir.glob("events.out.tfevents.*"):
                f.unlink()
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step or None)

    def log_dict(self, payload: dict, step: int) -> None:
        for tag, value in flatten(payload).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, start_step: int = 0, config: dict | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise DynsparseError("--logger wandb needs the wandb package: pip install 'dynsparse[wandb]'") from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id"
        if start_step > 0 and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dynsparse"), dir=str(run_dir),
                              name=run_dir.name, id=run_id, resume="allow", config=config or {})

    def log_dict(self, payload: dict, step: int) -> None:
        self.run.log(flatten(payload), step=step)

    def close(self) -> None:
        self.run.finish()


class MultiLogger:
    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log_dict(self, payload: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(payload, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def parse_names(names: str | Iterable[str] | None) -> list[str]:
    """``"csv,tensorboard"`` or ``["csv", "tensorboard"]`` -> checked names, duplicates dropped."""
    if names is None:
        return []
    items = names.split(",") if isinstance(names, str) else [n for part in names for n in str(part).split(",")]
    out = []
    for name in (n.strip() for n in items):
        if not name:
            continue
        if name not in LOGGER_NAMES:
            raise unknown_choice("logger", name, LOGGER_NAMES)
        if name not in out:
            out.append(name)
    return out


def create_logger(names: str | Iterable[str] | None, run_dir: str | Path, *, start_step: int = 0,
                  config: dict | None = None) -> Logger:
    """The loggers ``names`` (see :data:`LOGGER_NAMES`) writing into ``run_dir``, as one logger.

    ``start_step`` is the first step this process will log (the start epoch of a resumed run):
    what an earlier process logged from there on is dropped. ``config`` goes to wandb's run config.
    A missing optional package raises :class:`DynsparseError` naming the extra to install."""
    chosen = parse_names(names)
    run_dir = Path(run_dir)
    loggers: list[Logger] = []
    try:
        for name in chosen:
            if name == "csv":
                loggers.append(CSVLogger(run_dir, start_step))
            elif name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir, start_step))
            else:
                loggers.append(WandbLogger(run_dir, start_step, config))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    if not loggers:
        return NullLogger()
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)
