"""``dynsparse sweep FILE``: run an experiment list, as the original's job lists are run.

A list is a YAML file with ``jobs:``, a list of command lines (``python main.py FLAGS``, or
``dynsparse train FLAGS``); the original list files work unchanged. A job is selected by the
value of its ``--job-idx`` flag (its position in the list when it has none): ``--job-idx N``
runs one, ``--range A:B`` those with A <= index < B, and with neither, ``SLURM_ARRAY_TASK_ID``
(when set) picks one, so a Slurm array job runs a list as it is; otherwise all run, in order.

Finished jobs (a ``summary.json`` in the run directory) are skipped. An interrupted job (a
checkpoint or initial state but no summary) resumes exactly from its own checkpoint, but only
when the configuration saved there is the job's (see :data:`dynsparse.training.checkpoint.RESUME_MAY_CHANGE`);
otherwise the job fails with the differing flags and its directory is left as it is. A job that needs another
run (``--resume``/``--copy-mask-from`` of ``./runs/X``) must come after it in the list. Flags
given after ``--`` are appended to every line (so they win), e.g. ``-- --data DIR --epochs 1``.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dynsparse.cli.flags import parse_train_args
from dynsparse.errors import DynsparseError
from dynsparse.outputs.atomic import read_yaml
from dynsparse.training.checkpoint import ConfigMismatch, check_same_config, load_checkpoint
from dynsparse.training.config import TrainConfig

PREFIXES = (["python", "main.py"], ["python3", "main.py"], ["dynsparse", "train"], ["main.py"])


@dataclass(frozen=True)
class Job:
    index: int
    line: str
    argv: tuple[str, ...]


def load_jobs(path: str | Path) -> list[Job]:
    p = Path(path)
    data = read_yaml(p, "experiment list")
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise DynsparseError(f"experiment list {p} must have a 'jobs:' list of command lines")
    jobs, seen = [], set()
    for pos, line in enumerate(data["jobs"]):
        if not isinstance(line, str):
            raise DynsparseError(f"{p}: job {pos} is not a command line: {line!r}")
        argv = shlex.split(line)
        for prefix in PREFIXES:
            if argv[:len(prefix)] == prefix:
                argv = argv[len(prefix):]
                break
        else:
            raise DynsparseError(f"{p}: job {pos} does not start with 'python main.py' or 'dynsparse train': {line!r}")
        index = int(argv[argv.index("--job-idx") + 1]) if "--job-idx" in argv else pos
        if index in seen:
            raise DynsparseError(f"{p}: two jobs have index {index}")
        seen.add(index)
        jobs.append(Job(index, line, tuple(argv)))
    return jobs


def select(jobs: list[Job], job_idx: int | None = None, index_range: str | None = None,
           environ: Mapping[str, str] | None = None) -> list[Job]:
    environ = os.environ if environ is None else environ
    valid = ", ".join(str(j.index) for j in jobs[:20]) + (" ..." if len(jobs) > 20 else "")
    if job_idx is None and index_range is None and environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        try:
            job_idx = int(environ["SLURM_ARRAY_TASK_ID"])
        except ValueError:
            raise DynsparseError(f"SLURM_ARRAY_TASK_ID={environ['SLURM_ARRAY_TASK_ID']!r} is not an integer") from None
    if job_idx is not None:
        chosen = [j for j in jobs if j.index == job_idx]
        if not chosen:
            raise DynsparseError(f"no job with index {job_idx}; the list has {valid}")
        return chosen
    if index_range is not None:
        try:
            lo, hi = (int(v) if v else None for v in index_range.split(":"))
        except ValueError:
            raise DynsparseError(f"--range must be A:B (A <= index < B), got {index_range!r}") from None
        return [j for j in jobs if (lo is None or j.index >= lo) and (hi is None or j.index < hi)]
    return list(jobs)


def job_config(job: Job, extra: Sequence[str]) -> TrainConfig:
    cfg, _ = parse_train_args([*job.argv, *extra], one_line_errors=True)  # errors: one line; the caller names the job
    return cfg


def saved_config_differs(cfg: TrainConfig) -> str | None:
    """Why the interrupted run of ``cfg`` must not be resumed under ``cfg`` (None: it may). An
    unreadable checkpoint is left for the resume itself to report."""
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    try:
        ckpt, _ = load_checkpoint(run_dir, torch.device("cpu"))
        check_same_config(ckpt.get("config"), cfg.to_dict(), run_dir)
    except ConfigMismatch as e:
        return str(e)
    except DynsparseError:
        return None
    return None


def status(cfg: TrainConfig) -> str:
    run = Path(cfg.runs_dir) / cfg.run_name
    if (run / "summary.json").is_file():
        return "finished"
    if (run / "checkpoint.pt").is_file() or (run / "initial.pt").is_file():
        return "interrupted"
    return "new"


def command_line(job: Job, extra: Sequence[str], resume: str | None = None) -> str:
    """The job as it runs: its own flags, the sweep's extra flags (which win), and the resume."""
    return shlex.join(["dynsparse", "train", *job.argv, *extra, *(["--resume", resume] if resume else [])])


