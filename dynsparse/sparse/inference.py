"""CPU serving of a sparse model: linear layers whose weight is mostly zero become CSR layers.

:func:`sparse_inference` turns a trained model (masked backend: ``nn.Linear`` with zeros off the
mask; csr backend: ``CSRLinear``; or a model built on the ``meta`` device plus the
``torch.sparse_csr`` weights of :func:`dynsparse.load_sparse`) into an eval-mode model whose
sparse linear layers are :class:`SparseInferenceLinear`: values + int32 CSR indices, memory and
time proportional to the nonzeros. A ``BatchNorm1d`` that directly follows such a layer (the MLP's
``fc_i`` -> ``bn_i``, or neighbours in an ``nn.Sequential``) is folded into its values and bias.

The product is chosen by batch size, as measured by ``benchmarks/bench_inference.py``: one row
is MKL's CSR matrix-vector product (``torch.mv``), a few rows MKL's CSR x dense product, more rows
the sum-``embedding_bag`` of :func:`~dynsparse.sparse.layers.csr_functions.spmm`. Convolutions stay dense.
Eval only: no gradient flows to the values (train with the ``csr`` backend instead).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse.layers.csr_functions import INDEX_DTYPE, spmm
from dynsparse.sparse.layers.csr_linear import CSRLinear

BACKENDS = ("auto", "csr")
MKL_MAX_ROWS = 8  # up to this batch MKL's CSR x dense product beats embedding_bag (the benchmark)

# Density below which a CSR layer answers faster than the dense one (MKL), by batch size, for a
# 4096x4096 layer, 1 thread, float32: the "crossover" of `python benchmarks/bench_inference.py
# --repeats 10` (benchmarks/results/inference.json), 0.365 at batch 1 in a run at commit ec68341
# (load average 11) and 0.446 at 6599ad6 (load 8): 0.4. At batch 8 and 64 CSR was still faster at
# 0.5, the densest density swept (1.1x and 1.2-1.7x), so ``auto`` stops there: denser layers stay
# dense. docs/deploy.md has the tables. ``auto`` reads this table.
INFERENCE_CROSSOVER: dict[int, float] = {1: 0.4, 8: 0.5, 64: 0.5}


def prefer_sparse(density: float, batch_size: int) -> bool:
    """Whether a layer at ``density`` answers faster as CSR at ``batch_size`` (log-interpolated
    between the measured batch sizes, clamped outside them)."""
    sizes = sorted(INFERENCE_CROSSOVER)
    b = min(max(batch_size, sizes[0]), sizes[-1])
    for lo, hi in zip(sizes, sizes[1:]):
        if lo <= b <= hi:
            t = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return density < math.exp((1 - t) * math.log(INFERENCE_CROSSOVER[lo])
                                      + t * math.log(INFERENCE_CROSSOVER[hi]))
    return density < INFERENCE_CROSSOVER[sizes[0]]


class SparseInferenceLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` as values + int32 CSR indices (buffers, no gradient)."""

    crow_indices: torch.Tensor  # buffers, declared for the type checker
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        if crow.numel() != self.out_features + 1 or col.numel() != values.numel():
            raise DynsparseError(f"CSR indices do not fit a {tuple(shape)} weight with {values.numel()} values")
        self.register_buffer("crow_indices", crow.to(INDEX_DTYPE).contiguous())
        self.register_buffer("col_indices", col.to(INDEX_DTYPE).contiguous())
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseInferenceLinear:
        csr = weight.detach().to_sparse_csr()
        return cls(csr.crow_indices(), csr.col_indices(), csr.values(), (weight.shape[0], weight.shape[1]), bias)

    @classmethod
    def from_csr(cls, csr: torch.Tensor, bias: torch.Tensor | None = None) -> SparseInferenceLinear:
        return cls(csr.crow_indices(), csr.col_indices(), csr.values(), (csr.shape[0], csr.shape[1]), bias)

    def _matrix(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.values.dtype)
        rows = x2.shape[0]
        if rows == 1:
            yt = torch.mv(self._matrix(), x2[0]).unsqueeze(1)
        elif rows <= MKL_MAX_ROWS:
            yt = self._matrix() @ x2.t().contiguous()
        else:  # transposed activations: a previous CSR layer's output needs no copy here
            yt = spmm(self.crow_indices, self.col_indices, self.values, x2.t().contiguous())
        if self.bias is not None:
            yt = yt.add_(self.bias.unsqueeze(1))
        # a transposed view: no copy, and the next CSR layer takes it as its operand without one
        return yt.t() if x.dim() == 2 else yt.t().reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}, "
                f"bias={self.bias is not None}")


