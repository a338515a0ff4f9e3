"""Shipping a trained run: ``dynsparse export`` and :func:`load_sparse`.

``export_run(RUN_DIR, FILE, format)`` reads the run's last checkpoint (``checkpoint.pt``, or
``initial.pt`` of a run stopped in its first epoch) and writes the trained model only (no
optimizer state, no masks) as a safetensors file:

* ``dense``: the plain ``state_dict`` of the ordinary architecture (a CSR layer's weight becomes
  the dense ``<layer>.weight``), which any copy of the architecture loads with
  ``load_state_dict``, without dynsparse;
* ``sparse``: each sparse weight as its nonzeros, ``<name>.values`` + int32
  ``<name>.crow_indices`` / ``<name>.col_indices`` of the weight seen as ``[shape[0], -1]``
  (kept dense where that is smaller, above about half density), every other tensor as is; the
  metadata holds the shapes, the run's architecture and its configuration.

:func:`load_sparse` reads a sparse file back: dense tensors, or ``torch.sparse_csr`` tensors for
2-D sparse weights (:func:`dynsparse.sparse.inference.sparse_inference` takes those directly).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dynsparse.errors import DynsparseError
from dynsparse.outputs.atomic import atomic_write_bytes
from dynsparse.training.checkpoint import load_checkpoint

SPARSE_FORMAT, DENSE_FORMAT = "dynsparse-sparse-v1", "dynsparse-dense-v1"
FORMATS = ("sparse", "dense")
ARCH_FIELDS = ("model", "layers", "widen_factor", "no_batch_norm", "hidden_sizes")


def _architecture(cfg: dict, model_state: dict) -> tuple[dict, dict[str, torch.Size]]:
    """The run's architecture (with its number of classes) and the dense shape of every tensor
    of the ordinary model, from a model built on the 'meta' device (no memory, however wide)."""
    from dynsparse.models import create_model
    arch: dict[str, Any] = {k: cfg.get(k) for k in ARCH_FIELDS if k in cfg}
    # the classifier's width: the last 1-D float tensor of the state (its bias, or the logits' norm)
    last = [v for k, v in model_state.items() if torch.is_tensor(v) and v.dim() == 1 and v.is_floating_point()
            and not (k.endswith(".values") and k[:-len("values")] + "crow_indices" in model_state)]
    arch["num_classes"] = int(last[-1].numel()) if last else 10
    with torch.device("meta"):
        model = create_model(arch["model"], num_classes=arch["num_classes"], layers=arch.get("layers", 28),
                             widen_factor=arch.get("widen_factor", 10.0), batch_norm=not arch.get("no_batch_norm"),
                             hidden_sizes=tuple(arch.get("hidden_sizes") or (300, 100)))
    return arch, {k: v.shape for k, v in model.state_dict().items()}


def _dense_of_csr(state: dict, name: str, shape: torch.Size) -> torch.Tensor:
    crow, col = state[name + ".crow_indices"].long(), state[name + ".col_indices"].long()
    values = state[name + ".values"]
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow.diff())
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[rows, col] = values
    return dense


def trained_state(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], set[str], dict, Path]:
    """The trained model of a run as the ordinary architecture's ``state_dict`` (weights zero off
    their masks), the names of its sparse weights, the metadata to record, and the checkpoint read."""
    ckpt, path = load_checkpoint(run_dir, torch.device("cpu"))
    cfg, model = ckpt.get("config") or {}, ckpt.get("model")
    if not isinstance(model, dict) or "model" not in cfg:
        raise DynsparseError(f"{path} holds no trained model and configuration to export")
    arch, shapes = _architecture(cfg, model)
    masks = (ckpt.get("sparsifier") or {}).get("masks") or {}
    out, sparse = {}, set(masks)
    for key, shape in shapes.items():
        if key in model and tuple(model[key].shape) == tuple(shape):
            out[key] = model[key].detach()
        elif key in model:
            raise DynsparseError(f"{path} does not fit its own architecture ({arch['model']}): {key} has shape "
                                 f"{tuple(model[key].shape)}, expected {tuple(shape)}")
        elif key + ".values" in model:  # a CSR layer of the csr backend
            out[key] = _dense_of_csr(model, key, shape)
            sparse.add(key)
        else:
            raise DynsparseError(f"{path} does not fit its own architecture ({arch['model']}): {key} is missing")
    for name, mask in masks.items():  # the checkpoint keeps weights zero off the mask; make sure
        if mask.dtype == torch.bool and name in out:
            w = out[name]
            out[name] = w * mask.reshape(mask.shape + (1,) * (w.dim() - mask.dim())).to(w.dtype)
    meta = {"architecture": json.dumps(arch), "config": json.dumps(cfg), "epoch": str(ckpt.get("epoch")),
            "checkpoint": path.name}
    return out, sparse & set(out), meta, path


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "sparse") -> dict:
    """Write the run's trained model to ``out`` (safetensors); returns what was written (bytes,
    tensors, sparse weights and their nonzeros)."""
    if fmt not in FORMATS:
        raise DynsparseError(f"unknown export format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    from safetensors.torch import save
    state, sparse, meta, path = trained_state(run_dir)
    tensors, shapes, nonzeros = file_tensors(state, sparse if fmt == "sparse" else set())
    meta = {**meta, "format": SPARSE_FORMAT if fmt == "sparse" else DENSE_FORMAT, "sparse": json.dumps(shapes)}
    data = save(tensors, metadata=meta)
    atomic_write_bytes(out, data)
    return {"file": str(out), "bytes": len(data), "checkpoint": str(path), "format": fmt,
            "sparse_weights": len(sparse), "nonzeros": nonzeros if fmt == "sparse" else None}


def file_tensors(state: dict[str, torch.Tensor], sparse: set[str]) -> tuple[dict[str, torch.Tensor], dict, int]:
    """The tensors of an export file: each tensor named in ``sparse`` as nonzeros + int32 CSR
    indices where that is smaller, every other as is; with the sparse shapes and nonzero count."""
    tensors: dict[str, torch.Tensor] = {}
    shapes, nonzeros = {}, 0
    for key, t in state.items():
        if key in sparse:
            rows = t.reshape(t.shape[0], -1)
            nz = torch.nonzero(rows)
            nonzeros += nz.shape[0]
            if nz.shape[0] * (t.element_size() + 4) + 4 * (rows.shape[0] + 1) < t.numel() * t.element_size():
                crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
                crow[1:] = torch.bincount(nz[:, 0], minlength=rows.shape[0]).cumsum(0)
                tensors[key + ".values"] = rows[nz[:, 0], nz[:, 1]].contiguous()
                tensors[key + ".crow_indices"] = crow.to(torch.int32)
                tensors[key + ".col_indices"] = nz[:, 1].to(torch.int32).contiguous()
                shapes[key] = list(t.shape)
                continue
        tensors[key] = t.contiguous()
    return tensors, shapes, nonzeros


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file written by :func:`export_run`; one-line errors."""
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise DynsparseError(f"{path} not found (expected a file written by `dynsparse export`)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own error type for damaged headers and data
        detail = (str(e).splitlines() or [""])[0][:160]
        raise DynsparseError(f"{p} is not a readable safetensors file ({type(e).__name__}"
                             f"{': ' + detail if detail else ''}): truncated or not written by dynsparse "
                             "export") from None
    if meta.get("format") not in (SPARSE_FORMAT, DENSE_FORMAT):
        raise DynsparseError(f"{p} is not a dynsparse export (no dynsparse format in its metadata)")
    return tensors, meta


def load_sparse(path: str | Path, dense: bool = False) -> dict[str, torch.Tensor]:
    """A file written by ``dynsparse export`` as a ``state_dict``: sparse weights as dense tensors
    (``dense=True``; loads into the ordinary architecture) or as ``torch.sparse_csr`` tensors
    (2-D weights; others of more dims come back dense)."""
    tensors, meta = read_file(path)
    try:
        shapes = json.loads(meta.get("sparse") or "{}")
        out = {}
        for key, t in tensors.items():
            owner = key.rsplit(".", 1)[0]
            if owner in shapes:
                if key.endswith(".values"):
                    out[owner] = _sparse_entry(tensors, owner, torch.Size(shapes[owner]), dense)
                continue
            out[key] = t
    except (KeyError, ValueError, RuntimeError) as e:
        raise DynsparseError(f"{path}: damaged sparse tensors ({type(e).__name__}: {str(e)[:160]})") from None
    return out


def _sparse_entry(tensors: dict, name: str, shape: torch.Size, dense: bool) -> torch.Tensor:
    crow, col, values = (tensors[f"{name}.{k}"] for k in ("crow_indices", "col_indices", "values"))
    rows, cols = shape[0], shape.numel() // shape[0]
    csr = torch.sparse_csr_tensor(crow.long(), col.long(), values, (rows, cols), check_invariants=True)
    if dense or len(shape) != 2:
        return csr.to_dense().view(shape)
    return csr


def architecture(path: str | Path) -> dict:
    """The architecture recorded in an exported file (``create_model`` arguments)."""
    return json.loads(read_file(path)[1]["architecture"])


def load_model(path: str | Path, *, backend: str = "auto", batch_size: int = 1):
    """The exported model ready for CPU serving: its recorded architecture built on the 'meta'
    device (no dense weight is ever allocated), the file's weights loaded, sparse linear layers as
    CSR (:func:`~dynsparse.sparse.inference.sparse_inference`), in eval mode."""
    from dynsparse.models import create_model
    from dynsparse.sparse.inference import sparse_inference
    arch = json.loads(read_file(path)[1]["architecture"])
    with torch.device("meta"):
        model = create_model(arch["model"], num_classes=arch["num_classes"], layers=arch.get("layers", 28),
                             widen_factor=arch.get("widen_factor", 10.0), batch_norm=not arch.get("no_batch_norm"),
                             hidden_sizes=tuple(arch.get("hidden_sizes") or (300, 100)))
    return sparse_inference(model, load_sparse(path), backend=backend, batch_size=batch_size)
