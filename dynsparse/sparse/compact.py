"""Sparse tensors stored by their active entries only: checkpoints and exported files whose size
follows the nonzeros, not the dense shapes.

A set of active entries (a mask over the first dims of a weight) is kept as whichever is smaller:
int32 CSR indices of the mask seen as ``[rows, entries / rows]`` (``crow``, ``col``; 4 bytes per
active entry plus 4 per row) or a bitmask (one bit per entry). Dense tensors that are zero off
those entries (the weight, its momentum, Adam's moments) are then kept as their values at the
active entries, ``[num_active, slice_size]`` in flat order.

:func:`pack_state` turns a run's checkpoint (``model``, ``optimizer``, ``sparsifier`` entries as
the run saves them) into that form, and :func:`unpack_state` back into the plain layout that
every reader of checkpoints expects (so resuming from a compact checkpoint is exactly resuming
from a plain one). A tensor that is *not* zero off its mask (``mask_optimizer_state=False``
keeps momentum there; weights changed behind the sparsifier) is kept dense: never a lossy save.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from dynsparse.errors import DynsparseError

INDEX_DTYPE = torch.int32
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# ---- a set of active entries --------------------------------------------------------------------
def encode_index(flat: torch.Tensor, entries_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Sorted int64 flat indices of the active entries of a mask of ``entries_shape``, as int32
    CSR (``crow``, ``col``) or a bitmask (``bits``), whichever takes fewer bytes."""
    n = math.prod(entries_shape)
    rows = entries_shape[0] if entries_shape else 1
    cols = n // max(rows, 1)
    flat = flat.detach().to("cpu", torch.int64).reshape(-1)
    csr_bytes = 4 * (rows + 1) + 4 * flat.numel()
    if (n + 7) // 8 < csr_bytes:
        mask = torch.zeros((n + 7) // 8 * 8, dtype=torch.bool)
        mask[flat] = True
        return {"bits": (mask.view(-1, 8).to(torch.uint8) * _BITS).sum(1, dtype=torch.uint8)}
    counts = torch.bincount(torch.div(flat, cols, rounding_mode="floor"), minlength=rows)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    return {"crow": crow.to(INDEX_DTYPE), "col": (flat % cols).to(INDEX_DTYPE)}


def decode_index(index: dict[str, torch.Tensor], entries_shape: tuple[int, ...]) -> torch.Tensor:
    """The sorted int64 flat indices that :func:`encode_index` encoded."""
    n = math.prod(entries_shape)
    if "bits" in index:
        bits = index["bits"].to("cpu", torch.uint8)
        if bits.numel() != (n + 7) // 8:
            raise DynsparseError(f"a bitmask of {bits.numel()} bytes does not cover {n} entries")
        mask = (bits.view(-1, 1) & _BITS).ne(0).view(-1)[:n]
        return torch.nonzero(mask).view(-1)
    crow, col = index["crow"].to("cpu", torch.int64), index["col"].to("cpu", torch.int64)
    rows = entries_shape[0] if entries_shape else 1
    if crow.numel() != rows + 1 or int(crow[-1]) != col.numel():
        raise DynsparseError(f"CSR indices do not fit {rows} rows ({crow.numel()} row pointers, {col.numel()} columns)")
    row = torch.repeat_interleave(torch.arange(rows), crow.diff())
    return row * (n // max(rows, 1)) + col


def index_nbytes(index: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in index.values())


# ---- tensors that are zero off the active entries -----------------------------------------------
def gather(t: torch.Tensor, flat: torch.Tensor, num_entries: int) -> torch.Tensor | None:
    """``t``'s values at the active entries, ``[num_active, slice]``; None when ``t`` is nonzero
    elsewhere (then it must be kept dense to stay exact)."""
    rows = t.detach().reshape(num_entries, -1)
    keep = torch.zeros(num_entries, dtype=torch.bool, device=rows.device)
    keep[flat.to(rows.device)] = True
    if rows[~keep].ne(0).any():
        return None
    return rows[flat.to(rows.device)].clone()


def scatter(values: torch.Tensor, flat: torch.Tensor, shape: tuple[int, ...], num_entries: int) -> torch.Tensor:
    """The dense tensor of ``shape`` with ``values`` at the active entries and zero elsewhere."""
    out = values.new_zeros((num_entries, values.shape[1] if values.dim() > 1 else 1))
    out[flat.to(values.device)] = values.reshape(flat.numel(), -1)
    return out.view(shape)


# ---- checkpoints ---------------------------------------------------------------------------------
def _optimizer_index(optimizer, param) -> int | None:
    if optimizer is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next((i for i, p in enumerate(params) if p is param), None)


def pack_state(state: dict, sparsifier) -> dict:
    """A copy of a run's checkpoint ``state`` with every sparse weight of ``sparsifier`` (and each
    optimizer state tensor shaped like it) kept by its active entries, under ``state["compact"]``.
    A sparsifier without sparse parameters (dense, tied runs) leaves ``state`` as it is."""
    params = getattr(sparsifier, "params", None)
    if not params or not isinstance(state.get("sparsifier"), dict) or "masks" not in state["sparsifier"]:
        return state
    model, masks = dict(state["model"]), dict(state["sparsifier"]["masks"])
    optim = state.get("optimizer")
    opt_state = dict(optim["state"]) if isinstance(optim, dict) and "state" in optim else None
    records: dict[str, dict[str, Any]] = {}
    for name, sp in params.items():
        own = sp.compact_record(model)  # CSR: the model's own indices say it: store nothing twice
        if own is not None:
            if own:
                masks.pop(name)
                records[name] = own
            continue
        entries = tuple(sp.mask.shape)
        flat = torch.nonzero(sp.mask.reshape(-1)).view(-1)
        record: dict[str, Any] = {"storage": "masked", "shape": list(sp.param.shape), "entries": list(entries),
                  "index": encode_index(flat, entries), "model_keys": [], "optimizer": {}}
        ptr = sp.param.data_ptr()
        for key in [k for k, v in model.items() if torch.is_tensor(v) and v.data_ptr() == ptr
                    and v.shape == sp.param.shape]:
            values = gather(model[key], flat, sp.num_entries)
            if values is not None:
                record["model_keys"].append(key)
                record["values"] = values
                del model[key]
        idx = _optimizer_index(getattr(sparsifier, "optimizer", None), sp.param)
        if opt_state is not None and idx in opt_state:
            kept = dict(opt_state[idx])
            for key, t in opt_state[idx].items():
                if torch.is_tensor(t) and t.shape == sp.param.shape:
                    values = gather(t, flat, sp.num_entries)
                    if values is not None:
                        record["optimizer"][key] = values
                        del kept[key]
            if record["optimizer"]:
                record["optimizer_index"] = idx
                opt_state[idx] = kept
        masks.pop(name)
        records[name] = record
    out = dict(state, model=model, sparsifier=dict(state["sparsifier"], masks=masks), compact=records)
    if opt_state is not None and isinstance(optim, dict):  # (opt_state is set only from a dict optim)
        out["optimizer"] = dict(optim, state=opt_state)
    return out


def unpack_state(state: dict) -> dict:
    """The plain layout (dense ``model`` tensors and optimizer state, the sparsifier's masks) of a
    checkpoint that :func:`pack_state` made; a plain checkpoint is returned as it is."""
    records = state.get("compact")
    if not records:
        return state
    if any(t.device.type == "meta" for r in records.values() for t in r.get("index", {}).values()):
        raise DynsparseError("a compact checkpoint keeps its sparse tensors by their indices, which the 'meta' device "
                             "does not hold: load it on the CPU (map_location='cpu') and move the tensors after")
    try:
        state = dict(state)
        model, masks = dict(state["model"]), dict(state["sparsifier"]["masks"])
        optim = state.get("optimizer")
        opt_state = dict(optim["state"]) if isinstance(optim, dict) and "state" in optim else {}
        for name, r in records.items():
            if r["storage"] == "csr":
                crow, col = model[name + ".crow_indices"].long(), model[name + ".col_indices"].long()
                row = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
                flat = row * int(r["in_features"]) + col
                k = int(r.get("slice", 1))  # per-kernel entries: the first weight of each kernel
                masks[name] = flat[::k] // k if k > 1 else flat  # what CSRParam.topology() saves
                continue
            shape, entries = tuple(r["shape"]), tuple(r["entries"])
            flat = decode_index(r["index"], entries)
            n = math.prod(entries)
            for key in r["model_keys"]:
                model[key] = scatter(r["values"], flat, shape, n)
            if r["optimizer"]:
                idx = r["optimizer_index"]
                opt_state[idx] = {**opt_state.get(idx, {}),
                                  **{k: scatter(v, flat, shape, n) for k, v in r["optimizer"].items()}}
            mask = torch.zeros(n, dtype=torch.bool)
            mask[flat] = True
            masks[name] = mask.view(entries)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise DynsparseError(f"the compact sparse tensors of this checkpoint are damaged ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    state.pop("compact")
    state["model"], state["sparsifier"] = model, dict(state["sparsifier"], masks=masks)
    if isinstance(optim, dict) and "state" in optim:
        state["optimizer"] = dict(optim, state=opt_state)
    return state

