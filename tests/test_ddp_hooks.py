"""The path users run, tested (issue 22): a plain DDP loop over two gloo processes with the
sparsifier attached by hooks (micro-batches under ``no_sync``, a ``GradScaler``) gives bit for
bit what the explicit calls (``hooks=False``, ``before_optimizer_step()`` / ``step()``) give,
for RigL (the dense gradient at updates) and SNFS (its off-mask momentum every step)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_loop_with_hooks_matches_the_explicit_calls_bit_for_bit(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "ddp_hooks_loop.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for policy in ("rigl", "snfs"):
        runs = {(mode, r): torch.load(tmp_path / f"{policy}_{mode}_rank{r}.pt")
                for mode in ("hooks", "explicit") for r in (0, 1)}
        ref = runs["explicit", 0]
        assert ref["step_count"] == 9 and ref["events"] >= 3 and ref["totals"]["total_grown"] > 0, policy
        assert ref["scale"] == 2.0 ** 12  # no step was skipped: both paths saw the same steps
        for key, run in runs.items():
            assert run["step_count"] == ref["step_count"] and run["totals"] == ref["totals"], (policy, key)
            for part in ("masks", "weights", "momentum"):
                assert run[part].keys() == ref[part].keys()
                for n in ref[part]:
                    assert torch.equal(run[part][n], ref[part][n]), (policy, key, part, n)
