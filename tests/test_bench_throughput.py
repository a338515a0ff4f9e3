"""benchmarks/bench_throughput.py times real-rate topology updates (issue 22 item 8): each timed
repeat is a whole number of DSR's update periods and its output counts the changes in each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_throughput_run_counts_the_topology_changes_of_every_repeat(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_throughput.py"), "--quick", "--period", "2", "--periods",
           "2",
           "--output", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads((tmp_path / "throughput_cpu.json").read_text())
    assert payload["quick"] and payload["cudnn_benchmark"] is True
    r = payload["results"]["wrn16_2"]
    assert r["period"] == 2 and r["steps_per_repeat"] == 4
    assert r["topology_changes_per_repeat"] == [2, 2]  # two periods per repeat, at the real rate
    assert len(r["seconds"]["dense"]) == len(r["seconds"]["dsr"]) == 2
    assert len(r["update_seconds"]) == 3 and all(t > 0 for t in r["update_seconds"])
    assert 0 < r["update_share_of_dsr_repeat"] < 1
    assert "| wrn16_2 |" in (tmp_path / "throughput_cpu.md").read_text()
