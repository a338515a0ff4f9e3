"""RigL, SNFS, MEST and the ER/ERK budgets: exact toy cases, the engine's on masked and CSR storage."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse import MEST, SNFS, Periodic, RigL, Sparsifier, cosine_fraction, erk_densities, make_densities

STORAGES = ["masked", "csr"]


def two_by_four(n=1):
    return nn.Sequential(*[nn.Linear(4, 2, bias=False) for _ in range(n)])


def setup(model, policy, masks, weights, backend="masked", optimizer=None):
    """Masks at the weights' nonzeros, through the public constructor (no storage internals)."""
    with torch.no_grad():
        for i, w in enumerate(weights):
            model[i].weight.copy_(torch.tensor(w).view(2, 4))
    s = Sparsifier(model, optimizer, policy=policy, init="from_weights", backend=backend)
    assert {sp.storage for sp in s.params.values()} == {backend}
    assert [mask(s, f"{i}.weight") for i in range(len(masks))] == masks
    return s


def mask(s, name):
    saved = s.params[name].topology()  # a bool mask (masked storage) or sorted flat indices (CSR)
    if saved.dtype != torch.bool:
        saved = torch.zeros(s.params[name].num_entries, dtype=torch.bool).index_fill_(0, saved, True)
    return saved.view(-1).int().tolist()


def backward_with_gradient(model, grad: list[float]) -> None:
    """A backward pass whose weight gradient is exactly ``grad`` (2x4), on either storage: inputs
    ``x = grad`` (two rows) and loss ``y[0, 0] + y[1, 1]``, so ``dL/dW = I^T x``."""
    y = model(torch.tensor(grad).view(2, 4))
    torch.diagonal(y).sum().backward()


