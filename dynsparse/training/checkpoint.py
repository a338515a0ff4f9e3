"""Checkpoints: what a run saves to resume exactly, and reading one back with clear errors.

Also the resume rule: a run continued from its own directory must have the configuration it was
started with, except for the fields in :data:`RESUME_MAY_CHANGE`, which cannot change what is
trained (``--epochs`` extends or shortens the run; the others say where files are, how the work
is spread or displayed, or how a tensor is laid out in memory).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.compact import unpack_state

# v2: sparse tensors may be stored by their active entries (dynsparse.sparse.compact); v1 files still load
CHECKPOINT_FORMAT = "dynsparse-checkpoint-v2"
READABLE_FORMATS = ("dynsparse-checkpoint-v1", CHECKPOINT_FORMAT)

RESUME_MAY_CHANGE = frozenset({
    "epochs", "start_epoch", "resume", "overwrite", "progress", "print_freq", "data", "runs_dir", "workers",
    "name", "job_idx", "device", "compile", "channels_last", "logger", "threads",
})


# files a run writes into its directory; --overwrite removes all of them before writing anything
OUTPUT_PATTERNS = ("*.pt", "*.jsonl", "summary.json", "config.json", ".*.tmp")


def _flag(field: str) -> str:
    special = {"DeepR": "--DeepR", "DeepR_eta": "--DeepR_eta", "L1_loss_coeff": "--L1-loss-coeff",
               "progress": "--no-progress"}
    return special.get(field) or "--" + field.replace("_", "-")


def config_differences(saved: dict, new: dict) -> list[str]:
    """``--flag saved -> new`` for every field that differs and may not change on resume. A field
    the saved configuration lacks (a run from before the field existed) counts as its default."""
    from dynsparse.training.config import TrainConfig
    defaults = TrainConfig().to_dict()
    out = []
    for key in sorted(set(saved) | set(new)):
        old, now = saved.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if key not in RESUME_MAY_CHANGE and old != now and not (key == "schedule_file" and _same_file(old, now)):
            out.append(f"{_flag(key)} {old!r} -> {now!r}")
    return out


def _same_file(old, now) -> bool:
    """Two schedule paths that name the same file: a run saved the name it was given
    (``mnist_schedule.yaml``), a newer one the bundled copy that name resolved to."""
    from dynsparse.training.epoch_schedules import resolve_schedule_path
    if not old or not now:
        return False
    try:
        return resolve_schedule_path(old).resolve() == resolve_schedule_path(now).resolve()
    except DynsparseError:
        return False


class ConfigMismatch(DynsparseError):
    """A run may not continue under the configuration given."""


def check_same_config(saved: dict | None, new: dict, where: Path) -> None:
    """Refuse to continue the run in ``where`` under a configuration that changes its result."""
    if not isinstance(saved, dict):
        raise ConfigMismatch(f"{where} records no configuration, so it cannot be continued safely; "
                             f"start over with --overwrite")
    diff = config_differences(saved, new)
    if diff:
        raise ConfigMismatch(f"cannot continue {where} with a different configuration (saved -> now): "
                             f"{'; '.join(diff)}. Use the run's own flags, or --overwrite or a new --name to "
                             f"start a new run (only {', '.join(sorted(_flag(k) for k in RESUME_MAY_CHANGE))} "
                             f"may change on resume)")


def check_not_shorter(ckpt: dict, total_epochs: int, where: Path) -> None:
    """Refuse to continue a run with fewer epochs than it has trained: that would rewrite its
    configuration to a length its history contradicts (issue 23)."""
    done = int(ckpt.get("epoch", 0))
    if done > total_epochs:
        raise ConfigMismatch(f"{where} already has {done} trained epochs; --epochs {total_epochs} would shorten it. "
                             f"Pass --epochs {done} or more to continue it, or --overwrite or a new --name for a "
                             f"shorter run; nothing was changed")


def describe_mismatch(saved: dict, here: dict) -> str:
    """What does not fit between two state dicts: missing and extra entries, different shapes."""
    missing = [k for k in here if k not in saved]
    extra = [k for k in saved if k not in here]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(here[k].shape)}" for k in here
              if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(here[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("shape saved vs here", shapes)):
        if items:
            parts.append(f"{label}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
    return "; ".join(parts) or "same entries and shapes"


def does_not_fit(ckpt: dict, cfg: dict, model_state: dict, e: Exception) -> DynsparseError:
    """The one-line error for a checkpoint whose state does not load into this run. (torch's own
    message is "Error(s) in loading state_dict for X:" with the details on later lines.)"""
    arch = {k: v for k, v in (ckpt.get("config") or {}).items()
            if k in ("model", "layers", "widen_factor", "no_batch_norm", "hidden_sizes", "sparse_backend")}
    # a checkpoint from before --sparse-backend was saved with the masked storage
    arch.setdefault("sparse_backend", "masked") if "model" in arch else None
    diff = config_differences(arch, {k: cfg.get(k, "masked" if k == "sparse_backend" else None) for k in arch})
    what = describe_mismatch(ckpt.get("model") or {}, model_state)
    if what == "same entries and shapes":  # the model fits; the optimizer state does not
        what = "optimizer state: " + next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return DynsparseError(f"the checkpoint does not fit this model ({cfg.get('model')}): "
                          f"{'saved with ' + ', '.join(diff) + '; ' if diff else ''}{what}"[:600])


def _resolve(path: str | Path, runs_dir: str | Path | None) -> Path:
    p = Path(path)
    if not p.exists() and runs_dir is not None and (Path(runs_dir) / p.name).exists():
        p = Path(runs_dir) / p.name
    elif not p.exists() and runs_dir is not None and p.name.endswith("_initial") \
            and (Path(runs_dir) / p.name.removesuffix("_initial")).is_dir():
        p = Path(runs_dir) / p.name
    if p.is_dir():
        # a run stopped before its first epoch ended has only its initial state
        p = p / "checkpoint.pt" if (p / "checkpoint.pt").exists() or not (p / "initial.pt").is_file() \
            else p / "initial.pt"
    elif not p.exists() and p.with_name(p.name.removesuffix("_initial")).is_dir() and p.name.endswith("_initial"):
        p = p.with_name(p.name.removesuffix("_initial")) / "initial.pt"  # the original's runs/X_initial
    return p


def load_checkpoint(path: str | Path, device: torch.device, runs_dir: str | Path | None = None) -> tuple[dict, Path]:
    """Read a checkpoint given as a file or as a run directory; one clear error for anything wrong.
    A path that does not exist is also looked up by its name in ``runs_dir`` (so a list's
    ``--resume runs/X`` finds X when the runs live elsewhere). A run directory without
    ``checkpoint.pt`` (stopped during its first epoch) gives its ``initial.pt``."""
    p = _resolve(path, runs_dir)
    if not p.is_file():
        raise DynsparseError(f"checkpoint {str(path)!r} not found (expected a run directory with checkpoint.pt "
                             f"or initial.pt, or a .pt file)")
    if p.stat().st_size == 0:
        raise DynsparseError(f"checkpoint {p} is empty (0 bytes): it was not written by dynsparse, whose "
                             f"writes are atomic; restore it or start over with --overwrite")
    try:
        ckpt = torch.load(p, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise DynsparseError(f"checkpoint {p} is corrupt or unreadable ({_first_sentence(e)}); restore it, or "
                             f"start over with --overwrite") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise DynsparseError(f"{p} is not a dynsparse checkpoint")
    return unpack_state(ckpt), p


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint (file or run directory) in the plain layout: dense tensors and masks, whether it
    was saved compact (v2) or not (v1). ``torch.load`` of a v2 file gives the compact layout."""
    return load_checkpoint(path, torch.device(map_location))[0]


