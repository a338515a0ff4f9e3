"""The training loop: plain functions that read top to bottom.

Nothing here imports the sparsity code. The loop calls a *sparsifier* (any object with
``before_optimizer_step()`` and ``step()``, see :mod:`dynsparse.training.dense_sparsifier`; ``None`` for dense
training) at the two visible points of every step, and adds an optional ``penalty()`` to the loss.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sized

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dynsparse.training.dense_sparsifier import NoSparsity


class Diverged(Exception):
    """A non-finite training loss at ``step`` (counted from 0 within the epoch)."""

    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


# Steps between divergence checks: each check waits for the device once, so checking every
# step would serialize the host and the device; this finds a NaN within a few steps.
CHECK_EVERY = 8


def _first_nonfinite(losses: list[torch.Tensor], first_step: int, reduce_min) -> None:
    bad = ~torch.isfinite(torch.stack(losses))
    positions = torch.arange(first_step, first_step + len(losses), device=bad.device)
    first = torch.where(bad, positions, torch.full_like(positions, torch.iinfo(torch.long).max)).min()
    if reduce_min is not None:
        first = reduce_min(first)  # every rank stops at the same check, or none does
    if int(first) != torch.iinfo(torch.long).max:
        raise Diverged(int(first))



def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets[:, None])
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


def _precision(device: torch.device, autocast: torch.dtype | None):
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast)


def _prepare(inputs: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last and inputs.dim() == 4 else inputs


class _Meter:
    """Loss, accuracy, throughput and ETA within an epoch, for the bar (every second or so) and
    for ``lines`` (every ``every`` of the epoch). The running sums live on the device: they are
    read (one host sync) only when something is shown, never every step."""

    def __init__(self, bar, lines: Callable[[str], None] | None, desc: str, total: int | None, every: float):
        self.bar, self.lines, self.desc, self.total = bar, lines, desc, total
        self.start = self.last_postfix = time.perf_counter()
        self.samples = 0  # host-side: batch sizes are known without a sync
        self.marks = set()
        if lines is not None and total:
            self.marks = {math.ceil(total * k * every) for k in range(1, math.ceil(1 / every))} - {0, total}

    def update(self, step: int, batch: int, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        self.samples += batch
        now = time.perf_counter()
        at_mark = step + 1 in self.marks
        show_bar = not self.bar.disable and now - self.last_postfix >= 1.0
        if not (at_mark or show_bar):
            return
        loss, acc = float(loss_sum) / self.samples, 100.0 * float(correct) / self.samples
        rate = self.samples / max(now - self.start, 1e-9)
        if show_bar:
            self.last_postfix = now
            self.bar.set_postfix_str(f"mean loss {loss:.4f} acc {acc:.2f}% {rate:,.0f} samples/s", refresh=False)
        if at_mark and self.lines is not None and self.total:  # marks exist only then
            eta = (now - self.start) / (step + 1) * (self.total - step - 1)
            self.lines(f"{self.desc}: {100 * (step + 1) / self.total:3.0f}% ({step + 1}/{self.total} steps) "
                       f"mean so far: loss {loss:.4f} acc {acc:.2f}% {rate:,.0f} samples/s ETA "
                       f"{int(eta) // 60}:{int(eta) % 60:02d}")


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, sparsifier=None,
                    *, penalty: Callable[[], torch.Tensor | float] | None = None, progress: bool = False,
                    desc: str = "train", autocast: torch.dtype | None = None,
                    channels_last: bool = False, first_bad=None, progress_lines: Callable[[str], None] | None = None,
                    lines_every: float = 0.1) -> dict[str, torch.Tensor]:
    """One pass over ``batches``; returns on-device sums (loss, correct top-1, samples) so that
    no step waits on the host and the caller can all-reduce them exactly. ``autocast`` (e.g.
    ``torch.bfloat16``) runs the forward pass in mixed precision; weights stay float32.
    ``penalty()`` (e.g. L1) is added to the loss that is differentiated, not to the one reported.
    Raises :class:`Diverged` within :data:`CHECK_EVERY` steps of a non-finite loss; under
    several processes ``first_bad`` (a min all-reduce of a tensor) makes all ranks agree.
    ``progress`` shows a bar (on a terminal) with loss, accuracy and throughput;
    ``progress_lines`` receives a line with those and the ETA every ``lines_every`` of the epoch
    (for logs, where a bar shows nothing)."""
    sparsifier = sparsifier if sparsifier is not None else NoSparsity()
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    window: list[torch.Tensor] = []
    step = 0
    total: int | None = None
    try:
        total = len(batches) if isinstance(batches, Sized) else None
    except TypeError:  # a DataLoader over an IterableDataset has __len__, which raises
        pass
    bar = tqdm(batches, desc=desc, leave=False, disable=None if progress else True, mininterval=0.5, total=total)
    meter = _Meter(bar, progress_lines, desc, total, lines_every)
    for step, (inputs, targets) in enumerate(bar):
        if len(window) == CHECK_EVERY:
            _first_nonfinite(window, step - CHECK_EVERY, first_bad)
            window = []
        with _precision(device, autocast):
            logits = model(_prepare(inputs, channels_last))
            loss = F.cross_entropy(logits.float(), targets)
        window.append(loss.detach())
        objective = loss + penalty() if penalty is not None else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        with torch.no_grad():
            loss_sum += loss.detach() * targets.shape[0]
            correct += (logits.argmax(1) == targets).sum()
            seen += targets.shape[0]
        meter.update(step, targets.shape[0], loss_sum, correct)
    if window:
        _first_nonfinite(window, step + 1 - len(window), first_bad)
    return {"loss_sum": loss_sum, "correct1": correct, "count": seen}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, progress: bool = False, desc: str = "eval",
             autocast: torch.dtype | None = None, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Sums of loss, top-1 and top-5 hits and samples over ``batches`` (on-device)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    c1 = torch.zeros((), device=device, dtype=torch.long)
    c5 = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    for inputs, targets in tqdm(batches, desc=desc, leave=False, disable=None if progress else True, mininterval=0.5):
        with _precision(device, autocast):
            logits = model(_prepare(inputs, channels_last)).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        h1, h5 = _topk_correct(logits, targets, (1, 5))
        c1 += h1
        c5 += h5
        seen += targets.shape[0]
    return {"loss_sum": loss_sum, "correct1": c1, "correct5": c5, "count": seen}


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn summed counts into mean loss and percentages."""
    n = max(int(sums["count"]), 1)
    out = {"loss": float(sums["loss_sum"]) / n, "top1": 100.0 * float(sums["correct1"]) / n}
    if "correct5" in sums:
        out["top5"] = 100.0 * float(sums["correct5"]) / n
    return out
