"""The evidence recorded with every result: command, commit (and uncommitted changes), device,
world size, threads, library versions and time."""
from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import dynsparse


def git_state() -> dict:
    """The checkout's commit and its uncommitted changes to tracked files (None outside git), so
    that a result made from a modified tree says so."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None
    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "uncommitted": None if status is None else [line[3:] for line in status.splitlines()]}


def evidence(argv: Sequence[str] | None, device: torch.device, world_size: int) -> dict:
    git = git_state()
    return {"command": list(argv) if argv else None, "commit": git["commit"], "uncommitted": git["uncommitted"],
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "world_size": world_size, "threads": torch.get_num_threads(),
            "versions": {"dynsparse": dynsparse.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