def test_cosine_fraction():
    assert cosine_fraction(0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_fraction(0.3, 50, 100) == pytest.approx(0.15)
    assert cosine_fraction(0.3, 100, 100) == pytest.approx(0.0) == cosine_fraction(0.3, 500, 100)


@pytest.mark.parametrize("backend", STORAGES)
def test_rigl_drops_smallest_and_grows_largest_gradient(backend):
    model = two_by_four()
    s = setup(model, RigL(fraction=0.6, when=Periodic(1, end_step=10**6)), [[1, 1, 1, 1, 0, 0, 0, 0]],
              [[0.5, -0.1, 0.3, 0.05, 0, 0, 0, 0]], backend)
    backward_with_gradient(model, [0.0, 2.0, 0, 0, 0.1, -0.9, 0.5, 0.2])
    s.before_optimizer_step()  # the next step (1) is an update step: the dense gradient is read here
    s.step()
    # k = int(~0.6 * 4) = 2: drop |w| 0.05 and 0.1 (positions 3, 1); grow the largest |grad| among
    # the inactive, not the just-dropped position 1 (|grad| 2.0): positions 5 and 6
    assert mask(s, "0.weight") == [1, 0, 1, 0, 0, 1, 1, 0]
    assert s.params["0.weight"].masked_weight().view(-1)[5] == 0 and s.total_pruned == s.total_grown == 2


@pytest.mark.parametrize("backend", STORAGES)
def test_mest_drops_by_magnitude_plus_gradient(backend):
    model = two_by_four()
    s = setup(model, MEST(fraction=0.5, lam=1.0, when=Periodic(1, end_step=10**6)), [[1, 1, 1, 1, 0, 0, 0, 0]],
              [[0.5, -0.1, 0.3, 0.05, 0, 0, 0, 0]], backend)
    backward_with_gradient(model, [0.0, 0.0, -0.3, 0.5, 9.0, 9.0, 9.0, 9.0])  # off the mask: never read
    s.before_optimizer_step()
    s.step()
    # |w| + |grad| over the active: 0.5, 0.1, 0.6, 0.55 -> int(0.5 * 4) = 2 dropped: positions 1 and 0
    # (by magnitude alone, 3 and 1); as many grown at random among 4..7, never at 0 or 1
    m = mask(s, "0.weight")
    assert m[:4] == [0, 0, 1, 1] and sum(m[4:]) == 2 and s.total_pruned == s.total_grown == 2


def test_rigl_reads_gradients_only_before_update_steps_and_stops_at_end_step():
    model = two_by_four()
    s = Sparsifier(model, None, policy=RigL(0.5, when=Periodic(2, end_step=3)), densities={"0.weight": 0.5})
    model[0].weight.grad = torch.ones(2, 4)
    s.before_optimizer_step()  # step 1 is not an update step
    assert s.signals == {}
    s.step()
    s.before_optimizer_step()  # step 2 is
    assert set(s.signals) == {"0.weight"}
    s.step()
    for _ in range(4):  # steps 3..6 are at or after end_step: no update
        s.before_optimizer_step()
        s.step()
    assert len(s.drain_events()) == 1


def snfs_update(layer1_momentum: list[float], backend: str = "masked"):
    """Two 2x4 layers, 4 active entries each; layer 0's momentum is fixed, layer 1's given."""
    model = two_by_four(2)
    pol = SNFS(fraction=0.5, when=Periodic(1, end_step=10**6))
    s = setup(model, pol, [[1, 1, 1, 1, 0, 0, 0, 0]] * 2,
              [[0.5, 0.1, 0.4, 0.3, 0, 0, 0, 0], [0.5, 0.6, 0.7, 0.05, 0, 0, 0, 0]], backend)
    pol.momentum = {"0.weight": torch.tensor([1.0, 1, 1, 1, 0, 0.2, 0.8, 0.1]).view(2, 4),
                    "1.weight": torch.tensor(layer1_momentum).view(2, 4)}
    s.step_count = 0
    return s, pol.update(s.context())


@pytest.mark.parametrize("backend", STORAGES)
def test_snfs_redistributes_by_mean_momentum_and_grows_by_momentum(backend):
    s, (pruned, grown) = snfs_update([0.1, 0.1, 0.1, 0.1, 0.3, 0, 0, 0.05], backend)
    # each layer prunes int(0.5 * 4) = 2 smallest; 4 regrown in proportion 1.0 : 0.1 of mean
    # momentum -> 4 : 0 (largest remainder), all into layer 0's four free positions
    assert (pruned, grown) == (4, 4)
    assert mask(s, "0.weight") == [1, 0, 1, 0, 1, 1, 1, 1]
    assert mask(s, "1.weight") == [0, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("backend", STORAGES)
def test_snfs_growth_within_a_layer_follows_momentum(backend):
    s, _ = snfs_update([1.0, 1, 1, 1, 0.3, 0, 0, 0.05], backend)
    # equal importance -> 2 + 2; layer 0 grows momentum 0.8 and 0.2; layer 1 grows 0.3 and 0.05
    assert mask(s, "0.weight") == [1, 0, 1, 0, 0, 1, 1, 0]
    assert mask(s, "1.weight") == [0, 1, 1, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("backend", STORAGES)
def test_snfs_keeps_a_dense_momentum_of_the_gradient(backend):
    model = two_by_four()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # steps that change no weight: the same gradient
    s = setup(model, SNFS(beta=0.5, when=Periodic(100, end_step=10**6)), [[1, 1, 1, 1, 0, 0, 0, 0]],
              [[0.5, -0.1, 0.3, 0.05, 0, 0, 0, 0]], backend, opt)
    for _ in range(2):
        opt.zero_grad()
        backward_with_gradient(model, [1.0, -2, 0, 0, 0.5, 0, 0, 3])
        opt.step()
    expected = 1.5 * torch.tensor([1.0, -2, 0, 0, 0.5, 0, 0, 3]).view(2, 4)  # 0.5 * g + g, off the mask too
    assert torch.equal(s.policy.momentum["0.weight"], expected)


def test_update_period_overrides_the_schedule_and_snfs_defaults_to_one_epoch(tiny_mnist, tmp_path):
    model = two_by_four()
    s = Sparsifier(model, None, policy=SNFS(0.5, when=Periodic(3)), densities={"0.weight": 0.5})
    due = []
    for _ in range(7):
        model[0].weight.grad = torch.ones(2, 4)
        s.before_optimizer_step()
        s.step()
        due.append(len(s.drain_events()))
    assert due == [0, 0, 1, 0, 0, 1, 0]  # steps 3 and 6, not every step as the schedule says

    from dynsparse.cli.commands import parse_train_args
    from dynsparse.models import create_model
    from dynsparse.training.engine_adapter import build_sparsifier
    from dynsparse.training.epoch_schedules import load_schedules
    base = ["--data", str(tiny_mnist), "--initial-sparsity-fc", "0.9"]
    for extra, rigl_period, snfs_period in (([], 100, 37), (["--update-period", "5"], 5, 5)):
        got = []
        for method in ("--rigl", "--sparse-momentum"):
            cfg, _ = parse_train_args([*base, method, *extra])
            sp = build_sparsifier(cfg, create_model("mnist_mlp"), None, load_schedules(None), steps_per_epoch=37)
            got.append(sp.policy.when.period_at(0))
        assert got == [rigl_period, snfs_period]
    with pytest.raises(DynsparseError, match="--update-period is for mest, rigl, snfs; set takes its period"):
        parse_train_args([*base, "--rewire", "--update-period", "5"])
    with pytest.raises(DynsparseError, match="the update period must be >= 1 step"):
        parse_train_args([*base, "--rigl", "--update-period", "0"])


# ---- budgets -----------------------------------------------------------------------------------

SHAPES = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100), "conv": (64, 32, 3, 3), "tiny": (2, 2)}


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.3, 0.6])
def test_erk_densities_match_formula_cap_at_one_and_sum_to_budget(density):
    d = erk_densities(SHAPES, density)
    sizes = {n: math.prod(s) for n, s in SHAPES.items()}
    assert all(0 < v <= 1.0 for v in d.values())
    assert abs(sum(d[n] * sizes[n] for n in SHAPES) - density * sum(sizes.values())) < 1.0
    free = [n for n in SHAPES if d[n] < 1.0]
    ratios = {n: d[n] / (sum(SHAPES[n]) / math.prod(SHAPES[n])) for n in free}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))
    assert d["tiny"] == 1.0  # sum(dims)/prod(dims) = 1 for a 2x2 layer: always capped


