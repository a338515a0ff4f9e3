"""The CSR linear layer's compiled products (numba) against PyTorch's and a dense masked layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynsparse.errors import DynsparseError
from dynsparse.sparse.kernels import csr_linear as csr_kernels
from dynsparse.sparse.layers.csr_functions import batch_norm_relu, linear, spmm
from dynsparse.sparse.layers.csr_linear import CSRLinear, CSRWeight


@pytest.fixture
def mode():
    """Restores the kernel mode a test sets."""
    previous = csr_kernels.get_mode()
    yield csr_kernels.set_mode
    csr_kernels.set_mode(previous)


def _weight(out_f: int, in_f: int, density: float, seed: int, empty_rows=()) -> CSRWeight:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[list(empty_rows)] = False
    mask.view(-1)[0] = True  # never an empty layer
    return CSRWeight.from_dense(torch.randn(out_f, in_f, generator=g), mask)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale


SHAPES = [(7, 5, 0.5, 1, ()), (13, 11, 0.3, 3, (0, 4, 12)), (33, 17, 0.2, 19, (5,)), (3, 40, 0.9, 2, (1,)),
          (64, 48, 0.05, 128, ())]


@pytest.mark.parametrize("out_f,in_f,density,batch,empty_rows", SHAPES)
def test_kernels_equal_pytorch_products(out_f, in_f, density, batch, empty_rows):
    pytest.importorskip("numba")
    w = _weight(out_f, in_f, density, out_f * 7 + batch, empty_rows)
    g = torch.Generator().manual_seed(batch)
    xt, dyt = torch.randn(in_f, batch, generator=g), torch.randn(out_f, batch, generator=g)
    v = w.values.detach()
    _close(csr_kernels.spmm(w.crow_indices, w.col_indices, v, xt), spmm(w.crow_indices, w.col_indices, v, xt))
    _close(csr_kernels.spmm_t(w.t_crow, w.t_col, w.t_perm, v, dyt),
           spmm(w.t_crow, w.t_col, v.index_select(0, w.t_perm), dyt))
    pattern = torch.sparse_csr_tensor(w.crow_indices, w.col_indices, v, w.shape, check_invariants=False)
    _close(csr_kernels.sddmm(w.crow_indices, w.col_indices, dyt, xt),
           torch.sparse.sampled_addmm(pattern, dyt, xt.t(), beta=0.0).values())
    # and the definition: the dense products at the active positions
    flat = w.active_flat()
    _close(csr_kernels.sddmm(w.crow_indices, w.col_indices, dyt, xt), (dyt @ xt.t()).view(-1)[flat])
    _close(csr_kernels.spmm(w.crow_indices, w.col_indices, v, xt), w.to_dense() @ xt)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 6])
def test_layer_gradients_match_dense_masked_layer(mode, bias, batch):
    """Forward, input gradient, weight gradient at the active entries and bias gradient of a
    CSR layer on the compiled kernels equal a dense layer whose weight is zero off the mask."""
    pytest.importorskip("numba")
    mode("numba")
    w = _weight(9, 14, 0.4, batch, empty_rows=(2,))
    layer = CSRLinear(14, 9, bias=bias, weight=w)
    if bias:
        layer.bias.data.normal_()
    dense_w = w.to_dense().requires_grad_()
    dense_b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 14, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(batch, 9, generator=g)
    y = layer(x1)
    ref = F.linear(x2, dense_w, dense_b)
    _close(y, ref)
    (y * gy).sum().backward()
    (ref * gy).sum().backward()
    _close(x1.grad, x2.grad)
    _close(w.values.grad, dense_w.grad.view(-1)[w.active_flat()])
    if bias:
        _close(layer.bias.grad, dense_b.grad)


def test_mlp_step_same_with_and_without_kernels(mode):
    """The MLP path (CSR products, dense output layer on the feature-major layout, batch norm +
    ReLU fused) gives PyTorch's answers: loss, every gradient, running statistics."""
    pytest.importorskip("numba")
    from dynsparse.models import MnistMLP
    torch.manual_seed(0)
    model = MnistMLP(hidden_sizes=(37, 23), sparse_density=0.3)
    x, y = torch.randn(5, 784), torch.randint(0, 10, (5,))
    got = {}
    for m in ("torch", "numba"):
        mode(m)
        torch.manual_seed(1)
        clone = MnistMLP(hidden_sizes=(37, 23), sparse_density=0.3)
        clone.load_state_dict(model.state_dict())
        loss = F.cross_entropy(clone(x), y)
        loss.backward()
        got[m] = (loss.detach(), [p.grad for p in clone.parameters()], [b.clone() for b in clone.buffers()])
    _close(got["numba"][0], got["torch"][0])
    for a, b in zip(got["numba"][1], got["torch"][1]):
        _close(a, b, rel=1e-4)  # batch norm's backward sums differently in the fused kernel
    for a, b in zip(got["numba"][2], got["torch"][2]):
        if a.is_floating_point():
            _close(a, b)
        else:
            assert torch.equal(a, b)


def test_auto_runs_compiled_only_where_measured_faster(mode):
    """``auto``: the weight gradient of large layers only; small layers (the bit-identity check's
    784->300 at density 0.1, batch 50) keep PyTorch's products and their exact sums."""
    mode("auto")
    small = torch.zeros(23520)
    large = torch.zeros(1_000_000)
    assert not any(csr_kernels.choose(op, small, 50) for op in csr_kernels.OPS)
    assert csr_kernels.choose("weight_grad", large, 128) == csr_kernels.available()
    assert not csr_kernels.choose("forward", large, 128)
    assert not csr_kernels.choose("weight_grad", large.double(), 128)  # float32 only
    assert not csr_kernels.choose_fused(torch.zeros(50, 300))
    mode("torch")
    assert not csr_kernels.choose("weight_grad", large, 128)
    # mode torch keeps the earlier path: a dense layer on a feature-major input runs as the module
    lin = torch.nn.Linear(6, 3)
    h = torch.randn(6, 4).t()
    assert torch.equal(linear(lin, h), lin(h))
    bn = torch.nn.BatchNorm1d(6)
    assert torch.equal(batch_norm_relu(bn, h), F.relu(bn(h.t().unsqueeze(0)).squeeze(0).t()))


def test_bad_mode_and_missing_numba(mode, monkeypatch):
    with pytest.raises(DynsparseError, match="valid choices: auto, numba, torch"):
        mode("fast")
    monkeypatch.setattr(csr_kernels, "_available", False)
    with pytest.raises(DynsparseError, match=r"pip install 'dynsparse\[kernels\]'"):
        mode("numba")
    mode("auto")  # auto without numba: PyTorch's products, silently the same answers
    assert not csr_kernels.choose("weight_grad", torch.zeros(1_000_000), 128)
    layer = CSRLinear(8, 4, density=0.5)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.weight.values.grad is not None