def run_sweep(path: str | Path, *, job_idx: int | None = None, index_range: str | None = None,
              extra: Sequence[str] = (), dry_run: bool = False, echo: Callable[[str], None] = print,
              train: Callable[[TrainConfig, list[str]], dict] | None = None) -> dict[int, str]:
    """Run the selected jobs; returns {job index: finished | skipped | resumed | failed: reason}
    (with ``dry_run``: would run | would resume | skipped | failed: reason, and each job's
    command line and status is echoed)."""
    if train is None:
        from dynsparse.training.run import run_training

        def train(cfg, argv):
            return run_training(cfg, argv=["dynsparse", "train", *argv], echo=echo)
    outcome: dict[int, str] = {}
    selected = select(load_jobs(path), job_idx, index_range)
    for job in selected:
        try:
            cfg = job_config(job, extra)
        except DynsparseError as e:
            outcome[job.index] = f"failed: {e}"
            echo(f"job {job.index}: {e}")
            continue
        state = status(cfg)
        refused = saved_config_differs(cfg) if state == "interrupted" else None
        echo(f"job {job.index} ({cfg.run_name}): {'differs' if refused else state}")
        if state == "finished":
            outcome[job.index] = "skipped"
            continue
        if refused:  # never continue a run under another job's labels; leave it untouched
            outcome[job.index] = f"failed: {refused}"
            echo(f"job {job.index} failed: {refused}")
            continue
        if state == "interrupted":
            cfg = dataclasses.replace(cfg, resume=str(Path(cfg.runs_dir) / cfg.run_name))
        if dry_run:
            echo("  " + command_line(job, extra, cfg.resume if state == "interrupted" else None))
            outcome[job.index] = "would resume" if state == "interrupted" else "would run"
            continue
        try:
            train(cfg, [*job.argv, *extra])
            outcome[job.index] = "resumed" if state == "interrupted" else "finished"
        except DynsparseError as e:
            outcome[job.index] = f"failed: {e}"
            echo(f"job {job.index} failed: {e}")
    return outcome


def outcome_summary(outcome: dict[int, str], dry_run: bool = False) -> str:
    """``sweep: 5 jobs: 2 ran, 1 resumed, 1 skipped (finished before), 1 failed``, then one line per failure."""
    kinds = (("would run", "would run"), ("would resume", "would resume")) if dry_run else \
        (("ran", "finished"), ("resumed", "resumed"))
    counts = [f"{sum(v == value for v in outcome.values())} {label}" for label, value in kinds]
    counts.append(f"{sum(v == 'skipped' for v in outcome.values())} skipped (finished before)")
    failed = {k: v for k, v in outcome.items() if v.startswith("failed")}
    counts.append(f"{len(failed)} failed")
    return (f"sweep: {len(outcome)} job{'s' * (len(outcome) != 1)}: " + ", ".join(counts)
            + "".join(f"\n  job {k}: {v}" for k, v in failed.items()))