def test_er_ignores_kernel_dims_and_uniform_is_uniform():
    er = erk_densities(SHAPES, 0.1, kernel=False)
    erk = erk_densities(SHAPES, 0.1)
    assert er["conv"] != erk["conv"]
    assert make_densities("uniform", SHAPES, 0.2) == {n: 0.2 for n in SHAPES}
    with pytest.raises(DynsparseError, match="unknown budget 'bogus'"):
        make_densities("bogus", SHAPES, 0.2)


def test_any_method_can_use_any_budget(tiny_mnist, tmp_path):
    from dynsparse.cli.commands import parse_train_args
    from dynsparse.training.run import run_training
    for method in (["--rewire", "--threshold-prune", "--rewire-scaling"], ["--rigl"], ["--sparse-momentum"]):
        cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "--epochs", "1", "-b", "16",
                                   "--initial-sparsity-fc", "0.9", "--budget", "erk", "--no-progress",
                                   "--name", method[0].lstrip("-"), *method])
        s = run_training(cfg)
        assert s["params_sparse"] == pytest.approx(0.1 * 266_200, abs=3)
        assert s["method"] == {"--rewire": "dsr", "--rigl": "rigl", "--sparse-momentum": "snfs"}[method[0]]


def test_dense_layers_option(tiny_mnist, tmp_path):
    from dynsparse.cli.commands import parse_train_args
    from dynsparse.training.run import run_training
    cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "--epochs", "1", "-b", "16",
                               "--initial-sparsity-fc", "0.9", "--dense-layers", "fc2.*", "--no-progress"])
    s = run_training(cfg)
    assert s["params_sparse_total"] == 266_200 - 1000
    cfg, _ = parse_train_args(["--dense-layers", "nope", "--data", str(tiny_mnist), "--runs-dir", str(tmp_path)])
    with pytest.raises(DynsparseError, match="matches no sparse layer"):
        run_training(cfg)


def test_training_flops_follow_the_rigl_paper():
    from dynsparse.experiments.flops import model_layer_flops, training_multiplier
    f = model_layer_flops({"model": "mnist_mlp"})
    assert f == {"fc1.weight": 2 * 784 * 300, "fc_int.weight": 2 * 300 * 100, "fc2.weight": 2 * 100 * 10}
    d = [{n: 0.1 for n in f}] * 4
    assert training_multiplier("dsr", f, d) == pytest.approx(0.1)
    assert training_multiplier("dense", f, []) == 1.0
    assert training_multiplier("snfs", f, d, update_end=1.0) == pytest.approx((2 * 0.1 + 1) / 3)
    assert training_multiplier("rigl", f, d, period=100,
                               update_end=1.0) == pytest.approx((3 * 0.1 * 100 + 2 * 0.1 + 1) / 101 / 3)
    wrn = model_layer_flops({"model": "cifar10_WideResNet", "layers": 28, "widen_factor": 2})
    assert wrn["conv1.weight"] == 2 * 27 * 16 * 32 * 32 and len(wrn) == 24 + 1 + 3 + 1


def test_erk_against_a_hand_computed_case():
    # raw scores sum(dims)/prod(dims): (4, 4) -> 8/16, (2, 8) -> 10/16; budget 0.25 * 32 = 8 weights;
    # eps = 8 / (8/16 * 16 + 10/16 * 16) = 4/9, so the densities are 2/9 and 5/18 (no cap)
    d = erk_densities({"a": (4, 4), "b": (2, 8)}, 0.25)
    assert d["a"] == pytest.approx(2 / 9) and d["b"] == pytest.approx(5 / 18)
    # a (1, 1) layer scores 2 > 1: it is made dense and the rest share what is left
    d = erk_densities({"a": (4, 4), "tiny": (1, 1)}, 0.5)
    assert d["tiny"] == 1.0 and d["a"] == pytest.approx((0.5 * 17 - 1) / 16)


def test_layer_flops_against_a_hand_count():
    from dynsparse.experiments.flops import layer_flops
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 5))
    # conv: 3x4x4 outputs, each 2*3*3 multiply-adds (2 FLOPs each); linear: 48*5 multiply-adds
    assert layer_flops(model, (2, 4, 4)) == {"0.weight": 2 * 18 * 48, "2.weight": 2 * 48 * 5}
