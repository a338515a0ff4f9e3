"""Gradual pruning, tied weights, regularizers and parameter accounting: exact toy cases."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse import AtEpochEnds, Sparsifier
from dynsparse.sparse.policies.pruning import GradualPruning, keep_count, scheduled_sparsity
from dynsparse.training.engine_adapter import mnist_output_layer_targets
from dynsparse.training.regularizers import sparsity_penalty
from dynsparse.training.tied_weights import TiedModel, uniform_coverage


def pruner(targets, n_entries=(1000,), **kw):
    model = nn.Sequential(*[nn.Linear(n, 1, bias=False) for n in n_entries])
    names = {f"{i}.weight": t for i, t in enumerate(targets)}
    s = Sparsifier(model, None, policy=GradualPruning(names, **kw), densities={n: 1.0 for n in names})
    return model, s


@pytest.mark.parametrize("cubic,expected", [
    (False, [631, 398, 251, 158, 100]),   # keep int(0.1 ** (i/5) * 1000 + 0.1)
    (True, [560, 294, 157, 107, 100]),    # keep int((1 - 0.9 (1 - (1 - i/5)^3)) * 1000 + 0.1)
])
def test_pruning_counts_are_exact_at_every_prune(cubic, expected):
    model, s = pruner([0.9], when=AtEpochEnds(start=0, every=1, count=5), cubic=cubic)
    counts = []
    for epoch in range(8):
        s.set_epoch(epoch)
        s.end_epoch()
        counts.append(s.params["0.weight"].num_active)
    assert counts == expected + [100, 100, 100]


def test_schedules_match_the_original_per_prune_fractions():
    s, n = 0.8, 20
    for i in range(n):
        exp_frac = 1 - (1 - scheduled_sparsity(s, i + 1, n, False)) / (1 - scheduled_sparsity(s, i, n, False))
        assert abs(exp_frac - (1 - (1 - s) ** (1 / n))) < 1e-12

        def mult(j, n=n):
            return (1 - j / n) ** 3
        original = 1 - (1 - s + s * mult(i + 1)) / (1 - s + s * mult(i))
        ours = 1 - (1 - scheduled_sparsity(s, i + 1, n, True)) / (1 - scheduled_sparsity(s, i, n, True))
        assert abs(original - ours) < 1e-12


def test_pruning_removes_the_smallest_and_happens_on_schedule():
    model, s = pruner([0.5], n_entries=(8,), when=AtEpochEnds(start=1, every=2, count=2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.8, -0.1, 0.5, 0.05, -0.7, 0.3, -0.2, 0.9]]))
    actives = []
    for epoch in range(6):
        s.set_epoch(epoch)
        s.end_epoch()
        actives.append(s.params["0.weight"].num_active)
    assert actives == [8, 5, 5, 4, 4, 4]  # prunes at the end of epochs 1 and 3: keep int(0.5 ** 0.5 * 8 + 0.1), then 4
    assert s.params["0.weight"].mask.view(-1).int().tolist() == [1, 0, 1, 0, 1, 0, 0, 1]


def test_global_threshold_prunes_the_globally_smallest():
    model, s = pruner([0.5, 0.5], n_entries=(4, 4), when=AtEpochEnds(start=0, every=1, count=1), global_threshold=True)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.01, 0.02, 0.03, 0.9]]))
        model[1].weight.copy_(torch.tensor([[0.5, 0.6, 0.7, 0.8]]))
    s.set_epoch(0)
    s.end_epoch()
    # 2 + 2 = 4 entries go, all taken where magnitudes are smallest: layer 0's three small ones + 0.5
    assert s.params["0.weight"].mask.view(-1).int().tolist() == [0, 0, 0, 1]
    assert s.params["1.weight"].mask.view(-1).int().tolist() == [0, 1, 1, 1]


def test_sparsity_never_decreases_under_pruning_with_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pol = GradualPruning({"0.weight": 0.9, "2.weight": 0.8}, when=AtEpochEnds(start=0, every=1, count=4), cubic=True)
    s = Sparsifier(model, opt, policy=pol, densities={"0.weight": 1.0, "2.weight": 1.0})
    g = torch.Generator().manual_seed(0)
    last = s.num_active_weights()
    for epoch in range(6):
        s.set_epoch(epoch)
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(torch.randn(8, 20, generator=g)),
                                               torch.randint(0, 5, (8,), generator=g))
            opt.zero_grad()
            loss.backward()
            s.before_optimizer_step()
            opt.step()
            s.step()
            assert s.num_active_weights() <= last
        s.end_epoch()
        assert s.num_active_weights() <= last
        last = s.num_active_weights()
    assert s.params["0.weight"].num_active == keep_count(600, 0.9) == 60
    assert s.params["2.weight"].num_active == keep_count(150, 0.8) == 30
    assert int((model[0].weight != 0).sum()) <= 60


def test_mnist_special_case_keeps_100_output_weights_and_the_budget():
    hidden, out = mnist_output_layer_targets(0.98)
    assert out == 0.9
    kept = (1 - hidden) * (784 * 300 + 300 * 100) + (1 - out) * 1000
    assert abs(kept - 0.02 * 266_200) < 1e-6


# ---- tied weights --------------------------------------------------------------------------

def test_uniform_coverage_uses_every_entry_floor_or_ceil_times():
    alloc = uniform_coverage(7, 50, torch.Generator().manual_seed(0))
    counts = torch.bincount(alloc, minlength=7)
    assert counts.sum() == 50 and set(counts.tolist()) <= {7, 8}


def test_tied_bank_size_coverage_and_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20, bias=False), nn.Conv2d(4, 6, 3, bias=False))
    tm = TiedModel(model, {"0.weight": 0.1, "1.weight": 0.25}, granularity=4)
    fc, conv = tm.tied["0.weight"], tm.tied["1.weight"]
    assert fc.bank.shape == (60,) and conv.bank.shape == (round(0.25 * 216),)
    assert set(torch.bincount(fc.alloc).tolist()) == {10}
    x = torch.randn(2, 30)
    assert torch.allclose(model[0](x), x @ fc.bank[fc.alloc].view(20, 30).T)
    assert tm.num_tied() == 60 + 54
    names = {n for n, _ in model.named_parameters()}
    assert names == {"0.tied_weight.bank", "1.tied_weight.bank"}


def test_tied_per_kernel_sharing_below_granularity_4():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, bias=False))
    tm = TiedModel(model, {"0.weight": 0.5}, granularity=2)
    tw = tm.tied["0.weight"]
    assert tw.bank.shape == (12, 3, 3) and tw.alloc.numel() == 24
    w = model[0].tied_weight()
    assert torch.equal(w[tw.alloc.view(6, 4) == 0], tw.bank[0].expand(2, 3, 3))


def test_rescale_tied_gradient_changes_the_step():
    def one_step(rescale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 4, bias=False))
        tm = TiedModel(model, {"0.weight": 0.25}, rescale_gradient=rescale)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = tm.tied["0.weight"].bank.detach().clone()
        model(torch.ones(3, 10)).pow(2).sum().backward()
        tm.before_optimizer_step()
        opt.step()
        return tm.tied["0.weight"].bank.detach() - before
    plain, rescaled = one_step(False), one_step(True)
    assert torch.allclose(rescaled, plain / 4.0) and not torch.allclose(rescaled, plain)


def test_tied_bad_density():
    with pytest.raises(DynsparseError, match="tied density"):
        TiedModel(nn.Sequential(nn.Linear(3, 3)), {"0.weight": 0.0})


# ---- regularizers ---------------------------------------------------------------------------

def test_l1_and_group_lasso():
    w4 = torch.zeros(2, 1, 3, 3)
    w4[0, 0] = 1.0  # one kernel of nine ones: group norm 3
    w2 = torch.tensor([[1.0, -2.0]])
    assert sparsity_penalty([w4, w2], 0.5) == pytest.approx(0.5 * (9 + 3))
    assert sparsity_penalty([w4, w2], 0.5, group_lasso=True) == pytest.approx(0.5 * (3 + 1e-6 + 3), rel=1e-5)
    assert sparsity_penalty([w4], 0.0) == 0.0
