"""The command line (``dynsparse train|sweep|report|export``, ``python main.py``): :mod:`dynsparse.cli.commands`
dispatches, :mod:`dynsparse.cli.flags` holds every flag, plus config files (``config_file``), the dry run
(``dryrun``) and what a failed rank says under torchrun (``torchrun``). The top layer: it may use every other
package, and below it only a sweep parses a job line with :mod:`dynsparse.cli.flags`.

The module is ``commands``, not ``main``: a submodule named like the ``main`` function exported here would make
``import dynsparse.cli.main as m`` give the function.
"""
from __future__ import annotations

from dynsparse.cli.commands import main, original_main, parse_train_args

__all__ = ["main", "original_main", "parse_train_args"]
