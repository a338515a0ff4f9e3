"""Checkpoints: what a run saves to resume exactly, and reading one back with clear errors."""
from __future__ import annotations

from pathlib import Path

import torch

from dynsparse.errors import DynsparseError

CHECKPOINT_FORMAT = "dynsparse-checkpoint-v1"


def load_checkpoint(path: str | Path, device: torch.device, runs_dir: str | Path | None = None) -> tuple[dict, Path]:
    """Read a checkpoint given as a file or as a run directory; one clear error for anything wrong.
    A path that does not exist is also looked up by its name in ``runs_dir`` (so a list's
    ``--resume runs/X`` finds X when the runs live elsewhere)."""
    p = Path(path)
    if not p.exists() and runs_dir is not None and (Path(runs_dir) / p.name).exists():
        p = Path(runs_dir) / p.name
    elif not p.exists() and runs_dir is not None and p.name.endswith("_initial") \
            and (Path(runs_dir) / p.name.removesuffix("_initial")).is_dir():
        p = Path(runs_dir) / p.name
    if p.is_dir():
        p = p / "checkpoint.pt"
    elif not p.exists() and p.with_name(p.name.removesuffix("_initial")).is_dir() and p.name.endswith("_initial"):
        p = p.with_name(p.name.removesuffix("_initial")) / "initial.pt"  # the original's runs/X_initial
    if not p.is_file():
        raise DynsparseError(f"checkpoint {str(path)!r} not found (expected a run directory with checkpoint.pt, or a .pt file)")
    try:
        ckpt = torch.load(p, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise DynsparseError(f"checkpoint {p} is corrupt or unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DynsparseError(f"{p} is not a dynsparse checkpoint")
    return ckpt, p
