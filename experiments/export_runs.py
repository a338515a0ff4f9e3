"""Copy the small, reportable part of finished runs into the repository (checkpoints stay out).

python experiments/export_runs.py runs/mnist docs/mnist/runs

For every run directory with a ``summary.json`` (configuration, evidence and per-epoch history,
per-layer densities included), copies it, plus ``reallocations.jsonl`` for DSR runs (the
per-layer density plot), so ``dynsparse report`` can rebuild the tables and plots from the
repository alone. Copying the exported directories back into a runs directory makes a sweep
skip those jobs.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python experiments/export_runs.py RUNS_DIR DEST_DIR", file=sys.stderr)
        return 2
    src, dst = argv
    summaries = sorted(Path(src).glob("*/summary.json"))
    if not summaries:
        print(f"export_runs: error: no finished runs (*/summary.json) in {src}", file=sys.stderr)
        return 2
    count = 0
    for summary in summaries:
        out = Path(dst) / summary.parent.name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(summary, out / "summary.json")
        events = summary.parent / "reallocations.jsonl"
        if events.is_file() and json.loads(summary.read_text())["method"] == "dsr":
            shutil.copy2(events, out / "reallocations.jsonl")
        count += 1
    print(f"exported {count} runs to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
