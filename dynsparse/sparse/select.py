"""Which parameters a sparsifier makes sparse, and at which density: stated, never guessed.

By default every weight *used as a matrix product* is selected: the ``weight`` of conv
(``nn.Conv1d/2d/3d`` and their transposes), ``nn.Linear`` (and so ``MultiheadAttention.out_proj``)
and ``nn.Bilinear`` modules, ``MultiheadAttention``'s ``in_proj_weight`` (or its separate
``q/k/v_proj_weight``), and whatever a custom module lists in its ``sparse_weights`` attribute
(names of its own parameters, e.g. ``sparse_weights = ("w_in", "w_out")``). This is the one default
rule: the command line uses it too for every model that does not list its own
``sparse_parameter_names`` (``torchvision:``/``timm:`` models; see ``dynsparse.models``). Embeddings, norms
and biases stay dense unless included by name.

``include`` / ``exclude`` take glob patterns on parameter names (``"layer1.*"``) and module
types (``nn.Embedding``; a type matches every parameter inside such a module); a pattern or type
that matches nothing is an error, so a typo cannot
silently keep a layer dense. A parameter shared by several modules (tied embedding and output
weights) is one sparse tensor, under its first name in ``named_parameters()``, whichever module
was declared first; it is selected if any of its users selects it.

Budgets by name (``"uniform"``, ``"er"``, ``"erk"``) are computed from the selected tensors'
own shapes with a total ``density``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import nn

from dynsparse.errors import DynsparseError, unknown_choice
from dynsparse.sparse.budget import make_densities

_MATRIX_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear, nn.Bilinear)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
NAMED_BUDGETS = ("er", "erk", "uniform")
Rule = str | type


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of every parameter, keyed by its first (canonical) name."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canon = first.setdefault(id(p), name)
        out.setdefault(canon, []).append(name)
    return out


def _owners(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """(attribute name, module) pairs owning each parameter, keyed by canonical name."""
    canon = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for attr, p in m.named_parameters(recurse=False):
            out.setdefault(canon[id(p)], []).append((attr, m))
    return out


def _containers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Every module holding each parameter, at any depth (for rules by module type)."""
    canon = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters():
            out.setdefault(canon[id(p)], []).append(m)
    return out


def is_matrix_weight(attr: str, m: nn.Module) -> bool:
    """Whether the parameter ``attr`` of the module ``m`` is one the default rule selects."""
    declared = getattr(m, "sparse_weights", None)
    if declared is not None:
        return attr in tuple(declared)
    if isinstance(m, _MATRIX_MODULES):
        return attr == "weight"
    return isinstance(m, nn.MultiheadAttention) and attr in _MHA_WEIGHTS


def _matches(rule: Rule, names: list[str], holders: list[nn.Module]) -> bool:
    if isinstance(rule, str):
        return any(fnmatch.fnmatchcase(n, rule) for n in names)
    if isinstance(rule, type):
        return any(isinstance(m, rule) for m in holders)
    raise DynsparseError(f"include/exclude rules are name patterns (str) or module types, got {rule!r}")


def _rules(rules: Rule | Sequence[Rule] | None) -> list[Rule]:
    if rules is None:
        return []
    return [rules] if isinstance(rules, (str, type)) else list(rules)


def select_weights(model: nn.Module, include: Rule | Sequence[Rule] | None = None,
                   exclude: Rule | Sequence[Rule] | None = None) -> list[str]:
    """Canonical names of the selected parameters, in ``named_parameters()`` order. ``include``
    replaces the default selection (any parameter of 2 or more dimensions it matches);
    ``exclude`` removes from it."""
    names, owners, holders = aliases(model), _owners(model), _containers(model)
    params = dict(model.named_parameters())
    inc, exc = _rules(include), _rules(exclude)
    if inc:
        chosen = [n for n in names if params[n].dim() >= 2
                  and any(_matches(r, names[n], holders.get(n, [])) for r in inc)]
        _unmatched("include", inc, [n for n in names if params[n].dim() >= 2], names, holders)
    else:
        chosen = [n for n in names if any(is_matrix_weight(a, m) for a, m in owners.get(n, []))]
    _unmatched("exclude", exc, chosen, names, holders)
    chosen = [n for n in chosen if not any(_matches(r, names[n], holders.get(n, [])) for r in exc)]
    if not chosen:
        raise DynsparseError("no sparse parameters: the model has no conv, linear, bilinear or attention weight "
                             "selected (or include/exclude left none)")
    return chosen


def _unmatched(what: str, rules: list[Rule], pool: list[str], names, holders) -> None:
    for r in rules:
        if not any(_matches(r, names[n], holders.get(n, [])) for n in pool):
            label = r if isinstance(r, str) else r.__name__
            raise DynsparseError(f"{what} {label!r} matches no candidate parameter; candidates: {', '.join(pool)}")


def canonical(model: nn.Module, name: str) -> str:
    """The canonical name of a parameter given any of its names."""
    for canon, names in aliases(model).items():
        if name in names:
            return canon
    raise DynsparseError(f"unknown parameter names [{name!r}]; the model's parameters: {sorted(aliases(model))}")


def resolve_densities(model: nn.Module, densities: float | str | Mapping[str, float] | None, density: float | None,
                      include=None, exclude=None) -> dict[str, float]:
    """``{canonical name: density}`` from any accepted form of ``densities``."""
    if isinstance(densities, Mapping):
        if include is not None or exclude is not None:
            raise DynsparseError("pass either a {name: density} dict or include/exclude, not both")
        if density is not None:
            raise DynsparseError("density= is the total for a named budget (densities='erk'); "
                                 "a {name: density} dict already says each tensor's density")
        out: dict[str, float] = {}
        for name, d in densities.items():
            canon = canonical(model, name)
            if canon in out:
                raise DynsparseError(f"{name!r} is the same tensor as {canon!r} (shared parameter): give it once")
            out[canon] = float(d)
        if not out:
            raise DynsparseError("no sparse parameters: the densities dict is empty")
        return out
    names = select_weights(model, include, exclude)
    if isinstance(densities, str):
        if densities not in NAMED_BUDGETS:
            raise unknown_choice("budget", densities, NAMED_BUDGETS)
        if density is None:
            raise DynsparseError(f"densities={densities!r} spreads a total: "
                                 "pass density= (the kept fraction, e.g. 0.1)")
        params = dict(model.named_parameters())
        return make_densities(densities, {n: tuple(params[n].shape) for n in names}, float(density))
    if densities is None:
        densities = density
    if densities is None:
        raise DynsparseError("pass densities= (a density, a {name: density} dict or a budget name with density=), "
                             "or init='from_weights'")
    return {n: float(densities) for n in names}
