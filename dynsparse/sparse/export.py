"""What a sparsifier shows and hands out: the summary table, true nonzero counts, the plain
masked ``state_dict``, per-layer torch sparse tensors, and the checks that weights obey the masks.

Mask entries and nonzeros differ: an entry regrown at zero (DSR, SET, RigL grow new weights at
zero) is on the mask but not yet nonzero, so both are reported.
"""
from __future__ import annotations

import torch

from dynsparse.errors import DynsparseError
from dynsparse.sparse.select import aliases
from dynsparse.sparse.storage.sharded import full_weight


def _off_mask_nonzero(s) -> list[int]:
    """Nonzero weights off the mask, per sparse tensor (one host sync for all)."""
    counts = [sp.off_mask_nonzero() for sp in s.params.values()]
    return torch.stack(counts).tolist() if counts else []


def param_counts(s) -> dict[str, int]:
    """:meth:`Sparsifier.param_counts`."""
    return {"sparse": s.num_active_weights(), "sparse_nonzero": s.num_nonzero_weights(),
            "sparse_total": s.num_sparse_weights(), "tied": 0,
            "stored": sum(sp.param.numel() for sp in s.params.values())}


def check_off_mask_zero(s) -> None:
    """Raise if a weight off the mask is nonzero: something changed the weights behind the
    sparsifier's back (weights loaded after it was built, an optimizer it is not attached to)."""
    bad = {n: k for n, k in zip(s.params, _off_mask_nonzero(s)) if k}
    if bad:
        # a NaN or inf times the zero mask is no zero: a diverged run, not a bypassed sparsifier
        broken = [n for n in bad if not bool(torch.isfinite(s.params[n].param.detach()).all())]
        if broken:
            raise DynsparseError(
                f"weights hold NaN or inf before step {s.step_count + 1} (in {', '.join(repr(n) for n in broken)}): "
                "training diverged (fp16 weights without a GradScaler, Adam's eps underflowing in fp16, too high a "
                "learning rate): keep weights in float32 under autocast, or lower the learning rate")
        name, k = next(iter(bad.items()))
        raise DynsparseError(
            f"{sum(bad.values())} weights are nonzero off the mask before step {s.step_count + 1} (e.g. {k} in "
            f"{name!r}): something changed them behind the sparsifier (weights loaded after it was built: call "
            "sparsifier.load_state_dict(...) or apply_masks(); a second optimizer: build the Sparsifier with it)")


def nonzero_weights(s) -> int:
    counts = [sp.nonzero() for sp in s.params.values()]
    return int(torch.stack(counts).sum()) if counts else 0


def summary(s) -> str:
    names = aliases(s.model)
    rows = [("parameter", "shape", "density", "entries", "active", "nonzero")]
    nonzero = [int(sp.nonzero()) for sp in s.params.values()]
    for (name, sp), nz in zip(s.params.items(), nonzero):
        shown = " = ".join(names.get(name, [name]))
        rows.append((shown, "x".join(map(str, sp.shape)), f"{sp.density:.4f}", str(sp.num_entries),
                     str(sp.num_active * sp.slice_size), str(nz)))
    sparse_total = s.num_sparse_weights()
    dense = sum(p.numel() for p in s.model.parameters()) - s.param_counts()["stored"]
    active = s.num_active_weights()
    rows.append(("sparse tensors", "", f"{active / sparse_total:.4f}", str(sparse_total), str(active),
                 str(sum(nonzero))))
    rows.append(("dense rest", "", "1.0000", str(dense), str(dense), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    head = (f"{type(s.policy).__name__}, step {s.step_count}: entries: mask entries (one may cover a slice of "
            f"weights, e.g. a 3x3 kernel); active: the weights they keep; nonzero <= active")
    return "\n".join([head, *lines])


@torch.no_grad()
def export(s) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` (every name of a shared tensor included) with masks applied; a
    CSR weight ``<name>.values`` + indices becomes the dense ``<name>`` of the ``nn.Linear`` it
    stands for, so the dense architecture loads it (each storage says which entries it
    ``holds`` and what each is exported ``as``)."""
    # (every rank takes part: the whole tensors of FSDP2-sharded parameters are gathered)
    dense = {name: sp.masked_weight() for name, sp in s.params.items()}
    out = {}
    for key, value in s.model.state_dict(keep_vars=True).items():
        owner = next((name for name, sp in s.params.items() if sp.holds(key, value)), None)
        if owner is None:
            out[key] = full_weight(value.detach()).clone()
        elif (as_key := s.params[owner].export_as(key)) is not None:
            out[as_key] = dense[owner].clone()
    return out


@torch.no_grad()
def sparse_tensors(s, layout: torch.layout = torch.sparse_coo) -> dict[str, torch.Tensor]:
    if layout not in (torch.sparse_coo, torch.sparse_csr):
        raise DynsparseError(f"layout must be torch.sparse_coo or torch.sparse_csr, got {layout}")
    return {name: sp.to_sparse(layout) for name, sp in s.params.items()}
