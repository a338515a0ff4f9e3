"""Shared pieces of the benchmarks: timing, evidence and result files (JSON + markdown)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dynsparse.evidence import git_state
from dynsparse.io import atomic_write_text

RESULTS = Path(__file__).with_name("results")


def evidence() -> dict:
    git = git_state()
    cuda = torch.cuda.is_available()
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git["commit"],
            "uncommitted": git["uncommitted"],
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # what else ran on the machine, when the measurement could not have it alone
            "note": os.environ.get("DYNSPARSE_BENCH_NOTE", "")}


def timed(fn, sync: bool = False) -> float:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(cases: dict, repeats: int, sync: bool = False) -> dict[str, list[float]]:
    """Run every case ``repeats`` times, interleaved (a, b, c, a, b, c, ...), so that slow phases
    of a shared machine hit every case alike; returns all times per case."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn, sync))
    return times


def write_results(name: str, payload: dict, markdown: str, directory: Path | None = None) -> Path:
    """``<name>.json`` and ``<name>.md`` in ``directory`` (default ``benchmarks/results``)."""
    directory = RESULTS if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(directory / f"{name}.md", markdown)
    return directory / f"{name}.json"


def median(xs: list[float]) -> float:
    return statistics.median(xs)
