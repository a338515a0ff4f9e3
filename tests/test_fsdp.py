"""Sparse training on FSDP2-sharded models (``fully_shard``, DTensor parameters), CPU and gloo.

The multi-process tests train the same tiny model (uneven row splits over 2 and 3 ranks) with
SET, RigL, DSR, SNFS, MEST, DeepR, gradual pruning and static masks unsharded and sharded
(tests/fsdp_worker.py) and require the same whole masks after every topology update and the same
losses; a distributed checkpoint
saved on 2 ranks resumes on 3 with the answers of the uninterrupted unsharded run.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.sparse import SET, Sparsifier

WORKER = Path(__file__).with_name("fsdp_worker.py")
REPO = WORKER.parents[1]


def run_worker(out: Path, nproc: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 0:
        cmd = [sys.executable, str(WORKER), str(out), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), str(out), "--fsdp", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def assert_same_run(ref: dict, got: dict, policy: str) -> None:
    r, g = ref[policy], got[policy]
    assert [s for s, _ in r["updates"]] == [s for s, _ in g["updates"]], policy
    for (step, masks), (_, theirs) in zip(r["updates"], g["updates"]):
        for name in masks:
            assert torch.equal(masks[name], theirs[name]), f"{policy}: {name} differs after the update at step {step}"
    assert g["losses"] == pytest.approx(r["losses"], rel=1e-12, abs=1e-12), policy


POLICIES = ["set", "rigl", "dsr", "snfs", "static", "mest", "set-initial", "rigl-conv", "deepr", "deepr-initial",
            "prune",
            "prune-global"]
# on 3 ranks (one rank holds no row of a layer) one policy of each kind, to keep CI under its 20 minutes;
# every policy runs on 2 ranks
POLICIES_ON_3 = ["set", "dsr", "snfs", "rigl-conv", "deepr", "prune-global"]
# 20 topology updates of the periodic policies (every 5 steps): the multi-rank runs are the slow part of CI
STEPS = 100


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return run_worker(tmp_path_factory.mktemp("ref") / "ref.pt", 0, "--steps", str(STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_training_matches_unsharded(nproc, reference, tmp_path):
    policies = POLICIES if nproc == 2 else POLICIES_ON_3
    got = run_worker(tmp_path / "fsdp.pt", nproc, "--steps", str(STEPS), "--policies", ",".join(policies))
    assert set(got) == set(policies)
    for policy in policies:
        assert_same_run(reference, got, policy)
        assert got[policy]["world"] == nproc
        if policy.startswith("deepr"):  # masks recorded every step: some of them changed
            masks = [m for _, m in reference[policy]["updates"]]
            assert len(masks) == 40 and sum(any(not torch.equal(a[n], b[n]) for n in a) for a,
                                            b in itertools.pairwise(masks)) >= 5
        elif policy.startswith("prune"):  # 4 prunes, at the last one to the targets
            assert len(got[policy]["updates"]) == 4
        elif policy != "static":
            assert len(got[policy]["updates"]) >= 15  # every 5 steps
        for key, value in reference[policy]["export"].items():  # the whole model, gathered
            assert torch.allclose(got[policy]["export"][key], value, rtol=0, atol=1e-12), key
        assert got[policy]["summary"] == reference[policy]["summary"]
    # DSR moved entries between tensors: its per-tensor densities are no longer all 0.5
    assert any(abs(float(t.double().mean()) - 0.5) > 0.01 for t in reference["dsr"]["updates"][-1][1].values())


@pytest.mark.slow
def test_checkpoint_saved_on_two_ranks_resumes_on_three(reference, tmp_path):
    policies = "rigl,dsr,snfs"  # those with state beyond the masks: fraction, threshold, momentum
    first = run_worker(tmp_path / "a.pt", 2, "--steps", str(STEPS // 2), "--policies", policies, "--save",
                       str(tmp_path / "ckpt"))
    second = run_worker(tmp_path / "b.pt", 3, "--steps", str(STEPS // 2), "--policies", policies, "--resume",
                        str(tmp_path / "ckpt"))
    for policy in policies.split(","):
        joined = {policy: {"losses": first[policy]["losses"] + second[policy]["losses"],
                           "updates": first[policy]["updates"] + second[policy]["updates"]}}
        assert second[policy]["step_count"] == STEPS and second[policy]["world"] == 3
        assert_same_run(reference, joined, policy)
    for name, m in reference["snfs"]["momentum"].items():  # SNFS's dense momentum came through the checkpoint
        assert torch.allclose(second["snfs"]["momentum"][name], m, rtol=0, atol=1e-12), name


# ---- one process (a world of one rank): fast checks of the sharded storage -------------------------
@pytest.fixture
def one_rank(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_mlp():
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    fully_shard(model)
    return model


def test_csr_backend_is_refused_on_a_sharded_model(one_rank):
    model = sharded_mlp()
    with pytest.raises(DynsparseError, match="backend 'csr' is single-device.*use backend 'masked'"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=SET(), densities=0.3, backend="csr")


def test_deepr_signs_checkpoint_as_dtensors_on_a_sharded_model(one_rank):
    from torch.distributed.tensor import DTensor

    from dynsparse.sparse import DeepR
    model = sharded_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    s = Sparsifier(model, opt, policy=DeepR(eta=0.05, temperature=lambda e: 0.5), densities=0.3, seed=1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    state = s.policy.state_dict()
    for n, sign in state["signs"].items():  # recorded after the update: zero off the mask, the weights' signs on it
        assert isinstance(sign, DTensor)
        w, m = s.params[n].param.full_tensor(), s.params[n].topology().full_tensor()
        assert torch.equal(sign.full_tensor(), torch.sign(w).to(torch.int8) * m)
        assert s.params[n].num_active == int(m.sum())
    whole = {n: t.full_tensor() for n, t in state["signs"].items()}  # as an unsharded run saves them
    s.policy.load_state_dict({"eta": 0.05, "signs": whole})
    assert all(torch.equal(s.policy.signs[n], t) for n, t in whole.items())


def test_sharded_masks_keep_weights_gradients_and_momentum_zero_off_the_mask(one_rank):
    from torch.distributed.tensor import DTensor

    from dynsparse.sparse.storage.sharded import ShardedParam
    model = sharded_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = Sparsifier(model, opt, policy=SET(), densities=0.3, seed=1)
    assert all(isinstance(sp, ShardedParam) for sp in s.params.values())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    for sp in s.params.values():
        off = (1 - sp.topology().full_tensor().double()).bool()
        assert isinstance(sp.param.grad, DTensor)
        assert sp.param.full_tensor()[off].abs().sum() == 0
        assert sp.param.grad.full_tensor()[off].abs().sum() == 0
        assert opt.state[sp.param]["momentum_buffer"].full_tensor()[off].abs().sum() == 0
        assert sp.num_active == int(0.3 * sp.num_entries + 0.1)
    assert s.num_active_weights() == 18 + 9
    assert isinstance(s.export()["0.weight"], torch.Tensor) and not isinstance(s.export()["0.bias"], DTensor)


# ---- dynsparse train --fsdp -------------------------------------------------------------------------
def cli(nproc: int, tmp_path: Path, data: Path, name: str, extra: list[str]) -> dict:
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 2\n")
    args = ["--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--name", name, "-b", "12", "--no-progress",
            "--schedule-file", str(schedule), "--nesterov", "False", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "main.py"), *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         str(REPO / "main.py"), *args, "--fsdp", "--debug-distributed"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


DSR_FLAGS = ["--rewire", "--threshold-prune", "--rewire-scaling", "--n-prune-params", "40"]


@pytest.mark.slow
def test_cli_fsdp_mnist_mlp_matches_one_process_and_resumes_on_three_ranks(tiny_mnist, tmp_path):
    mlp = ["--initial-sparsity-fc", "0.9", "--no-batch-norm", *DSR_FLAGS]
    one = cli(1, tmp_path, tiny_mnist, "one", [*mlp, "--epochs", "3"])
    cli(2, tmp_path, tiny_mnist, "sharded", [*mlp, "--epochs", "2"])
    two = cli(3, tmp_path, tiny_mnist, "sharded",
              [*mlp, "--epochs", "3", "--resume", str(tmp_path / "runs" / "sharded")])
    assert [r["epoch"] for r in two["history"]] == [0, 1, 2] and two["evidence"]["world_size"] == 3
    assert two["reallocations"] == one["reallocations"] >= 6
    # float32: gradients averaged over 2 or 3 shards differ from one process's in the last bits, and
    # DSR's threshold drop flips the odd weight at the threshold (the float64 tests above are exact)
    assert two["total_pruned"] == pytest.approx(one["total_pruned"], rel=0.01)
    assert two["params_nonzero"] == pytest.approx(one["params_nonzero"], rel=0.01)
    for ra, rb in zip(one["history"], two["history"]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-3)
        for name, d in ra["densities"].items():
            assert rb["densities"][name] == pytest.approx(d, abs=0.01), name


@pytest.mark.slow
def test_cli_fsdp_deepr_and_gradual_pruning_agree_across_ranks(tiny_mnist, tmp_path):
    # --debug-distributed checks after every topology change (DeepR: every step) that the ranks'
    # whole masks and weights agree; pruning ends exactly at its targets, DeepR keeps its density
    mlp = ["--initial-sparsity-fc", "0.5", "--no-batch-norm", "--epochs", "1"]
    # the L1 penalty on sharded weights: each rank's rows, the same gradient as one process
    one = cli(1, tmp_path, tiny_mnist, "l1-one", [*mlp, "--L1-loss-coeff", "1e-2"])
    two = cli(2, tmp_path, tiny_mnist, "l1-two", [*mlp, "--L1-loss-coeff", "1e-2"])
    assert [r["train_loss"] for r in two["history"]] == pytest.approx([r["train_loss"] for r in one["history"]],
                                                                      rel=1e-4)
    deepr = cli(2, tmp_path, tiny_mnist, "deepr", [*mlp, "--DeepR", "--L1-loss-coeff", "1e-4"])
    assert deepr["history"][-1]["densities"] == deepr["history"][0]["densities"]
    assert deepr["total_pruned"] > 0
    prune = cli(2, tmp_path, tiny_mnist, "prune",
                [*mlp, "--prune", "--prune-from-scratch", "--prune-target-sparsity-fc", "0.8",
                                                   "--prune-iterations", "1"])
    assert all(d == pytest.approx(0.2, abs=0.01) for d in prune["history"][-1]["densities"].values())


@pytest.mark.slow
def test_cli_fsdp_wide_resnet_with_rigl(tiny_cifar, tmp_path):
    wrn = ["--model", "cifar10_WideResNet", "--layers", "10", "--widen-factor", "1", "--initial-sparsity-conv", "0.8",
           "--rigl", "--update-period", "1", "--epochs", "1",
           "--sub-kernel-granularity", "2"]  # masks per kernel slice: scores are slice means
    s = cli(2, tmp_path, tiny_cifar, "wrn", wrn)
    assert s["reallocations"] >= 2 and s["params_nonzero"] < s["params_total"]


def test_cli_fsdp_refuses_csr_and_a_single_process(tmp_path):
    from dynsparse.cli.flags import parse_train_args
    from dynsparse.training.fsdp import check, prepare
    cfg, _ = parse_train_args(["--fsdp", "--sparse-backend", "csr", "--rewire"])
    with pytest.raises(DynsparseError, match="CSR.*single-device: use --sparse-backend masked"):
        check(cfg, "set")
    cfg, _ = parse_train_args(["--fsdp", "--tied"])
    with pytest.raises(DynsparseError, match="--fsdp is tested with deepr, .*static; not with tied"):
        prepare(cfg, nn.Linear(2, 2), type("Info", (), {"enabled": False})())
    cfg, _ = parse_train_args(["--fsdp", "--rigl"])
    with pytest.raises(DynsparseError, match="launch with torchrun"):
        prepare(cfg, nn.Linear(2, 2), type("Info", (), {"enabled": False})())


@pytest.mark.slow
def test_gpt_example_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "examples" / "gpt_fsdp_rigl.py"), "--steps", "50"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[1] < losses[0] < 4.3  # ln(64) = 4.16 at the start: it learns
    assert "topology changes 1" in proc.stdout and "sparse tensors" in proc.stdout and "0.3000" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (FSDP2 over NCCL)")
def test_sharded_training_on_two_gpus_matches_one_gpu(tmp_path):
    # NCCL: the same equivalence as on CPU with gloo, against the unsharded run on one GPU
    ref = run_worker(tmp_path / "ref.pt", 0, "--steps", "100", "--device", "cuda")
    got = run_worker(tmp_path / "nccl.pt", 2, "--steps", "100", "--device", "cuda")
    for policy in POLICIES:
        assert_same_run(ref, got, policy)
