"""The original WRN experiment lines run end to end on CPU with a tiny budget.

Each line is parsed exactly as written; only the budget is replaced: a tiny synthetic CIFAR-10,
one epoch, batch 8 and a rewire period of 2 steps, so every dynamic method reallocates at least
once. The model (WRN-28-2 or the thin widths) is the line's own.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from dynsparse.cli import parse_train_args
from dynsparse.run import run_training

LISTS = Path(__file__).resolve().parents[1] / "experiments" / "original"


def tiny_run(line: str, data: Path, runs: Path):
    cfg, _ = parse_train_args(shlex.split(line)[2:])
    schedule = runs / "tiny_schedule.yaml"
    runs.mkdir(parents=True, exist_ok=True)
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 2\n"
                        "DeepR_temperature_schedule:\n  - 0 : 1.0e-5\n")
    cfg = dataclasses.replace(cfg, data=str(data), runs_dir=str(runs), epochs=1, start_epoch=0, batch_size=8,
                              schedule_file=str(schedule), progress=False)
    return cfg, run_training(cfg)


def find_line(pred) -> str:
    import yaml
    for f in sorted(LISTS.glob("wrnet_*.yaml")):
        for job in yaml.safe_load(f.read_text())["jobs"]:
            if pred(job):
                return job
    raise AssertionError("no such line")


LINES = {
    "dsr": lambda j: "--threshold-prune" in j and "--sub-kernel-granularity 4" in j and "0.9 " in j,
    "static": lambda j: "wrnet_schedule_long" in j and "--initial-sparsity-conv 0.9 " in j and "--rewire" not in j,
    "thin_dense": lambda j: "--widen-factor 0.75" in j,
    "deepr": lambda j: "--DeepR " in j,
    "set": lambda j: "--rewire-fraction" in j and "--threshold-prune" not in j and "--tied" not in j,
    "slice_granularity": lambda j: "--sub-kernel-granularity 2" in j and "--rewire" in j,
}


@pytest.mark.parametrize("kind", sorted(LINES))
def test_original_wrn_line_runs_with_tiny_budget(kind, tiny_cifar, tmp_path):
    line = find_line(LINES[kind])
    cfg, summary = tiny_run(line, tiny_cifar, tmp_path / "runs")
    assert cfg.model == "cifar10_WideResNet"
    expected_method = {"thin_dense": "dense", "slice_granularity": "dsr"}.get(kind, kind)
    assert summary["method"] == expected_method
    assert 0.0 <= summary["test_top1"] <= 100.0
    if kind in ("dsr", "set", "deepr", "slice_granularity"):
        assert summary["total_grown"] == summary["total_pruned"]
        # kernel slices' mean |w| starts far above H0 = 1e-3: H doubles and nothing is pruned yet
        assert (summary["total_pruned"] > 0) == (kind != "slice_granularity")
        if kind != "deepr":
            assert summary["reallocations"] >= 1
            events = (Path(cfg.runs_dir) / cfg.run_name / "reallocations.jsonl").read_text().splitlines()
            assert len(json.loads(events[0])["densities"]) == 24
    if kind == "thin_dense":
        assert summary["params_total"] == summary["params_nonzero"] == 209_130
    if kind == "static":
        assert summary["params_nonzero"] == summary["params_total"] - summary["params_sparse_total"] + \
            sum(int(0.1 * n + 0.1) for n in _wrn28_2_sparse_sizes())
    if kind == "slice_granularity":
        assert cfg.sub_kernel_granularity == 2
        assert summary["history"][-1]["threshold"] == 1e-3 * 2 ** summary["reallocations"]


def _wrn28_2_sparse_sizes() -> list[int]:
    from dynsparse.models import create_model, sparse_parameter_names
    import torch
    with torch.device("meta"):
        m = create_model("cifar10_WideResNet", layers=28, widen_factor=2)
    params = dict(m.named_parameters())
    return [params[n].numel() for n in sparse_parameter_names(m)]
