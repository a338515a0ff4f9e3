"""GPU smoke suite (issue 22): short enough to run first on any GPU, and skipped without CUDA.

    python -m pytest -m gpu tests/test_gpu.py -v

* every policy for 50 steps on WRN-16-2 with bf16 autocast, channels_last and ``torch.compile``,
  attached by hooks to a plain loop: finite loss, weights zero off the mask, the active count kept
  (pruning: reduced), topology changes made;
* a checkpoint/resume cycle through the command line on the GPU (resumed = uninterrupted);
* a CPU -> CUDA resume (``--device`` may change on resume);
* 2 ranks under NCCL with ``--debug-distributed``, when 2 GPUs are present;
* ``benchmarks/bench_throughput.py --quick``.

``DYNSPARSE_GPU_SMOKE_DEVICE=cpu`` runs the same code on the CPU (``torch.compile`` with its eager
backend): a check of the tests themselves, not of any GPU behaviour.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dynsparse.cli.commands import parse_train_args
from dynsparse.models import create_model, sparse_parameter_names
from dynsparse.sparse import (
    DSR,
    MEST,
    POLICIES,
    SET,
    SNFS,
    AtEpochEnds,
    DeepR,
    GradualPruning,
    Periodic,
    RigL,
    Sparsifier,
    Static,
)
from dynsparse.training.run import run_training

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
ON_CPU = os.environ.get("DYNSPARSE_GPU_SMOKE_DEVICE") == "cpu"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
STEPS, EPOCH = 50, 10  # an "epoch" of 10 steps: pruning prunes at epoch ends


def make_policy(name: str, names: list[str]):
    every = Periodic(EPOCH)
    return {"static": lambda: Static(), "dsr": lambda: DSR(n_prune=2000, when=every),
            "set": lambda: SET(when=every), "deepr": lambda: DeepR(),
            "rigl": lambda: RigL(when=Periodic(EPOCH, end_fraction=0.75)),
            "snfs": lambda: SNFS(when=Periodic(EPOCH, end_fraction=0.75)), "mest": lambda: MEST(when=every),
            "prune": lambda: GradualPruning(dict.fromkeys(names, 0.9), when=AtEpochEnds(count=3))}[name]()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_50_steps_on_wrn16_2_bf16_channels_last_compiled(name):
    torch.manual_seed(0)
    model = create_model("cifar10_WideResNet", layers=16, widen_factor=2).to(DEVICE)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    names = sparse_parameter_names(model)
    density = 1.0 if name == "prune" else 0.1
    s = Sparsifier(model, opt, policy=make_policy(name, names), densities=dict.fromkeys(names, density),
                   total_steps=STEPS)
    active = s.num_active_weights()
    compiled = torch.compile(model, backend="eager" if ON_CPU else "inductor")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (32,), generator=g).to(DEVICE)) for _ in range(4)]
    losses = []
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the hooks mask, update and re-mask
        losses.append(loss.detach())
        if (step + 1) % EPOCH == 0:
            s.end_epoch()
            s.set_epoch(s.epoch + 1)
    assert s.step_count == STEPS
    assert bool(torch.isfinite(torch.stack(losses)).all()), name
    for n, sp in s.params.items():
        off = (sp.param.detach() * sp.inverse_mask_view()).count_nonzero()
        assert int(off) == 0, (name, n)
        assert sp.param.is_contiguous(memory_format=torch.channels_last) or sp.param.dim() != 4, (name, n)
    if name == "prune":
        assert s.num_active_weights() < active
    else:
        assert s.num_active_weights() == active, name
    if name not in ("static", "deepr"):
        assert s.total_pruned > 0 and len(s.events) > 0, name


def cli_cfg(data: Path, runs: Path, *extra: str):
    schedule = data / "schedule.yaml"
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 3\n")
    argv = ["--model", "mnist_mlp", "--data", str(data), "--runs-dir", str(runs), "--batch-size", "16", "--epochs", "2",
            "--no-progress", "--initial-sparsity-fc", "0.9", "--rewire", "--threshold-prune", "--rewire-scaling",
            "--n-prune-params", "50", "--schedule-file", str(schedule), *extra]
    return parse_train_args(argv)[0]


def test_checkpoint_resume_cycle_on_the_gpu(tiny_mnist, tmp_path):
    dev = ("--device", DEVICE.type)
    straight = run_training(cli_cfg(tiny_mnist, tmp_path / "a", *dev))
    run_training(cli_cfg(tiny_mnist, tmp_path / "b", *dev, "--epochs", "1"))
    resumed = run_training(cli_cfg(tiny_mnist, tmp_path / "b", *dev, "--resume", str(tmp_path / "b" / "mnist_mlp_0")))
    a = torch.load(tmp_path / "a" / "mnist_mlp_0" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "b" / "mnist_mlp_0" / "checkpoint.pt", map_location="cpu", weights_only=True)
    for k, v in a["sparsifier"]["masks"].items():
        assert torch.equal(v, b["sparsifier"]["masks"][k]), k
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["events"] == b["events"] and len(a["events"]) > 0
    assert [r["test_loss"] for r in straight["history"]] == [r["test_loss"] for r in resumed["history"]]


def test_resume_on_cuda_from_a_cpu_checkpoint(tiny_mnist, tmp_path):
    run_training(cli_cfg(tiny_mnist, tmp_path, "--device", "cpu", "--epochs", "1"))
    saved = torch.load(tmp_path / "mnist_mlp_0" / "checkpoint.pt", map_location="cpu", weights_only=True)
    resumed = run_training(cli_cfg(tiny_mnist, tmp_path, "--device", DEVICE.type,
                                   "--resume", str(tmp_path / "mnist_mlp_0")))
    after = torch.load(tmp_path / "mnist_mlp_0" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert resumed["epochs"] == 2 and len(resumed["history"]) == 2
    assert after["sparsifier"]["step_count"] == 2 * saved["sparsifier"]["step_count"]
    assert len(after["events"]) > len(saved["events"])  # the topology kept changing on the new device


@pytest.mark.skipif(ON_CPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_ranks_under_nccl_agree(tiny_mnist, tmp_path):
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 2\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(REPO / "main.py"),
           "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "--epochs", "2", "-b", "16",
           "--initial-sparsity-fc", "0.9", "--schedule-file", str(schedule), "--no-progress", "--device", "cuda",
           "--rigl", "--update-period", "1", "--debug-distributed"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert len(summary["history"]) == 2


def test_bench_throughput_quick(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_throughput.py"), "--quick", "--output", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / f"throughput_{DEVICE.type}.json").read_text())["results"]["wrn16_2"]
    assert result["topology_changes_per_repeat"] and min(result["topology_changes_per_repeat"]) > 0
