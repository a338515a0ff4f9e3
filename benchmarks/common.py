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

from dynsparse.outputs.atomic import atomic_write_text
from dynsparse.outputs.evidence import git_state

RESULTS = Path(__file__).with_name("results")


# Vector extensions that change how fast the products run (a 2x difference in the CSR ratio
# between two "2-core x86_64" machines was one with AMX and one without; issue 23).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU model, its vector extensions (from ``/proc/cpuinfo``'s flags), the cores this
    process may use, and what PyTorch dispatches to (``torch.backends.cpu.get_cpu_capability``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_cpu_capability": capability}


def evidence() -> dict:
    git = git_state()
    cuda = torch.cuda.is_available()
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git["commit"],
            "uncommitted": git["uncommitted"],
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "cpu": cpu_info(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
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
    """``<name>.json`` and ``<name>.md`` in ``directory`` (default ``benchmarks/results``), written
    atomically; the markdown names the CPU that gave the ratios."""
    directory = RESULTS if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = (payload.get("evidence") or {}).get("cpu") if isinstance(payload.get("evidence"), dict) else None
    if cpu and "CPU:" not in markdown:  # which machine gave these ratios
        markdown = markdown.rstrip("\n") + (f"\n\nCPU: {cpu['model']}; vector extensions: "
                                            f"{', '.join(cpu['vector_extensions']) or 'none found'}; PyTorch "
                                            f"dispatch: {cpu['torch_cpu_capability']}; {cpu['cores_available']} "
                                            f"cores available\n")
    atomic_write_text(directory / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(directory / f"{name}.md", markdown)
    return directory / f"{name}.json"


def median(xs: list[float]) -> float:
    return statistics.median(xs)
