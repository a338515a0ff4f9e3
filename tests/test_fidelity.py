"""Issue 11: the original's behaviour for --copy-mask-from, DeepR at density 1, --prune
--threshold-prune, --tied, SET with --rewire-scaling, bias init and the stop-rewire checkpoint."""
from __future__ import annotations

import torch

from dynsparse.models import create_model
from dynsparse.training.checkpoint import read_checkpoint


def test_no_bn_mlp_and_resnet_fc_biases_start_at_zero():
    torch.manual_seed(0)
    mlp = create_model("mnist_mlp", batch_norm=False)
    for fc in (mlp.fc1, mlp.fc_int, mlp.fc2):
        assert fc.bias is not None and torch.equal(fc.bias, torch.zeros_like(fc.bias))
    rn = create_model("imagenet_resnet50", widen_factor=0.125, num_classes=7)
    assert torch.equal(rn.fc.bias, torch.zeros(7))


# ---- 1. --copy-mask-from: fresh random-init values at every active position -------------------

def _run(tiny_mnist, runs, *extra):
    from dynsparse.cli.commands import parse_train_args
    from dynsparse.training.run import run_training
    argv = ["--model", "mnist_mlp", "--data", str(tiny_mnist), "--runs-dir", str(runs), "--batch-size", "16",
            "--epochs", "1", "--no-progress", "--initial-sparsity-fc", "0.9", *extra]
    return run_training(parse_train_args(argv)[0])


def _fresh(seed):
    torch.manual_seed(seed)
    return create_model("mnist_mlp").state_dict()


SPARSE = ("fc1.weight", "fc_int.weight", "fc2.weight")


def test_copied_mask_starts_from_the_unmasked_fresh_init(tiny_mnist, tmp_path):
    _run(tiny_mnist, tmp_path, "--rewire", "--name", "x", "--seed", "5")
    _run(tiny_mnist, tmp_path, "--copy-mask-from", str(tmp_path / "x"), "--name", "y", "--seed", "3")
    masks = read_checkpoint(tmp_path / "x" / "checkpoint.pt")["sparsifier"]["masks"]
    start = read_checkpoint(tmp_path / "y" / "initial.pt")
    fresh = _fresh(3)
    for n in SPARSE:
        m, w = masks[n], start["model"][n]
        assert torch.equal(start["sparsifier"]["masks"][n], m)
        assert torch.equal(w[m], fresh[n][m])  # every active weight: the fresh model's own value
        assert int((w[m] == 0).sum()) == 0 and int((w[~m] != 0).sum()) == 0


def test_copied_mask_with_resume_initial_starts_from_the_other_runs_init(tiny_mnist, tmp_path):
    schedule = tmp_path / "every_step.yaml"  # X rewires at every step, so its final mask is not its initial one
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 1\n")
    _run(tiny_mnist, tmp_path, "--rewire", "--rewire-fraction", "0.5", "--schedule-file", str(schedule),
         "--name", "x", "--seed", "5")
    _run(tiny_mnist, tmp_path, "--copy-mask-from", str(tmp_path / "x"), "--resume", str(tmp_path / "x_initial"),
         "--name", "y", "--seed", "3")
    masks = read_checkpoint(tmp_path / "x" / "checkpoint.pt")["sparsifier"]["masks"]
    start = read_checkpoint(tmp_path / "y" / "initial.pt")["model"]
    x_initial = read_checkpoint(tmp_path / "x" / "initial.pt")
    fresh_x = _fresh(5)
    for n in SPARSE:
        m = masks[n]
        assert torch.equal(start[n][m], fresh_x[n][m]) and int((start[n][m] == 0).sum()) == 0
        # where X's initial mask was on, that is exactly X's saved initial weight
        m0 = x_initial["sparsifier"]["masks"][n] & m
        assert torch.equal(start[n][m0], x_initial["model"][n][m0])
        assert int((m & ~x_initial["sparsifier"]["masks"][n]).sum()) > 0  # and positions X grew later


# ---- 2. DeepR: tensors at density 1.0 are skipped; signs after --big-new-weights growth --------

def _deepr_net(new_weights="zero"):
    from torch import nn

    from dynsparse.sparse import DeepR, Sparsifier
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 25, bias=False), nn.ReLU(), nn.Linear(25, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=2.0)  # large steps: many sign flips
    s = Sparsifier(model, opt, policy=DeepR(eta=0.01, temperature=lambda e: 1.0),
                   densities={"0.weight": 1.0, "2.weight": 0.5}, new_weights=new_weights)
    return model, opt, s


def _deepr_step(model, opt, s, g):
    loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 40, generator=g)),
                                             torch.randint(0, 4, (16,), generator=g))
    opt.zero_grad()
    loss.backward()
    s.before_optimizer_step()
    opt.step()
    s.step()


def test_deepr_leaves_a_dense_tensor_alone():
    model, opt, s = _deepr_net()
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        _deepr_step(model, opt, s, g)
    assert s.params["0.weight"].num_active == 1000 and bool(s.params["0.weight"].mask.all())
    assert s.params["2.weight"].num_active == 50
    assert s.total_pruned > 0 and s.total_pruned == s.total_grown  # the sparse tensor did rewire


def test_deepr_records_the_signs_of_big_new_weights():
    model, opt, s = _deepr_net("initial")
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        before = s.params["2.weight"].mask.clone()
        _deepr_step(model, opt, s, g)
        sp = s.params["2.weight"]
        grown = sp.mask & ~before
        signs = s.policy.signs["2.weight"]
        assert torch.equal(signs, torch.sign(sp.param.detach()).to(torch.int8))
        assert int((signs[grown] == 0).sum()) == 0  # a new weight has a value and so a sign
    assert s.total_grown > 0


