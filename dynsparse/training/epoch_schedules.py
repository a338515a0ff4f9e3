"""Piecewise-constant schedules by epoch, read from the original's YAML files unchanged.

A schedule file holds up to three lists, ``lr_schedule``, ``rewire_period_schedule`` and
``DeepR_temperature_schedule``; each is a list of one-entry mappings ``{epoch: value}`` and the
value applies from that epoch on (until the next listed epoch). Lookups are pure functions of the
epoch that the caller passes in.

Path resolution: a path that exists is used as given. Otherwise, when its file name is one of the
schedules bundled with dynsparse (the original's six files, unchanged), the bundled copy is used,
so the original experiment lines (``--schedule-file ./learning_schedules/wrnet_schedule.yaml``)
run from any directory.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from dynsparse.errors import DynsparseError

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).with_name("learning_schedules")
SCHEDULE_KEYS = ("lr_schedule", "rewire_period_schedule", "DeepR_temperature_schedule")


@dataclass(frozen=True)
class PiecewiseConstant:
    """``value(epoch)`` = the value of the last breakpoint at or before ``epoch``."""

    epochs: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.epochs or len(self.epochs) != len(self.values):
            raise DynsparseError("a schedule needs at least one (epoch, value) pair")
        if list(self.epochs) != sorted(set(self.epochs)):
            raise DynsparseError(f"schedule epochs must be strictly increasing, got {list(self.epochs)}")
        if self.epochs[0] != 0:
            raise DynsparseError(f"a schedule must start at epoch 0, got first epoch {self.epochs[0]}")

    def __call__(self, epoch: int) -> float:
        return self.values[bisect.bisect_right(self.epochs, epoch) - 1]

    @classmethod
    def constant(cls, value: float) -> PiecewiseConstant:
        return cls((0,), (value,))


@dataclass(frozen=True)
class Schedules:
    lr: PiecewiseConstant
    rewire_period: PiecewiseConstant
    deepr_temperature: PiecewiseConstant
    source: str

    def rewire_period_at(self, epoch: int) -> int:
        return int(self.rewire_period(epoch))


def resolve_schedule_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    bundled = BUNDLED_DIR / p.name
    if bundled.is_file():
        log.info("schedule %s not found here; using the bundled copy %s", path, bundled)
        return bundled
    names = ", ".join(sorted(f.name for f in BUNDLED_DIR.glob("*.yaml")))
    raise DynsparseError(f"schedule file {str(path)!r} not found (bundled schedules: {names})")


def _parse_list(raw: object, key: str, source: str) -> PiecewiseConstant:
    if not isinstance(raw, list):
        raise DynsparseError(f"{source}: {key} must be a list of '- epoch : value' entries")
    epochs, values = [], []
    for entry in raw:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise DynsparseError(f"{source}: each {key} entry must be one 'epoch : value' pair, got {entry!r}")
        (epoch, value), = entry.items()
        try:
            epochs.append(int(epoch))
            values.append(float(value))
        except (TypeError, ValueError):
            raise DynsparseError(f"{source}: {key} entry {entry!r} is not 'integer epoch : number'") from None
    try:
        return PiecewiseConstant(tuple(epochs), tuple(values))
    except DynsparseError as e:
        raise DynsparseError(f"{source}: {key}: {e}") from None


def load_schedules(path: str | Path | None, *, default_lr: float = 0.1, default_rewire_period: int = 100,
                   default_temperature: float = 1e-5) -> Schedules:
    """Read a schedule file; lists it does not have are constant at the given defaults.

    ``path=None`` gives constant schedules (the learning rate is then ``default_lr``).
    """
    if path is None:
        return Schedules(PiecewiseConstant.constant(default_lr),
                         PiecewiseConstant.constant(default_rewire_period),
                         PiecewiseConstant.constant(default_temperature), source="constant")
    p = resolve_schedule_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DynsparseError(f"schedule file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not any(k in data for k in SCHEDULE_KEYS):
        raise DynsparseError(f"schedule file {p} has none of the keys {', '.join(SCHEDULE_KEYS)}")
    unknown = sorted(set(data) - set(SCHEDULE_KEYS))
    if unknown:
        raise DynsparseError(f"schedule file {p}: unknown keys {unknown}; valid keys: {', '.join(SCHEDULE_KEYS)}")
    src = str(p)

    def get(key, d):
        return _parse_list(data[key], key, src) if key in data else PiecewiseConstant.constant(d)
    sched = Schedules(get("lr_schedule", default_lr), get("rewire_period_schedule", default_rewire_period),
                      get("DeepR_temperature_schedule", default_temperature), source=src)
    for key, values in (("lr_schedule", sched.lr.values),
                        ("DeepR_temperature_schedule", sched.deepr_temperature.values)):
        bad = [v for v in values if not 0.0 <= v < float("inf")]
        if bad:
            raise DynsparseError(f"{src}: {key} values must be finite numbers >= 0, got {bad[0]}")
    if min(sched.rewire_period.values) < 1:
        raise DynsparseError(f"{src}: rewire_period_schedule values must be >= 1 iteration")
    return sched