def _first_sentence(e: Exception) -> str:
    """The type and first sentence of torch's error. Its weights-only message goes on to advise
    ``weights_only=False``, which would run code from the file: never passed on."""
    text = (str(e).splitlines() or [""])[0]
    if "weights_only" in text or "Weights only load failed" in text:
        return f"{type(e).__name__}: not a file of plain tensors and containers"
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) > 150:
        sentence = sentence[:150].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {sentence}" if sentence else type(e).__name__


def check_runs_dir(runs_dir: str | Path) -> None:
    p = Path(runs_dir)
    if p.exists() and not p.is_dir():
        raise DynsparseError(f"--runs-dir {runs_dir} is a file, not a directory; pass a directory for the runs")


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` has a run's state or results (not only a config or temporaries)."""
    return any((run_dir / n).exists() for n in ("checkpoint.pt", "initial.pt", "metrics.jsonl", "summary.json"))


def prepare_run_dir(run_dir: Path, *, clear: bool, keep: tuple[str, ...] = ()) -> None:
    """Create ``run_dir``; delete the temporaries of writes a kill interrupted, and with ``clear``
    every output of an earlier run there (but ``keep``), so nothing old is mistaken for new."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        doomed = [p for pattern in (OUTPUT_PATTERNS if clear else (".*.tmp",)) for p in run_dir.glob(pattern)]
        for p in doomed:
            if p.is_file() and p.name not in keep:
                p.unlink()
    except OSError as e:
        raise DynsparseError(f"cannot prepare the run directory {run_dir}: {e.strerror or e}") from None
