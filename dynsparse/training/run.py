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

Under ``torchrun`` every rank trains its shard of each batch (``--batch-size`` is the global
batch) inside DistributedDataParallel; metrics are summed over ranks, and only rank 0 prints
and writes files.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dynsparse.data import build_data, resolve_data_root
from dynsparse.errors import DynsparseError
from dynsparse.models import create_model
from dynsparse.outputs.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from dynsparse.outputs.evidence import evidence
from dynsparse.sparse.compact import pack_state
from dynsparse.sparse.kernels.conv import set_threads
from dynsparse.training import distributed, fsdp
from dynsparse.training.checkpoint import (
    CHECKPOINT_FORMAT,
    check_not_shorter,
    check_runs_dir,
    check_same_config,
    does_not_fit,
    holds_run,
    load_checkpoint,
    prepare_run_dir,
)
from dynsparse.training.config import TrainConfig
from dynsparse.training.console import epoch_header, run_header, write_failed
from dynsparse.training.engine_adapter import (
    build_penalty,
    build_sparsifier,
    direct_sparse_density,
    method_label,
    method_of,
    param_counts,
)
from dynsparse.training.epoch_schedules import load_schedules
from dynsparse.training.loggers import create_logger, epoch_scalars
from dynsparse.training.loop import Diverged, evaluate, set_lr, summarize, train_one_epoch


class _Run:
    """State of one run: the pieces and the history, with save/restore."""

    def __init__(self, cfg: TrainConfig, argv: Sequence[str] | None, echo: Callable[[str], None]):
        self.cfg = cfg
        self.dist, self.device = distributed.setup(cfg.device)
        self.echo = echo if self.dist.is_main else (lambda s: None)
        self.dir = Path(cfg.runs_dir) / cfg.run_name
        if cfg.batch_size % self.dist.world_size:
            raise DynsparseError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                                 f"{self.dist.world_size} processes")
        torch.manual_seed(cfg.seed)  # model initialization; everything later uses its own generators
        # before the evidence, which records it; numba's (the sparse conv kernels') too, which share the
        # OpenMP runtime with PyTorch: left at its default, a kernel launch would change PyTorch's count
        set_threads(cfg.threads)
        self.schedules = load_schedules(cfg.schedule_file, default_lr=cfg.lr)
        self.data = build_data(cfg.dataset_name, resolve_data_root(cfg.data),
                               batch_size=cfg.batch_size // self.dist.world_size, device=self.device,
                               validate_set=cfg.validate_set, augment=not cfg.no_augment, workers=cfg.workers,
                               seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                               image_size=cfg.image_size)
        self.model = create_model(cfg.model, num_classes=self.data.num_classes, layers=cfg.layers,
                                  widen_factor=cfg.widen_factor, batch_norm=not cfg.no_batch_norm,
                                  hidden_sizes=cfg.hidden_sizes,
                                  sparse_density=direct_sparse_density(cfg)).to(self.device)
        if cfg.sync_bn:
            self.model = distributed.sync_batch_norm(self.model, self.dist, self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.fsdp:  # before the optimizer, which must hold the sharded parameters
            fsdp.prepare(cfg, self.model, self.dist)
        if cfg.nesterov and cfg.momentum <= 0:
            raise DynsparseError("--nesterov True needs --momentum > 0; pass --nesterov False for plain SGD")
        tied = build_sparsifier(cfg, self.model, None, self.schedules) if cfg.tied else None
        # foreach (PyTorch's default on GPUs only): one call per update for all tensors instead of ~5
        # per tensor; the same element-wise arithmetic, so the same numbers; the MNIST MLP's step on
        # CPU (batch 50, one thread) took 3.1 ms against 3.7 ms (interleaved, 5 x 200 steps)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.schedules.lr(cfg.start_epoch),
                                         momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                         foreach=True)
        self.sparsifier = tied or build_sparsifier(cfg, self.model, self.optimizer, self.schedules,
                                                   steps_per_epoch=len(self.data.train))
        self.penalty = build_penalty(cfg, self.sparsifier)
        self.autocast = torch.bfloat16 if cfg.amp == "bf16" else None
        self.train_model = self.model if cfg.fsdp else distributed.wrap(self.model, self.dist, self.device)
        if cfg.compile:
            # an OptimizedModule (an nn.Module) at run time; torch's stubs type compile's result as a Callable
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]
        self.start_epoch = cfg.start_epoch
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.evidence = evidence(argv, self.device, self.dist.world_size)
        self.logger = create_logger(None, self.dir)  # the real one once the run directory is ready

    def state(self) -> dict:
        state = {"format": CHECKPOINT_FORMAT, "epoch": self.start_epoch, "config": self.cfg.to_dict(),
                 **fsdp.states(self), "history": self.history, "events": self.events}
        # sparse weights and their optimizer state by active entries only: the file follows the nonzeros
        # (under --fsdp the gathered whole tensors are saved as they are)
        return state if self.cfg.fsdp else pack_state(state, self.sparsifier)

    def restore(self, ckpt: dict, *, exact: bool) -> None:
        try:
            saved = fsdp.load_states(self, ckpt)
        except (RuntimeError, ValueError, KeyError) as e:
            raise does_not_fit(ckpt, self.cfg.to_dict(), self.model.state_dict(), e) from None
        for group in self.optimizer.param_groups:  # a checkpoint saved before foreach was set holds None
            group["foreach"] = True
        self.sparsifier.restore(saved, exact=exact)  # loaded weights and optimizer state obey the masks
        if exact:
            self.start_epoch, self.history, self.events = int(ckpt["epoch"]), [*ckpt["history"]], [*ckpt["events"]]


