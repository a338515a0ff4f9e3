"""One exception type for every user-facing problem.

Library code raises :class:`DynsparseError` with a message that names the problem and,
where there is a choice, the valid choices. The command line turns it into a one-line
``dynsparse: error: ...`` and exit status 2, never a traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DynsparseError(Exception):
    """A problem the user can fix: bad input, missing data, corrupt checkpoint, bad flags."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean mnist_mlp?"`` for a name that differs from a valid one in case or by a
    typo, else ``""``."""
    valid = [str(v) for v in valid]
    close = [v for v in valid if v.lower() == str(name).lower()]
    close = close or difflib.get_close_matches(str(name).lower(), [v.lower() for v in valid], n=1, cutoff=0.6)
    match = next((v for v in valid if close and v.lower() == close[0].lower()), None)
    return f"; did you mean {match}?" if match else ""


def unknown_choice(kind: str, name: str, valid: Iterable[str]) -> DynsparseError:
    """The error for a name that is not in a registry, listing the sorted valid names."""
    valid = sorted(valid)
    return DynsparseError(f"unknown {kind} {name!r}; valid choices: {', '.join(valid)}{did_you_mean(name, valid)}")