# ---- 3. --prune --threshold-prune prunes per layer (the original); --global-prune is global -------

def _prune_config(*flags):
    from dynsparse.cli.commands import parse_train_args
    return parse_train_args(["--model", "mnist_mlp", "--prune", "--initial-sparsity-fc", "0",
                             "--prune-target-sparsity-fc", "0.5", "--prune-iterations", "1",
                             "--start-pruning-after-epoch", "0", *flags])[0]


def _pruned_densities(cfg):
    from dynsparse.training.engine_adapter import build_sparsifier
    from dynsparse.training.epoch_schedules import load_schedules
    torch.manual_seed(0)
    model = create_model("mnist_mlp")
    with torch.no_grad():  # fc1 far smaller than the others: a global threshold empties it first
        model.fc1.weight.mul_(1e-3)
    s = build_sparsifier(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), load_schedules(None))
    s.set_epoch(0)
    s.end_epoch()
    return s.densities()


def test_prune_with_threshold_prune_is_per_layer_as_the_original():
    per_layer = _pruned_densities(_prune_config("--threshold-prune"))
    assert per_layer == _pruned_densities(_prune_config())
    assert all(abs(d - 0.5) < 1e-3 for d in per_layer.values())


def test_global_prune_is_global_magnitude_pruning():
    dens = _pruned_densities(_prune_config("--global-prune"))
    # half of all 266,200 weights go, (almost) all from the tiny fc1: about 235,200 - 133,100 left there
    assert abs(dens["fc1.weight"] - 102_100 / 235_200) < 1e-3 and dens["fc_int.weight"] > 0.999
    import pytest

    from dynsparse.cli.commands import parse_train_args
    from dynsparse.errors import DynsparseError
    with pytest.raises(DynsparseError, match="--global-prune needs --prune"):
        parse_train_args(["--global-prune"])


# ---- 4. --tied shares per weight at every granularity, per kernel only with --tied-per-kernel ----

def test_tied_is_elementwise_by_default_and_per_kernel_on_request():
    from dynsparse.cli.commands import parse_train_args
    from dynsparse.training.engine_adapter import build_sparsifier
    from dynsparse.training.epoch_schedules import load_schedules

    def tied(*flags):
        cfg = parse_train_args(["--model", "cifar10_WideResNet", "--layers", "10", "--widen-factor", "1",
                                "--tied", "--initial-sparsity-conv", "0.5", *flags])[0]
        torch.manual_seed(0)
        model = create_model("cifar10_WideResNet", layers=10, widen_factor=1.0)
        tm = build_sparsifier(cfg, model, None, load_schedules(None))
        return tm.tied["block1.layer.0.conv1.weight"]
    # 16x16x3x3 = 2304 weights at density 0.5: 1152 shared scalars (the original at any granularity) ...
    assert tied().bank.shape == (1152,) and tied("--sub-kernel-granularity", "2").bank.shape == (1152,)
    # ... or, on request, 128 shared 3x3 kernels for the 256 kernel positions
    assert tied("--sub-kernel-granularity", "2", "--tied-per-kernel").bank.shape == (128, 3, 3)


# ---- 5. SET with --rewire-scaling; the stop-rewire checkpoint ----------------------------------

def test_set_with_rewire_scaling_regrows_in_proportion_to_survivors():
    from torch import nn

    from dynsparse.sparse import SET, Periodic, Sparsifier
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 10, bias=False), nn.Linear(10, 10, bias=False))
    s = Sparsifier(model, None, policy=SET(fraction=0.5, scaling=True, when=Periodic(1)),
                   densities={"0.weight": 0.5, "1.weight": 0.5})
    s.step()
    # each prunes int(0.5 n) + 1: 251 of 500 and 26 of 50, survivors 249 and 24; the 277 regrown go
    # 249/273 and 24/273 of 277: 252.65 -> 253 and 24.35 -> 24 (per tensor it would be 251 and 26)
    assert (s.params["0.weight"].num_active, s.params["1.weight"].num_active) == (249 + 253, 24 + 24)
    assert s.total_pruned == s.total_grown == 277
    from dynsparse.cli.commands import parse_train_args
    cfg = parse_train_args(["--rewire", "--rewire-scaling", "--rewire-fraction", "0.2"])[0]
    from dynsparse.training.engine_adapter import method_of
    assert method_of(cfg) == "set"


def test_a_checkpoint_copy_is_saved_at_the_stop_rewire_epoch(tiny_mnist, tmp_path):
    _run(tiny_mnist, tmp_path, "--rewire", "--name", "x", "--epochs", "3", "--stop-rewire-epoch", "1")
    names = sorted(p.name for p in (tmp_path / "x").iterdir() if "StopRewiring" in p.name)
    assert names == ["checkpoint_StopRewiringPoint_1.pt"]
    ckpt = read_checkpoint(tmp_path / "x" / names[0])
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2  # saved after training epoch 1


def test_copied_mask_into_a_csr_run_takes_the_topology_and_fresh_values(tiny_mnist, tmp_path):
    _run(tiny_mnist, tmp_path, "--rewire", "--name", "x", "--seed", "5")  # masked
    _run(tiny_mnist, tmp_path, "--copy-mask-from", str(tmp_path / "x"), "--name", "y", "--seed", "3",
         "--sparse-backend", "csr")
    masks = read_checkpoint(tmp_path / "x" / "checkpoint.pt")["sparsifier"]["masks"]
    start = read_checkpoint(tmp_path / "y" / "initial.pt")
    fresh = _fresh(3)
    for n in SPARSE:
        flat = torch.nonzero(masks[n].reshape(-1)).view(-1)
        assert torch.equal(start["sparsifier"]["masks"][n], flat)
        assert torch.equal(start["model"][n + ".values"], fresh[n].reshape(-1)[flat])
