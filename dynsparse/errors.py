"""One exception type for every user-facing problem.

Library code raises :class:`DynsparseError` with a message that names the problem and,
where there is a choice, the valid choices. The command line turns it into a one-line
``dynsparse: error: ...`` and exit status 2, never a traceback.
"""
from __future__ import annotations

from collections.abc import Iterable


class DynsparseError(Exception):
    """A problem the user can fix: bad input, missing data, corrupt checkpoint, bad flags."""


def unknown_choice(kind: str, name: str, valid: Iterable[str]) -> DynsparseError:
    """The error for a name that is not in a registry, listing the sorted valid names."""
    return DynsparseError(f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(valid))}")
