"""The command line's side of the method registry (``dynsparse/sparse/policies/registry.py``):
the original command line's selector flags in one table, one flag per policy option derived
from the registered classes, and ``--plugin`` to register a user's own methods.

A policy option that is not mapped to a flag of the original (``fields`` at registration) is a
flag of its own, ``--NAME`` with the parameter's dashes (MEST's ``lam`` -> ``--lam``, a plugin's
``my_opt`` -> ``--my-opt``); its type and default are the constructor's. The configuration
records the options given in ``method_options`` (config.json), and a run passes them to the
policy's constructor. An option of another method is refused, naming the method's own options.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from dynsparse.errors import DynsparseError
from dynsparse.sparse.policies.registry import REGISTRY, Option

# The original command line's flags that select a method, in the order its errors name them.
# Where several rows match (--rewire --threshold-prune), the row with more flags wins.
ORIGINAL_SELECTORS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("--DeepR",), "deepr"),
    (("--rewire", "--threshold-prune"), "dsr"),
    (("--rewire",), "set"),
    (("--prune",), "prune"),
    (("--tied",), "tied"),
    (("--rigl",), "rigl"),
    (("--sparse-momentum",), "snfs"),
)
# methods whose topology updates --update-period spaces (the others: rewire_period_schedule)
TAKES_UPDATE_PERIOD = ("periodic-until-end", "epoch-until-end")


def field_of(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def selected_method(cfg) -> str | None:
    """The method the original selector flags of ``cfg`` mean, or None."""
    rows = [(flags, name) for flags, name in ORIGINAL_SELECTORS if all(getattr(cfg, field_of(f)) for f in flags)]
    return max(rows, key=lambda row: len(row[0]))[1] if rows else None


def selectors_given(cfg) -> list[str]:
    """Each selector flag ``cfg`` sets, once, in the table's order (--threshold-prune alone selects nothing)."""
    return list(dict.fromkeys(flags[0] for flags, _ in ORIGINAL_SELECTORS if getattr(cfg, field_of(flags[0]))))


def own_options() -> dict[str, Option]:
    """Every policy option with a flag of its own, by flag (an option shared by several methods,
    like ``--beta``, is one flag; its default is each method's own)."""
    out: dict[str, Option] = {}
    for spec in REGISTRY.values():
        for o in spec.options.values():
            if o.field is None:
                if o.flag in out and out[o.flag].type is not o.type:
                    raise DynsparseError(f"policy {spec.name}: option {o.name} is a {o.type.__name__}, but {o.flag} "
                                         f"of another method is a {out[o.flag].type.__name__}: rename it")
                out.setdefault(o.flag, o)
    return out


def add_option_flags(group, taken: set[str], str2bool) -> None:
    """One flag per own option (default None: the method's own default); ``taken``: the flags
    that already exist, which an option may not shadow."""
    for flag, o in own_options().items():
        if flag in taken:
            raise DynsparseError(f"a policy option {o.name!r} would shadow the flag {flag}: rename the parameter, "
                                 f"or map it to that flag with fields={{{o.name!r}: {field_of(flag)!r}}}")
        methods = [s.name for s in REGISTRY.values() if o.name in s.options and s.options[o.name].field is None]
        group.add_argument(flag, dest="option_" + o.name, default=None, type=str2bool if o.type is bool else o.type,
                           metavar=o.type.__name__.upper(), help=f"{', '.join(methods)}: the policy's {o.name} "
                           f"(default: the method's own, {o.default})")


def options_from_args(ns: argparse.Namespace) -> dict:
    """``{parameter: value}`` of the own-option flags given."""
    return {o.name: getattr(ns, "option_" + o.name) for o in own_options().values()
            if getattr(ns, "option_" + o.name, None) is not None}


def check_options(cfg, method: str) -> None:
    """Refuse an option that ``method`` does not take, naming the options it takes."""
    spec = REGISTRY.get(method)
    mine = {} if spec is None else spec.options
    given = [(o.flag, o.name, o.field) for o in own_options().values() if o.name in dict(cfg.method_options)]
    if cfg.drop_fraction is not None:  # the one original-side option flag that is unset by default
        given.append(("--drop-fraction", "fraction", "drop_fraction"))
    for flag, name, field in given:
        if name not in mine or mine[name].field != field:
            takes = sorted(s.name for s in REGISTRY.values() if name in s.options and s.options[name].field == field)
            flags = [o.flag for o in mine.values()]
            if spec is not None and spec.schedule in TAKES_UPDATE_PERIOD:
                flags.append("--update-period")
            raise DynsparseError(f"{flag} is for {', '.join(takes)}, not {method}; {method}'s options: "
                                 f"{', '.join(flags) or 'none'}")


_LOADED: dict[str, object] = {}


def load_plugins(names: str) -> None:
    """Import each comma-separated module (a name on sys.path or the current directory, or a
    ``.py`` file), whose ``@register_policy`` classes then work like the built-in methods."""
    for name in (n.strip() for n in names.split(",")):
        if not name or name in _LOADED:
            continue
        path = Path(name)
        try:
            if name.endswith(".py"):
                if not path.is_file():
                    raise DynsparseError(f"--plugin {name}: no such file")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                if spec is None or spec.loader is None:
                    raise DynsparseError(f"--plugin {name}: Python cannot import this file as a module")
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                if importlib.util.find_spec(name.split(".")[0]) is None and str(Path.cwd()) not in sys.path:
                    sys.path.insert(0, str(Path.cwd()))  # the console script's path lacks the current directory
                module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise DynsparseError(f"--plugin {name}: cannot import {e.name!r} (a module on sys.path or in the current "
                                 f"directory, or a .py file)") from None
        _LOADED[name] = module


def peek_plugins(argv: list[str], config_file: str | None) -> str:
    """The ``--plugin`` value of ``argv``, else of the ``--config`` file (needed before the parser
    is built, for the plugin's flags to exist)."""
    found = ""
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word == "--plugin" and i + 1 < len(argv):
            found = argv[i + 1]
        elif word.startswith("--plugin="):
            found = word.split("=", 1)[1]
    if not found and config_file and Path(config_file).is_file():
        from dynsparse.outputs.atomic import read_yaml
        data = read_yaml(Path(config_file), "--config file")
        found = str(data.get("plugin", "")) if isinstance(data, dict) else ""
    return found
