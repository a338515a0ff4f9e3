"""The truly sparse CSR weight: products, optimizers, topology changes, construction, checkpoints."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.models import MnistMLP
from dynsparse.sparse.layers.csr_functions import SparseLinearFunction
from dynsparse.sparse.layers.csr_linear import (
    CSRLinear,
    CSRWeight,
    csr_linear_from_linear,
    dense_state_dict,
    sample_flat,
)
from dynsparse.training.config import TrainConfig


def pair(out=6, inp=9, density=0.4, bias=True, seed=0, dtype=torch.float32):
    """An nn.Linear with zeros off a random mask, and the CSRLinear holding the same values."""
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias).to(dtype)
    mask = torch.rand(out, inp) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask, csr_linear_from_linear(lin, mask)


def test_gradcheck_float64():
    _, _, m = pair(dtype=torch.float64)
    w = m.weight
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    v = w.values.detach().clone().requires_grad_()
    fn = lambda x, v: SparseLinearFunction.apply(x, v, w.crow_indices, w.col_indices, w.t_perm,  # noqa: E731
                                                 w.t_crow, w.t_col, w.shape, None)
    assert torch.autograd.gradcheck(fn, (x, v))


def test_forward_and_gradients_match_masked_dense_with_batch_dims():
    lin, mask, m = pair(out=17, inp=23, density=0.3)
    x = torch.randn(2, 5, 23)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(2, 5, 17)
    ref = F.linear(x1, lin.weight * mask, lin.bias)
    y = m(x2)
    assert y.shape == (2, 5, 17)
    torch.testing.assert_close(y, ref)
    ref.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad)
    dense_grad = torch.zeros(17 * 23)
    dense_grad[m.weight.active_flat()] = m.weight.values.grad
    torch.testing.assert_close(dense_grad.view(17, 23), lin.weight.grad * mask)
    torch.testing.assert_close(m.bias.grad, lin.bias.grad)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd-momentum", "adam", "adamw"])
def test_optimizer_steps_equal_masked_linear(make_opt):
    lin, mask, m = pair(out=12, inp=20, density=0.25)
    opt_dense, opt_csr = make_opt(lin.parameters()), make_opt(m.parameters())
    g = torch.Generator().manual_seed(3)
    for _ in range(15):
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 12, (8,), generator=g)
        for model, opt in ((lin, opt_dense), (m, opt_csr)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if model is lin:
                lin.weight.grad.mul_(mask)  # the masked engine's contract: zero gradient off the mask
            opt.step()
        if isinstance(opt_dense, torch.optim.AdamW):
            with torch.no_grad():
                lin.weight.mul_(mask)  # decoupled decay of a zero stays zero; keep exact anyway
    torch.testing.assert_close(m.weight.to_dense(), lin.weight.detach() * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bias, lin.bias)


def test_set_topology_keeps_survivors_state_and_zeroes_new():
    _, _, m = pair(out=8, inp=10, density=0.5)
    w = m.weight
    for opt in (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(m.parameters(), lr=0.1)):
        m(torch.randn(4, 10)).sum().backward()
        opt.step()
        param = w.values
        state_before = {k: v.clone() for k, v in opt.state[param].items()}
        values_before, flat_before = w.values.detach().clone(), w.active_flat()
        keep = torch.ones(w.num_active, dtype=torch.bool)
        keep[::3] = False
        inactive = torch.tensor(sorted(set(range(80)) - set(flat_before.tolist())))
        add = inactive[[4, 0, 2]]  # unsorted on purpose
        w.set_topology(keep, add, add_values=torch.tensor([7.0, 8.0, 9.0]), optimizer=opt)
        assert w.values is param  # the optimizer still holds the same parameter object
        flat = w.active_flat()
        assert torch.equal(flat, torch.sort(torch.cat([flat_before[keep], add])).values)
        pos = {int(f): i for i, f in enumerate(flat)}
        for i, f in enumerate(flat_before.tolist()):
            if keep[i]:
                assert w.values[pos[f]] == values_before[i]
                for k, t in state_before.items():
                    if t.dim() == 1:
                        assert opt.state[param][k][pos[f]] == t[i]
        for f, v in zip(add.tolist(), (7.0, 8.0, 9.0)):
            assert w.values[pos[f]] == v
            for t in opt.state[param].values():
                if t.dim() == 1:
                    assert t[pos[f]] == 0
        if "step" in state_before:
            assert torch.equal(opt.state[param]["step"], state_before["step"])
        # the products use the new topology
        x = torch.randn(3, 10)
        torch.testing.assert_close(m(x), F.linear(x, w.to_dense(), m.bias))
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()  # state and parameter shapes agree


def test_same_answers_as_masked_with_topology_changes():
    """SGD momentum, a DSR-like prune-and-regrow every 4 steps: the masked layer (momentum zeroed
    off the mask, new weights zero) and the CSR layer follow the same trajectory."""
    lin, mask, m = pair(out=10, inp=16, density=0.3)
    opt_d = torch.optim.SGD(lin.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g, gt = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses = []
    for step in range(1, 25):
        x, y = torch.randn(6, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
        pair_losses = []
        for model, opt in ((lin, opt_d), (m, opt_c)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if model is lin:
                lin.weight.grad.mul_(mask)
            opt.step()
            pair_losses.append(loss.item())
        losses.append(pair_losses)
        if step % 4 == 0:
            w = m.weight
            k = 3
            drop = torch.topk(w.values.detach().abs(), k, largest=False).indices
            keep = torch.ones(w.num_active, dtype=torch.bool)
            keep[drop] = False
            dropped = torch.sort(w.active_flat()[drop]).values
            add = w.sample_inactive(k, gt, exclude=dropped)
            w.set_topology(keep, add, optimizer=opt_c)
            flat_mask = mask.view(-1)
            flat_mask[dropped] = False
            flat_mask[add] = True
            with torch.no_grad():
                lin.weight.view(-1)[dropped] = 0.0
                lin.weight.view(-1)[add] = 0.0
                opt_d.state[lin.weight]["momentum_buffer"].mul_(mask)
            assert torch.equal(mask.view(-1).nonzero().view(-1), w.active_flat())
    torch.testing.assert_close(torch.tensor(losses)[:, 1], torch.tensor(losses)[:, 0])
    torch.testing.assert_close(m.weight.to_dense(), lin.weight.detach(), rtol=1e-5, atol=1e-6)


def test_set_topology_rejects_bad_input():
    _, _, m = pair()
    w = m.weight
    keep = torch.ones(w.num_active, dtype=torch.bool)
    with pytest.raises(DynsparseError, match="stay active"):
        w.set_topology(keep, w.active_flat()[:1])
    with pytest.raises(DynsparseError, match="distinct"):
        w.set_topology(keep, torch.tensor([w.num_entries]))
    with pytest.raises(DynsparseError, match="keep must be"):
        w.set_topology(keep[1:], torch.tensor([], dtype=torch.long))


def test_random_construction_exact_count_and_no_dense_tensor():
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    w = CSRWeight.random(200_000, 200_000, 1e-6, g)  # a dense float tensor would be 160 GB
    assert time.perf_counter() - t0 < 5
    assert w.num_active == int(1e-6 * 200_000**2 + 0.1) == 40_000
    flat = w.active_flat()
    assert bool((flat[1:] > flat[:-1]).all()) and int(flat[-1]) < w.num_entries
    bound = 1 / 200_000**0.5
    assert float(w.values.detach().abs().max()) <= bound
    small = CSRWeight.random(30, 40, 0.3, torch.Generator().manual_seed(1))
    assert small.num_active == 360
    assert small.to_dense().count_nonzero() == 360


def test_sample_flat_is_uniform_and_respects_exclude():
    g = torch.Generator().manual_seed(0)
    exclude = torch.tensor([0, 3, 5])
    counts = torch.zeros(10)
    for _ in range(2000):
        s = sample_flat(10, 3, g, exclude=exclude)
        assert s.numel() == 3 and not set(s.tolist()) & {0, 3, 5}
        counts[s] += 1
    free = counts[[1, 2, 4, 6, 7, 8, 9]]
    assert counts[[0, 3, 5]].sum() == 0
    assert float(free.min()) > 0.8 * 2000 * 3 / 7  # each free slot ~857 times
    assert sample_flat(10, 7, g, exclude=exclude).tolist() == [1, 2, 4, 6, 7, 8, 9]
    with pytest.raises(DynsparseError, match="only 7"):
        sample_flat(10, 8, g, exclude=exclude)


def test_state_dict_round_trip_and_different_nnz():
    _, _, a = pair(out=10, inp=12, density=0.5, seed=1)
    _, _, b = pair(out=10, inp=12, density=0.1, seed=2)
    sd = a.state_dict()
    assert set(sd) == {"weight.values", "weight.crow_indices", "weight.col_indices", "bias"}
    b.load_state_dict(sd)
    assert b.weight.num_active == a.weight.num_active != 0
    torch.testing.assert_close(b.weight.to_dense(), a.weight.to_dense())
    x = torch.randn(5, 12)
    torch.testing.assert_close(b(x), a(x))
    b(x).sum().backward()  # transpose indices were rebuilt for the new pattern
    assert b.weight.values.grad.shape == b.weight.values.shape
    _, _, wrong = pair(out=11, inp=12)
    with pytest.raises(RuntimeError, match="crow_indices"):
        wrong.load_state_dict(sd)


def test_export_dense_and_sparse():
    lin, mask, m = pair()
    torch.testing.assert_close(m.weight.to_dense(), lin.weight.detach() * mask)
    sp = m.weight.to_sparse_csr()
    assert sp.layout == torch.sparse_csr
    torch.testing.assert_close(sp.to_dense(), lin.weight.detach() * mask)
    model = nn.Sequential(m)
    dense = dense_state_dict(model)
    assert set(dense) == {"0.weight", "0.bias"}
    torch.testing.assert_close(dense["0.weight"], lin.weight.detach() * mask)


def test_dense_grad_rows_equals_dense_gradient():
    lin, mask, m = pair(out=14, inp=11, density=0.3)
    lin.weight.data = lin.weight.data.clone()  # dense reference gradient of the full weight
    x = torch.randn(3, 4, 11)
    m.weight.capture_gradient()
    F.linear(x, lin.weight, lin.bias).pow(2).sum().backward()
    m(x).pow(2).sum().backward()
    full = torch.cat([m.weight.dense_grad_rows(a, min(a + 5, 14)) for a in range(0, 14, 5)])
    torch.testing.assert_close(full, lin.weight.grad)
    assert torch.equal(m.weight.mask_rows(3, 9), mask[3:9])
    m.weight.release_gradient()
    with pytest.raises(DynsparseError, match="capture_gradient"):
        m.weight.dense_grad_rows(0, 1)


def test_adam_on_values_parameter_and_csr_linear_default_init():
    m = CSRLinear(50, 40, density=0.1, generator=torch.Generator().manual_seed(0))
    assert m.weight.num_active == 200
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    m(torch.randn(2, 50)).sum().backward()
    opt.step()
    assert opt.state[m.weight.values]["exp_avg"].shape == (200,)


def test_mnist_mlp_hidden_sizes_and_sparse_construction():
    m = MnistMLP(hidden_sizes=(64, 32, 16))
    assert m.sparse_parameter_names() == ["fc1.weight", "fc_int.weight", "fc_int2.weight", "fc2.weight"]
    assert m(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    wide = MnistMLP(hidden_sizes=(100_000, 100_000), sparse_density=1e-4)
    assert wide.fc_int.weight.num_active == 1_000_000  # a dense fc_int would be 40 GB
    assert wide.sparse_parameter_names() == ["fc1.weight", "fc_int.weight", "fc2.weight"]
    with pytest.raises(DynsparseError, match="hidden_sizes"):
        MnistMLP(hidden_sizes=(10, 0))


def test_hidden_sizes_config():
    assert TrainConfig(hidden_sizes="1000, 500").hidden_sizes == (1000, 500)
    assert TrainConfig(hidden_sizes=[7]).hidden_sizes == (7,)
    with pytest.raises(DynsparseError, match="comma-separated"):
        TrainConfig(hidden_sizes="10,x")
    with pytest.raises(DynsparseError, match="for mnist_mlp"):
        TrainConfig(model="cifar10_WideResNet", hidden_sizes=(10,)).validate()
    with pytest.raises(DynsparseError, match="positive"):
        TrainConfig(hidden_sizes="").validate()


def test_prefer_csr_follows_the_measured_crossover():
    from dynsparse.sparse.layers.csr_linear import CROSSOVER_DENSITY, prefer_csr
    for batch, limit in CROSSOVER_DENSITY.items():
        assert prefer_csr(limit * 0.9, batch) and not prefer_csr(limit * 1.1, batch)
    assert prefer_csr(0.001, 10**6) and not prefer_csr(0.9, 1)


def test_prefer_csr_conv_follows_the_crossover_of_the_layers_class():
    from dynsparse.sparse.storage.convert import CONV_CROSSOVER_DENSITY, WIDE_FAN_IN, prefer_csr_conv
    for (k, stride, wide), limit in CONV_CROSSOVER_DENSITY.items():
        fan_in = WIDE_FAN_IN + 1 if wide else WIDE_FAN_IN
        assert prefer_csr_conv(limit * 0.9, k, stride, fan_in) and not prefer_csr_conv(limit * 1.1, k, stride, fan_in)
    # a ResNet's late 3x3 layers (512 channels: fan-in 4608) cross over lower than the WRN's 64-channel ones
    assert CONV_CROSSOVER_DENSITY[(3, 1, True)] < CONV_CROSSOVER_DENSITY[(3, 1, False)]
    assert not prefer_csr_conv(0.01, 5, 1, 100)  # a shape never measured: masked


def test_merge_sorted_is_the_sorted_union():
    from dynsparse.sparse.layers.csr_functions import merge_sorted
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.unique(torch.randint(0, 50, (30,), generator=g))
        b = torch.unique(torch.randint(0, 50, (5,), generator=g))
        assert torch.equal(merge_sorted(a, b), torch.unique(torch.cat([a, b])))
    empty = torch.empty(0, dtype=torch.long)
    assert torch.equal(merge_sorted(empty, torch.tensor([3])), torch.tensor([3]))


def test_sparse_mlp_exports_to_the_dense_models_state_dict():
    torch.manual_seed(0)
    sparse = MnistMLP(hidden_sizes=(40, 20), sparse_density=0.3).eval()
    dense = MnistMLP(hidden_sizes=(40, 20)).eval()
    dense.load_state_dict(dense_state_dict(sparse))  # strict: same names and shapes
    x = torch.randn(7, 784)
    torch.testing.assert_close(dense(x), sparse(x))
    assert int((dense.fc_int.weight != 0).sum()) == sparse.fc_int.weight.num_active == int(0.3 * 800 + 0.1)


def test_spmm_equals_the_dense_product_with_empty_and_full_rows():
    from dynsparse.sparse.layers.csr_functions import csr_from_flat, spmm
    torch.manual_seed(0)
    mask = torch.rand(7, 11) < 0.3
    mask[2] = False  # an empty row sums nothing
    mask[5] = True   # a full row
    dense = torch.randn(7, 11, dtype=torch.float64) * mask
    flat = torch.nonzero(mask.reshape(-1)).view(-1)
    crow, col = csr_from_flat(flat, (7, 11))
    d = torch.randn(11, 4, dtype=torch.float64)
    out = spmm(crow, col, dense.reshape(-1)[flat], d)
    assert out.shape == (7, 4) and out.is_contiguous()
    assert torch.allclose(out, dense @ d, atol=1e-12)
    assert bool((out[2] == 0).all())


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_on_a_feature_major_view_equals_the_ordinary_one(train):
    from dynsparse.sparse.layers.csr_functions import batch_norm, feature_major
    torch.manual_seed(0)
    a, b = nn.BatchNorm1d(5), nn.BatchNorm1d(5)
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
            m.running_mean.fill_(0.3)
    a.train(train), b.train(train)
    base = torch.randn(5, 8) * 3 + 1  # [C, B] contiguous, as a CSR layer computes it
    h1 = base.clone().requires_grad_()
    h2 = base.clone().requires_grad_()
    assert feature_major(h1.t()) and not feature_major(h2.t().contiguous())
    out1 = batch_norm(a, h1.t())
    out2 = b(h2.t().contiguous())
    assert feature_major(out1)  # the layout travels on to the next sparse layer
    assert torch.allclose(out1, out2, atol=1e-6)
    assert torch.allclose(a.running_mean, b.running_mean, atol=1e-7)
    assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
    if train:
        g = torch.randn(8, 5)
        (out1 * g).sum().backward()
        (out2 * g).sum().backward()
        assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
        assert torch.allclose(a.weight.grad, b.weight.grad, atol=1e-5)
        assert torch.allclose(a.bias.grad, b.bias.grad, atol=1e-5)
    # anything but a BatchNorm1d on a feature-major input is called as it is (no transposed detour)
    view = h1.t()
    assert batch_norm(nn.Identity(), view) is view
    row_major = h2.t().contiguous()
    out = batch_norm(b, row_major)
    assert out.is_contiguous() and not feature_major(out)


def test_set_topology_builds_the_pattern_a_fresh_weight_has():
    """Random drops and adds (including entries just dropped, empty rows and full rows): the
    row pointer, columns, values and transpose equal those of a weight built from scratch."""
    g = torch.Generator().manual_seed(3)
    w = CSRWeight.random(9, 13, 0.4, g)
    for _ in range(20):
        flat, vals = w.active_flat(), w.values.detach().clone()
        keep = torch.rand(w.num_active, generator=g) < 0.7
        free = torch.tensor(sorted(set(range(w.num_entries)) - set(flat[keep].tolist())))
        add = free[torch.randperm(free.numel(), generator=g)[: int(torch.randint(0, 12, (1,), generator=g))]]
        add_vals = torch.randn(add.numel(), generator=g)
        if not keep.any() and not add.numel():
            continue
        w.set_topology(keep, add, add_values=add_vals)
        order = torch.argsort(torch.cat([flat[keep], add]))
        fresh = CSRWeight((9, 13), torch.cat([flat[keep], add])[order], torch.cat([vals[keep], add_vals])[order])
        for name in ("crow_indices", "col_indices", "t_perm", "t_crow", "t_col"):
            assert torch.equal(getattr(w, name), getattr(fresh, name)), name
        assert torch.equal(w.values.detach(), fresh.values.detach())
        assert torch.equal(w.to_dense(), fresh.to_dense())
