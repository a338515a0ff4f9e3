"""The command line (``dynsparse train|sweep|report|export``, ``python main.py``): :mod:`dynsparse.cli.main`
dispatches, :mod:`dynsparse.cli.flags` holds every flag, plus config files, the dry run and torchrun messages.
The top layer: it may use every other package; nothing below imports it (but a sweep parses job lines)."""
from __future__ import annotations

from dynsparse.cli.main import main, original_main, parse_train_args

__all__ = ["main", "original_main", "parse_train_args"]
