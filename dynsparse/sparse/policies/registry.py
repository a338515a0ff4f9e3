"""The one registry of methods: each policy class registers itself where it is defined.

``@register_policy("rigl", help=..., cost=..., schedule=..., fields=...)`` above a class is all
a method needs: the library's ``create_policy``/``POLICIES``, the command line's ``--method``
choices and flags, the configuration, the FLOPs counter and the report's order of methods are
all derived from it. A policy's options are its constructor's keyword parameters (types and
defaults from there); the command line offers each as a flag (``--lam``), except the ones
``fields`` maps to a flag of the original command line (``fraction`` -> ``--rewire-fraction``)
and the ones ``context`` says the run supplies (DeepR's temperature schedule).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dynsparse.errors import DynsparseError, unknown_choice

# FLOPs per training step (dynsparse.flops); "dense" is the command line's dense and tied runs
COSTS = ("sparse", "dense-grad-at-updates", "dense-grad-every-step")
# when the topology changes under the command line (the run builds the policy's ``when`` from it):
# every rewire period; the same until --update-end with --update-period; once an epoch until
# --update-end; every step; at the ends of epochs (prune mode); never
SCHEDULES = ("periodic", "periodic-until-end", "epoch-until-end", "every-step", "epoch-ends", "never")
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class Option:
    """One constructor parameter of a policy that the command line sets."""

    name: str  # the constructor's parameter
    default: Any
    type: type
    field: str | None  # the configuration field of an existing flag, or None: its own flag --NAME

    @property
    def flag(self) -> str:
        if self.field == "DeepR_eta":  # the original's one flag with an underscore
            return "--DeepR_eta"
        return "--" + (self.field or self.name).replace("_", "-")


@dataclass(frozen=True)
class PolicySpec:
    name: str
    cls: type
    help: str
    cost: str = "sparse"
    schedule: str = "periodic"
    fields: Mapping[str, str] = field(default_factory=dict)  # parameter -> configuration field of its flag
    context: tuple[str, ...] = ()  # parameters the run supplies (not options)
    flag: str | None = None  # a flag of its own that selects it (--mest), besides --method NAME
    by_name: bool = True  # selectable by --method NAME (prune needs its own flags)

    @property
    def options(self) -> dict[str, Option]:
        """The constructor's parameters the command line sets, in signature order. Keyword-only
        ones (after ``*``) are for subclasses to set (SET's ``extra`` and ``cosine``), not flags,
        unless ``fields`` maps them to a flag (pruning's ``cubic``: ``--cubic-prune-schedule``)."""
        out = {}
        for p in inspect.signature(self.cls).parameters.values():
            if p.name in ("when", *self.context) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or \
                    (p.kind == p.KEYWORD_ONLY and p.name not in self.fields):
                continue
            if p.default is inspect.Parameter.empty:
                raise DynsparseError(f"policy {self.name}: parameter {p.name!r} needs a default (or list it in "
                                     "context)")
            kind = type(p.default) if type(p.default) in _TYPES.values() else \
                _TYPES.get(str(p.annotation).split(" |")[0])
            if kind is None:
                raise DynsparseError(f"policy {self.name}: parameter {p.name!r} is not a bool, int, float or str "
                                     f"option (list it in context, or give it a plain default)")
            out[p.name] = Option(p.name, p.default, kind, self.fields.get(p.name))
        return out


REGISTRY: dict[str, PolicySpec] = {}  # in registration order: the report's order of methods
POLICIES: dict[str, type] = {}  # name -> class, the library's view of REGISTRY


def register_policy(name: str, cls: type | None = None, *, help: str = "", cost: str = "sparse",
                    schedule: str = "periodic", fields: Mapping[str, str] | None = None,
                    context: tuple[str, ...] = (), flag: str | None = None, by_name: bool = True) -> Any:
    """Class decorator: register a policy under ``name`` (see the module's doc for the rest).
    ``register_policy(name, cls)`` (the form before issue 24) registers ``cls`` at once and
    returns it; ``help`` defaults to the first line of the class's docstring."""
    if cost not in COSTS:
        raise unknown_choice("cost", cost, COSTS)
    if schedule not in SCHEDULES:
        raise unknown_choice("schedule", schedule, SCHEDULES)

    def register(cls: type) -> type:
        line = help or next(iter((cls.__doc__ or name).strip().splitlines()), name)
        spec = PolicySpec(name, cls, line, cost, schedule, dict(fields or {}), tuple(context), flag, by_name)
        spec.options  # noqa: B018  (checks the constructor now, not when a run starts)
        REGISTRY[name] = spec
        POLICIES[name] = cls
        return cls
    return register(cls) if cls is not None else register


def create_policy(name: str, **kwargs) -> Any:
    """A policy by name; unknown names raise with the sorted valid names."""
    if name not in POLICIES:
        raise unknown_choice("method", name, POLICIES)
    return POLICIES[name](**kwargs)