def _unmasked_init(cfg: dict, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights a run with configuration ``cfg`` had right after ``create_model``, before any
    mask zeroed them: rebuilt from its seed (_Run seeds the global RNG just before building the
    model and nothing in between draws from it). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))
        model = create_model(cfg["model"], num_classes=num_classes, layers=cfg["layers"],
                             widen_factor=cfg["widen_factor"], batch_norm=not cfg["no_batch_norm"],
                             hidden_sizes=tuple(cfg.get("hidden_sizes", (300, 100))))
    return {k: v.to(device) for k, v in model.state_dict().items()}


def copy_masks(run: _Run, source: str) -> None:
    """``--copy-mask-from``: take only the masks of another run (its final checkpoint), as the
    original did. The original re-sampled all weights after masking, so every active weight of the
    copied structure starts at a random-init value: here the value this run's unmasked fresh model
    had there or, with ``--resume X_initial``, X's unmasked initial value (issue 11). With
    ``--resume`` of a trained checkpoint the resumed values are kept (zero where it had no weight)."""
    if direct_sparse_density(run.cfg) is not None:
        raise DynsparseError("--copy-mask-from takes fresh values from the dense model, which a wide MLP built in CSR "
                             f"form (hidden sizes {run.cfg.hidden_sizes}) never has: not supported there")
    ckpt, path = load_checkpoint(source, run.device, run.cfg.runs_dir)
    if run.sparsifier.state_dict() is None or ckpt.get("sparsifier") is None:
        raise DynsparseError(f"--copy-mask-from needs sparse layers here and in {path} (both runs sparse)")
    values_from: dict | None = run.cfg.to_dict()
    if run.cfg.resume:
        resumed, _ = load_checkpoint(run.cfg.resume, run.device, run.cfg.runs_dir)
        values_from = resumed["config"] if int(resumed["epoch"]) == 0 and not resumed["history"] else None
    init = _unmasked_init(values_from, run.data.num_classes, run.device) if values_from is not None else {}
    run.sparsifier.restore(ckpt["sparsifier"], exact=False)  # masks the weights and the optimizer state
    if init:
        for name, sp in run.sparsifier.params.items():  # the fresh values at the copied topology
            sp.load_values(init[name])
    run.sparsifier.policy.attach(run.sparsifier.context())  # DeepR records the signs of these values
    run.echo(f"copied the masks of {path}")


