"""How a parameter budget is spread over layers: ``(shapes, ...) -> {name: density}``.

* ``uniform``: every sparse tensor at the same density;
* ``type``: the original's per layer type densities (``--initial-sparsity-conv`` / ``-fc``), passed in;
* ``er`` / ``erk`` (Erdos-Renyi, and its kernel variant, Evci et al. 2020): density of a layer
  proportional to ``sum(dims) / prod(dims)`` (ER: of ``out, in`` only; ERK: all dims), scaled so
  that the kept weights total ``density * sum(N)``; a layer that would exceed 1 is made dense
  and the scale is solved again for the rest.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from dynsparse.errors import DynsparseError, unknown_choice

BUDGETS = ("type", "uniform", "er", "erk")


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float, *, kernel: bool = True) -> dict[str, float]:
    if not 0.0 < density <= 1.0:
        raise DynsparseError(f"density must be in (0, 1], got {density}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) if kernel else (sum(s[:2]) / math.prod(s[:2])) for n, s in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        remaining = budget - sum(sizes[n] for n in dense)
        if not free:
            break
        eps = remaining / sum(raw[n] * sizes[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def make_densities(kind: str, shapes: Mapping[str, tuple[int, ...]], density: float,
                   per_type: Mapping[str, float] | None = None) -> dict[str, float]:
    """Densities for ``kind`` in BUDGETS; ``per_type`` is the ``type`` budget's own answer."""
    if kind == "type":
        if per_type is None:
            raise DynsparseError("the 'type' budget needs per-layer-type densities")
        return dict(per_type)
    if kind == "uniform":
        return {n: density for n in shapes}
    if kind in ("er", "erk"):
        return erk_densities(shapes, density, kernel=kind == "erk")
    raise unknown_choice("budget", kind, BUDGETS)
