"""What a run prints above its epoch rows: the column heads and what each column means, so that
no number's meaning depends on a flag the reader has to remember (issue 23)."""
from __future__ import annotations

from pathlib import Path

from dynsparse.errors import DynsparseError
from dynsparse.training.config import TrainConfig
from dynsparse.training.engine_adapter import method_of

COLUMNS = ("epoch", "lr", "loss", "train%", "test%", "top5%", "val%", "nonzero", "updates", "img/s", "time")
WIDTHS = (5, 8, 7, 7, 7, 7, 7, 10, 7, 7, 6)


def run_header(run, counts: dict) -> list[str]:
    """What a run says before its first epoch: what trains on what, where the schedule comes from,
    how ImageFolder data is read, and a warning when a CPU run will take hours."""
    cfg, data = run.cfg, run.data
    lines = [f"run {run.dir}: {cfg.model}, method {method_of(cfg)}, {counts['params_learnable']:,} of "
             f"{counts['params_total']:,} parameters learnable, {data.num_train:,} training samples, device "
             f"{run.device}" + (f" x {run.dist.world_size} processes" if run.dist.enabled else "")
             + (f"; learning schedule from {run.schedules.source}" if cfg.schedule_file else "")]
    if data.note:
        lines.append(f"data: {data.note}")
    if data.image_size and run.device.type == "cpu" and run.start_epoch < cfg.total_epochs:
        from dynsparse.data.imagefolder import seconds_per_step, slow_cpu_warning
        step = seconds_per_step(run.model, data.image_size, cfg.batch_size // run.dist.world_size, data.num_classes)
        warning = slow_cpu_warning(step, len(data.train), cfg.total_epochs - run.start_epoch, data.image_size)
        lines += [warning] if warning else []
    return lines


def epoch_header(cfg: TrainConfig) -> list[str]:
    """The legend and the heads of the per-epoch table."""
    train = ("train%: accuracy on the same steps, running (--no-validate-train)" if cfg.no_validate_train else
             "train%: a full evaluation pass over the training set after the epoch")
    legend = ("columns: loss: mean training loss over the epoch's steps, as trained (the progress lines show "
              f"the mean so far); {train}; test%/top5%/val%: top-1/top-5 on the test set and top-1 on the "
              "validation split; nonzero: weights not zero; updates: topology updates (reallocations) "
              "in the epoch; time: seconds, evaluation included")
    return [legend, " ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS))]


def write_failed(e: DynsparseError, epoch: int, run_dir: Path) -> DynsparseError:
    """A run's outputs could not be written after ``epoch``: say what the directory still holds
    (before the first checkpoint, only the state before training)."""
    kept = ("keeps its last complete checkpoint" if (run_dir / "checkpoint.pt").is_file() else
            "holds no finished epoch yet, only the state before training (initial.pt), from which a resume "
            "starts over")
    return DynsparseError(f"{e}; the run stopped after training epoch {epoch}; {run_dir} {kept}: fix that, "
                          f"then --resume {run_dir}")
