"""Every kind of line of the original experiment lists runs end to end on CPU with a tiny budget.

The lines are grouped by the flags they use (dense/static/thin dense, pruning from a dense run,
DSR, DeepR, SET, kernel-slice DSR, tied, mask transplant with and without ``--resume
X_initial``); the first line of each group runs exactly as parsed, in a scratch working
directory (so its ``./runs/...`` paths resolve there), with only the budget replaced: a tiny
synthetic dataset, 1 epoch (2 in prune mode: two prunes), small batches, a rewire period of 1-2 steps and,
for ResNet-50, 64-pixel crops. A line that needs another run (pruning needs the dense job 0,
transplants need the DSR run they copy) runs that one first. With ``DYNSPARSE_TEST_DATA`` set
(the full suite, as CI runs it) every line of both lists runs, not only one of each kind.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from dynsparse.cli.commands import parse_train_args
from dynsparse.training.checkpoint import read_checkpoint
from dynsparse.training.config import TrainConfig
from dynsparse.training.engine_adapter import method_of
from dynsparse.training.run import run_training

LISTS = Path(__file__).resolve().parents[1] / "experiments" / "original"
SHAPE_FLAGS = {"--prune", "--rewire", "--threshold-prune", "--DeepR", "--rewire-fraction", "--tied",
               "--copy-mask-from", "--resume", "--batch-size"}


def jobs(list_name: str) -> dict[int, str]:
    out = {}
    for line in yaml.safe_load((LISTS / list_name).read_text())["jobs"]:
        argv = shlex.split(line)
        out[int(argv[argv.index("--job-idx") + 1])] = line
    return out


def representatives(list_name: str) -> list[int]:
    """The first job of every group of lines that share their method flags and granularity."""
    seen, reps = set(), []
    for idx, line in sorted(jobs(list_name).items()):
        argv = shlex.split(line)
        key = (frozenset(a for a in argv if a in SHAPE_FLAGS),
               argv[argv.index("--sub-kernel-granularity") + 1] if "--sub-kernel-granularity" in argv else "2",
               "--initial-sparsity-conv 0.0 " in line + " ")
        if key not in seen:
            seen.add(key)
            reps.append(idx)
    return reps


def selected(list_name: str) -> list[int]:
    """Every line when the full suite runs (DYNSPARSE_TEST_DATA set, as in CI), else one per kind."""
    if os.environ.get("DYNSPARSE_TEST_DATA"):
        return sorted(jobs(list_name))
    return representatives(list_name)


def dependencies(cfg: TrainConfig) -> list[str]:
    return [p for p in (cfg.resume, cfg.copy_mask_from) if p]


class Workspace:
    def __init__(self, root: Path, list_name: str, data: Path):
        self.root, self.list_name, self.data = root, list_name, data
        self.lines = jobs(list_name)
        self.schedule = root / "tiny_schedule.yaml"
        self.schedule.write_text("lr_schedule:\n  - 0 : 0.05\nrewire_period_schedule:\n  - 0 : 1\n"
                                 "DeepR_temperature_schedule:\n  - 0 : 1.0e-5\n")

    def config(self, idx: int) -> TrainConfig:
        cfg, _ = parse_train_args(shlex.split(self.lines[idx])[2:])
        return dataclasses.replace(cfg, data=str(self.data), epochs=1, start_epoch=0, batch_size=8, workers=0,
                                   schedule_file=str(self.schedule), progress=False, prune_iterations=2,
                                   prune_epoch_frequency=1, start_pruning_after_epoch=0, post_prune_epochs=1)

    def run(self, idx: int) -> tuple[TrainConfig, dict]:
        cfg = self.config(idx)
        for dep in dependencies(cfg):
            name = Path(dep).name.removesuffix("_initial")
            source = int(name.rsplit("_", 1)[1])
            if not (self.root / "runs" / name / "checkpoint.pt").exists():
                self.run(source)
        return cfg, run_training(cfg)


@pytest.fixture(scope="module")
def wrn_workspace(tmp_path_factory):
    from conftest import write_cifar
    root = tmp_path_factory.mktemp("wrn")
    write_cifar(root / "data", per_batch=4, n_test=8)
    return Workspace(root, "wrnet_experiments.yaml", root / "data")


@pytest.fixture(scope="module")
def resnet_workspace(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("resnet")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("n01", "n02"):
            d = root / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.JPEG")
    return Workspace(root, "resnet_experiments.yaml", root / "data")


def check(cfg: TrainConfig, summary: dict) -> None:
    assert summary["epochs"] == cfg.total_epochs
    assert summary["test_top1"] == summary["history"][-1]["test_top1"]
    assert math.isfinite(summary["history"][-1]["train_loss"])
    method = method_of(cfg)
    assert summary["method"] == method
    assert summary["params_learnable"] == summary["params_fixed"] + summary["params_sparse"] + summary["params_tied"]
    if method in ("dsr", "set", "deepr"):
        assert summary["total_grown"] == summary["total_pruned"]
        if cfg.sub_kernel_granularity == 4:  # slice magnitudes start far above H0: nothing pruned yet
            assert summary["total_pruned"] > 0
        if method != "deepr":
            assert summary["reallocations"] >= 1
    if method == "prune":
        assert summary["params_sparse"] < summary["params_sparse_total"]
    if method == "tied":
        assert 0 < summary["params_tied"] < summary["params_total"]
    if cfg.copy_mask_from:
        run_dir = Path(cfg.runs_dir) / cfg.run_name
        source = Path(cfg.copy_mask_from)
        initial = read_checkpoint(run_dir / "initial.pt")["sparsifier"]["masks"]
        copied = read_checkpoint(source / "checkpoint.pt")["sparsifier"]["masks"]
        assert all(torch.equal(initial[k], copied[k]) for k in copied)


@pytest.mark.parametrize("idx", selected("wrnet_experiments.yaml"))
def test_wrn_line(idx, wrn_workspace, monkeypatch):
    monkeypatch.chdir(wrn_workspace.root)
    check(*wrn_workspace.run(idx))


@pytest.mark.parametrize("idx", selected("resnet_experiments.yaml"))
def test_resnet_line(idx, resnet_workspace, monkeypatch):
    pytest.importorskip("torchvision")
    from dynsparse.data import imagenet
    monkeypatch.setattr(imagenet, "CROP_SIZE", 64)
    monkeypatch.setattr(imagenet, "RESIZE_SIZE", 72)
    monkeypatch.chdir(resnet_workspace.root)
    check(*resnet_workspace.run(idx))


def test_representatives_cover_every_method():
    for name in ("wrnet_experiments.yaml", "resnet_experiments.yaml"):
        lines = jobs(name)
        methods = {method_of(parse_train_args(shlex.split(lines[i])[2:])[0]) for i in representatives(name)}
        assert methods == {"dense", "static", "dsr", "set", "deepr", "prune", "tied"}
    assert len(representatives("wrnet_experiments.yaml")) >= 9
