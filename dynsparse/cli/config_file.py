"""``dynsparse train --config FILE.yaml``: flags from a file, as timm and Lightning users expect.

The file is a YAML mapping whose keys are the flags, spelled as on the command line without the
dashes (``initial-sparsity-fc: 0.98``, ``rewire: true``, ``b: 50``) or as the configuration's
field names (``initial_sparsity_fc``). Its values become the parser's defaults, so every flag
given on the command line wins over the file. The resolved configuration, not the file, is what
a run records in ``config.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dynsparse.errors import DynsparseError, did_you_mean
from dynsparse.outputs.atomic import read_yaml

# keys that make no sense in a file of flags
_NOT_IN_FILE = {"help", "config"}


def peek_config(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (the last one wins, as for any flag), else None."""
    found = None
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word == "--config":
            if i + 1 >= len(argv):
                raise DynsparseError("--config needs a file: --config FILE.yaml")
            found = argv[i + 1]
        elif word.startswith("--config="):
            found = word.split("=", 1)[1]
    return found


def _keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every spelling a file may use, to the action it sets."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_IN_FILE:
            continue
        keys.setdefault(action.dest, action)
        for opt in action.option_strings:
            name = opt.lstrip("-")
            keys[name] = action
            keys[name.replace("-", "_")] = action
    return keys


def _is_const(action: argparse.Action) -> bool:
    """A switch like ``--mest`` that sets a shared field (``method``) to its own value."""
    return type(action) is argparse._StoreConstAction


def _value(key: str, value, action: argparse.Action, where: str):
    """What ``key: value`` sets ``action.dest`` to, checked as the flag would be."""
    is_flag = action.nargs == 0  # store_true, store_false, store_const: a switch
    if is_flag:
        if not isinstance(value, bool):
            raise DynsparseError(f"{where}: {key} is a switch: write {key}: true or {key}: false, not {value!r}")
        if key == action.dest and isinstance(action, argparse._StoreFalseAction):
            return value  # "progress: false" names the field itself
        if _is_const(action):
            return action.const  # "mest: false" is left out by the caller
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    if isinstance(value, (list, dict)) and action.type is not None:
        raise DynsparseError(f"{where}: {key} takes one value, got {value!r}")
    if callable(action.type) and value is not None:  # typeshed: a callable, a FileType or a registry name
        try:
            value = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise DynsparseError(f"{where}: {key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise DynsparseError(f"{where}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """``{dest: value}`` from a YAML file of flags; one-line errors for a missing file, bad YAML,
    an unknown key (naming the valid keys) or a bad value."""
    p = Path(path)
    data = read_yaml(p, "--config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DynsparseError(f"--config {p} must be a mapping of flags to values (epochs: 20), not a "
                             f"{type(data).__name__}")
    keys = _keys(parser)
    unknown = [str(k) for k in data if str(k) not in keys]
    if unknown:  # one suggestion per key: the whole list of keys is `dynsparse train --help`
        said = ", ".join(f"{k} ({did_you_mean(k, keys).removeprefix('; ') or 'no flag like it'})" for k in unknown)
        raise DynsparseError(f"--config {p}: unknown key{'s' * (len(unknown) > 1)} {said}; valid keys are the "
                             f"flags without dashes, listed by dynsparse train --help")
    return {keys[str(k)].dest: _value(str(k), v, keys[str(k)], f"--config {p}") for k, v in data.items()
            if not (_is_const(keys[str(k)]) and v is False)}