def _fold(layer: SparseInferenceLinear, bn: nn.BatchNorm1d) -> None:
    """Fold an eval-mode ``BatchNorm1d`` that follows ``layer`` into its values and bias."""
    assert bn.running_var is not None and bn.running_mean is not None  # the caller folds tracking layers only
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = bn.weight.detach() / std if bn.affine else 1 / std
    shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
    rows = torch.repeat_interleave(torch.arange(layer.out_features), layer.crow_indices.long().diff())
    layer.values = layer.values * scale[rows].to(layer.values.dtype)
    bias = shift if layer.bias is None else layer.bias * scale + shift
    layer.bias = bias.to(layer.values.dtype)


def _pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, linear name, parent, norm name) of every linear followed directly by a BatchNorm1d."""
    out = []
    for _, m in model.named_modules():
        if isinstance(getattr(m, "fc_names", None), list):  # dynsparse's MLP: bn_i follows fc_i
            out += [(m, fc, m, f"bn{i}") for i, fc in enumerate(m.fc_names, start=1) if hasattr(m, f"bn{i}")]
        if isinstance(m, nn.Sequential):
            names = list(m._modules)
            out += [(m, a, m, b) for a, b in zip(names, names[1:])]
    return out


@torch.no_grad()
def sparse_inference(model: nn.Module, state: dict[str, torch.Tensor] | None = None, *, backend: str = "auto",
                     batch_size: int = 1, fold_batch_norm: bool = True) -> nn.Module:
    """``model`` in eval mode with its sparse linear layers as :class:`SparseInferenceLinear` (in
    place; returned for chaining). ``state``: a ``state_dict`` to load first, whose 2-D
    ``torch.sparse_csr`` tensors (``load_sparse(FILE)``) become CSR layers without a dense copy
    (``model`` may then be built on the ``meta`` device). ``backend``: ``"auto"`` converts a layer
    only where CSR is faster at ``batch_size`` (``INFERENCE_CROSSOVER``); ``"csr"`` every linear layer."""
    if backend not in BACKENDS:
        raise DynsparseError(f"unknown inference backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    state = dict(state or {})
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            key = f"{parent_name}.{name}" if parent_name else name
            layer = _convert(child, key, state, backend, batch_size)
            if layer is not None:
                setattr(parent, name, layer)
    if state:
        dense = {k: v for k, v in state.items() if not v.is_sparse_csr}
        missing = [k for k in model.state_dict() if k not in dense
                   and not any(k.startswith(p) for p in _csr_prefixes(model))]
        if missing:
            raise DynsparseError(f"the state does not fit this model: missing {', '.join(missing[:4])}")
        model.load_state_dict(dense, strict=False, assign=True)
    model.eval()
    if fold_batch_norm:
        for parent, a, _, b in _pairs(model):
            lin, bn = getattr(parent, a), getattr(parent, b)
            if isinstance(lin, SparseInferenceLinear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats \
                    and bn.running_var is not None and bn.running_var.device.type != "meta":
                _fold(lin, bn)
                setattr(parent, b, nn.Identity())
    return model


def _csr_prefixes(model: nn.Module) -> list[str]:
    return [f"{n}." for n, m in model.named_modules() if isinstance(m, SparseInferenceLinear)]


def _convert(child: nn.Module, key: str, state: dict, backend: str, batch_size: int) -> SparseInferenceLinear | None:
    if isinstance(child, CSRLinear):  # the csr training backend: its stored entries as they are
        w = child.weight
        return SparseInferenceLinear(w.crow_indices, w.col_indices, w.values, w.shape, child.bias)
    if not isinstance(child, nn.Linear):
        return None
    given = state.pop(key + ".weight", None)
    bias = state.pop(key + ".bias", None) if given is not None else None
    bias = child.bias if bias is None and child.bias is not None and child.bias.device.type != "meta" else bias
    if given is not None and given.is_sparse_csr:
        return SparseInferenceLinear.from_csr(given, bias)
    weight = child.weight if given is None else given
    if weight.device.type == "meta":
        raise DynsparseError(f"{key}.weight is on the meta device and no state gives it")
    density = float(weight.count_nonzero()) / weight.numel()
    if backend == "csr" or prefer_sparse(density, batch_size):
        return SparseInferenceLinear.from_dense(weight, bias)
    if given is not None:
        state[key + ".weight"] = given  # stays dense: loaded with the rest
        if bias is not None and child.bias is not None:
            state[key + ".bias"] = bias
    return None