def run_training(cfg: TrainConfig, *, argv: Sequence[str] | None = None,
                 echo: Callable[[str], None] = lambda s: None, debug_distributed: bool = False) -> dict:
    """Train as ``cfg`` says; returns the summary that is also written to ``summary.json``.
    ``debug_distributed`` checks after every topology update and epoch that all ranks hold the
    same masks and weights (and raises if not)."""
    if cfg.prune and not cfg.resume and not cfg.prune_from_scratch:
        raise DynsparseError("--prune prunes a trained network: pass --resume DENSE_RUN (the dense run to prune, "
                             "as the original's pruning jobs do), or --prune-from-scratch to prune while "
                             "training from random initialization")
    check_runs_dir(cfg.runs_dir)
    run = _Run(cfg, argv, echo)
    try:
        continuing = False
        if cfg.resume:
            ckpt, path = load_checkpoint(cfg.resume, run.device, cfg.runs_dir)
            continuing = path.parent.resolve() == run.dir.resolve() and path.name in ("checkpoint.pt", "initial.pt")
            if continuing:  # before anything is written: a refused resume leaves the run as it was
                check_same_config(ckpt.get("config"), cfg.to_dict(), run.dir)
                check_not_shorter(ckpt, cfg.total_epochs, run.dir)
            run.restore(ckpt, exact=continuing)
            run.echo(f"{'continuing' if continuing else 'starting from'} {path} at epoch {run.start_epoch}")
        if cfg.copy_mask_from and not continuing:
            copy_masks(run, cfg.copy_mask_from)
        if not continuing and holds_run(run.dir) and not cfg.overwrite:
            raise DynsparseError(f"{run.dir} already holds a run: pass --resume {run.dir} to continue it, "
                                 f"--overwrite to start over, or --name/--job-idx for a new run")
        distributed.barrier(run.dist)  # every rank has looked at the run directory before rank 0 changes it
        initial = None if continuing else run.state()  # every rank: under --fsdp it gathers
        if run.dist.is_main:
            prepare_run_dir(run.dir, clear=not continuing or path.name == "initial.pt",
                            keep=("initial.pt",) if continuing else ())
            # config.json first: whatever state file exists was written under this configuration
            atomic_write_json(run.dir / "config.json", {"config": cfg.to_dict(), "method": method_of(cfg),
                                                        "schedule": run.schedules.source, **run.evidence})
            if not continuing:
                atomic_torch_save(run.dir / "initial.pt", initial)
            run.logger = create_logger(cfg.logger, run.dir, start_step=run.start_epoch if continuing else 0,
                                       config=cfg.to_dict())
        if debug_distributed:
            run.sparsifier.after_update = lambda: fsdp.check_consistency(run.model, run.sparsifier, run.dist,
                                                                      f"after step {run.sparsifier.step_count}")
        summary = _train_loop(run, debug_distributed)
        if debug_distributed and run.dist.enabled:  # every rank's final state, for inspection
            atomic_torch_save(run.dir / f"debug_rank{run.dist.rank}.pt", run.state())
        distributed.barrier(run.dist)
        return summary
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM as the command line maps it: say what to resume
        # an attribute of this one exception, which typeshed cannot declare; the CLI reads it with getattr
        e.run_dir = run.dir  # type: ignore[attr-defined]
        raise
    except RuntimeError as e:
        if not (run.dist.enabled and distributed.is_comm_failure(e)):
            raise
        raise DynsparseError(f"lost another process of this job ({str(e).strip().splitlines()[0][:200]}); "
                             f"{run.dir} keeps the last finished epoch's checkpoint: --resume {run.dir}") from None
    finally:
        run.logger.close()
        distributed.cleanup(run.dist)


def _evaluate(run: _Run, loader) -> dict[str, float]:
    sums = evaluate(run.model, loader, autocast=run.autocast, channels_last=run.cfg.channels_last)
    return summarize(distributed.all_reduce_sums(sums, run.dist))


