"""Atomic file output: every file a run writes appears whole or not at all.

Each writer writes to a temporary file ``.NAME.*.tmp`` in the same directory, flushes and
fsyncs it, then ``os.replace``s it over the target, so an interrupted run never leaves a
truncated file behind (a SIGKILL can leave the hidden temporary, which :func:`remove_stale_temporaries`
clears). Files get the mode an ordinary ``open`` would give (0666 less the umask, usually 0644),
not ``mkstemp``'s 0600, so colleagues can read results. A failed write (full disk, read-only or
missing directory) raises :class:`~dynsparse.errors.DynsparseError` naming the file and the reason.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dynsparse.errors import DynsparseError


def file_mode() -> int:
    """The mode an ordinary open() gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask


def write_error(path: Path, e: OSError) -> DynsparseError:
    return DynsparseError(f"cannot write {path}: {e.strerror or e}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files an atomic write killed mid-way left in ``directory``."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML file ``path`` (``what`` names it in errors): one-line errors for a missing
    file or invalid YAML."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise DynsparseError(f"{what} {str(path)!r} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DynsparseError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None