def _train_loop(run: _Run, debug_distributed: bool) -> dict:
    cfg, echo, data = run.cfg, run.echo, run.data
    for line in run_header(run, param_counts(run.model, run.sparsifier)) + epoch_header(cfg):
        echo(line)
    lines = echo if cfg.progress and not sys.stdout.isatty() else None  # logs get a line every 10%, not a bar
    for epoch in range(run.start_epoch, cfg.total_epochs):
        t0 = time.perf_counter()
        lr = run.schedules.lr(epoch)
        set_lr(run.optimizer, lr)
        run.sparsifier.set_epoch(epoch)
        data.train.set_epoch(epoch)
        try:
            sums = train_one_epoch(run.train_model, data.train, run.optimizer, run.sparsifier, penalty=run.penalty,
                                   progress=cfg.progress and run.dist.is_main, desc=f"epoch {epoch}",
                                   autocast=run.autocast, channels_last=cfg.channels_last,
                                   first_bad=lambda flags: distributed.all_reduce_min(flags, run.dist),
                                   progress_lines=lines)
        except Diverged as e:
            raise DynsparseError(f"training diverged: non-finite loss at training step "
                                 f"{epoch * len(data.train) + e.step} (step {e.step} of epoch {epoch}, counting from "
                                 f"0); lower the learning rate") from None
        train_s, sums = time.perf_counter() - t0, distributed.all_reduce_sums(sums, run.dist)
        train = summarize(sums)
        distributed.broadcast_buffers(run.model, run.dist)
        run.sparsifier.end_epoch()
        if debug_distributed:
            fsdp.check_consistency(run.model, run.sparsifier, run.dist, f"at the end of epoch {epoch}")
        events = [e.as_dict() for e in run.sparsifier.drain_events()]
        run.events.extend(events)
        if not math.isfinite(train["loss"]):
            raise DynsparseError(f"training diverged at epoch {epoch} (loss {train['loss']}); lower the learning rate")
        row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_top1_running": train["top1"]}
        if not cfg.no_validate_train:
            row.update({f"train_{k}": v for k, v in _evaluate(run, data.train_eval).items()})
        if data.val is not None:
            row.update({f"val_{k}": v for k, v in _evaluate(run, data.val).items()})
        row.update({f"test_{k}": v for k, v in _evaluate(run, data.test).items()})
        row.update(param_counts(run.model, run.sparsifier))
        metrics = run.sparsifier.metrics()
        if metrics:
            row.update({"rewires": len(events), "pruned": sum(e["pruned"] for e in events), **metrics})
        row["time_s"] = time.perf_counter() - t0
        run.history.append(row)
        run.start_epoch = epoch + 1
        state = run.state()  # every rank: under --fsdp it gathers the whole tensors
        if run.dist.is_main:
            try:
                _write_outputs(run, state)
            except DynsparseError as e:
                raise write_failed(e, epoch, run.dir) from None
            run.logger.log_dict(epoch_scalars(row), step=epoch)
        echo(f"{epoch:>5} {lr:>8.4g} {row['train_loss']:>7.4f} "
             f"{row.get('train_top1', row['train_top1_running']):>7.2f} {row['test_top1']:>7.2f} "
             f"{row['test_top5']:>7.2f} {_cell(row.get('val_top1')):>7} {row['params_nonzero']:>10,} "
             f"{row.get('rewires', 0):>7} {int(sums['count']) / train_s:>7,.0f} {row['time_s']:>6.1f}")
    summary = _summary(run)
    if run.dist.is_main:
        atomic_write_json(run.dir / "summary.json", summary)
    sel = summary["selected"]
    if sel["by"] == "validation":
        echo(f"selected by validation: epoch {sel['epoch']}, test top-1 {sel['test_top1']:.2f}% "
             f"(val {summary['best_val_top1']:.2f}%); final test top-1 {summary['test_top1']:.2f}%")
    else:
        echo(f"final test top-1 {summary['test_top1']:.2f}% (epoch {sel['epoch']})")
    echo(f"best test epoch {summary['best_epoch']}: {summary['best_test_top1']:.2f}% (oracle: chosen on the test set, "
         f"not a result{'' if sel['by'] == 'validation' else '; --validate-set selects on a held-out split'})")
    return summary


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write_outputs(run: _Run, state: dict) -> None:
    # the checkpoint first: logs never show an epoch that a resume would train again
    atomic_torch_save(run.dir / "checkpoint.pt", state)
    epoch = run.start_epoch - 1
    if epoch == run.cfg.stop_rewire_epoch:  # the original's {run}_StopRewiringPoint_{epoch} copy (issue 11)
        atomic_torch_save(run.dir / f"checkpoint_StopRewiringPoint_{epoch}.pt", state)
    atomic_write_text(run.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.history))
    if run.events:
        atomic_write_text(run.dir / "reallocations.jsonl", "".join(json.dumps(e) + "\n" for e in run.events))


def _summary(run: _Run) -> dict:
    hist = run.history
    if not hist:
        raise DynsparseError(f"no epoch was trained (start epoch {run.start_epoch} >= {run.cfg.total_epochs} epochs)")
    best = max(hist, key=lambda r: r["test_top1"])
    last = hist[-1]
    out = {"run": run.cfg.run_name, "model": run.cfg.model, "method": method_of(run.cfg),
           "label": method_label(run.cfg), "sparsity": run.cfg.nominal_sparsity(),
           "sparsity_conv": run.cfg.initial_sparsity_conv, "sparsity_fc": run.cfg.initial_sparsity_fc,
           "seed": run.cfg.seed, "epochs": len(hist), "test_top1": last["test_top1"], "test_top5": last["test_top5"],
           "best_test_top1": best["test_top1"], "best_epoch": best["epoch"], "best_test_top1_is_oracle": True,
           "selected": {"by": "last epoch", "epoch": last["epoch"], "test_top1": last["test_top1"]},
           **param_counts(run.model, run.sparsifier)}
    if "val_top1" in last:
        best_val = max(hist, key=lambda r: r["val_top1"])
        out.update({"best_val_top1": best_val["val_top1"], "best_val_epoch": best_val["epoch"],
                    "test_top1_at_best_val": best_val["test_top1"],
                    "selected": {"by": "validation", "epoch": best_val["epoch"], "test_top1": best_val["test_top1"]}})
    totals = run.sparsifier.totals()
    if totals:
        out.update({"reallocations": len(run.events), **totals})
    out.update({"evidence": run.evidence, "config": run.cfg.to_dict(), "history": hist})
    return out
