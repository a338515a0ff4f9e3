"""Checkpoint sizes: the plain layout (dense weights, dense momentum, bool masks) against the
compact one (active entries only), for the masked 784-2000-2000-10 MLP at densities 0.001 to 0.5
(goals: >= 20x smaller at 0.01, >= 4x at 0.1), the csr backend for comparison, and the sizes of
the files `dynsparse export` writes (sparse and dense).

Run: python benchmarks/bench_checkpoint_size.py   (CPU, ~30 s)
Writes benchmarks/results/checkpoint_size.json and .md. Sizes are exact byte counts of
``torch.save``; they do not depend on the machine's load.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import evidence, write_results  # noqa: E402
from dynsparse import Sparsifier, Static, create_model  # noqa: E402
from dynsparse.sparse.compact import pack_state  # noqa: E402
from dynsparse.training.deploy import file_tensors  # noqa: E402

GOALS = {0.001: None, 0.01: 20.0, 0.1: 4.0, 0.5: None}
HIDDEN = (2000, 2000)


def saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def measure(density: float, backend: str) -> dict:
    torch.manual_seed(0)
    model = create_model("mnist_mlp", hidden_sizes=HIDDEN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = Sparsifier(model, opt, policy=Static(), densities=density, hooks=False, backend=backend)
    model(torch.randn(32, 784)).sum().backward()  # one step: the momentum exists, as in any saved run
    s.before_optimizer_step()
    opt.step()
    s.step()
    state = {"format": "plain", "model": model.state_dict(), "optimizer": opt.state_dict(),
             "sparsifier": s.state_dict()}
    plain, compact = saved_bytes(state), saved_bytes(pack_state(state, s))
    exported = s.export()  # what `dynsparse export` writes: the trained model only
    sparse_file = len(save(file_tensors(exported, set(s.params))[0]))
    dense_file = len(save(file_tensors(exported, set())[0]))
    index = {n: next(k for k in ("crow", "bits") if k in r["index"]) for n, r in pack_state(state, s)["compact"].items()
             if r["storage"] == "masked"}
    return {"density": density, "backend": backend, "plain_bytes": plain, "compact_bytes": compact,
            "ratio": plain / compact, "index_kind": index, "active_weights": s.num_active_weights(),
            "export_sparse_bytes": sparse_file, "export_dense_bytes": dense_file}


def main() -> None:
    rows = [measure(d, b) for d in GOALS for b in ("masked", "csr")]
    for r in rows:
        if r["backend"] == "masked" and GOALS[r["density"]] is not None:
            r["goal"], r["goal_met"] = GOALS[r["density"]], r["ratio"] >= GOALS[r["density"]]
    ev = evidence()
    lines = ["# Checkpoint size: plain layout against compact (active entries only)", "",
             f"784-{'-'.join(map(str, HIDDEN))}-10 MLP with batch norm, SGD with momentum, one step taken; "
             "`torch.save` bytes of model + optimizer + sparsifier state.", "",
             "| backend | density | plain (MiB) | compact (MiB) | smaller by | goal | index | export sparse (MiB) "
             "| export dense (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = f">= {r['goal']:.0f}x: {r['goal_met']}" if "goal" in r else "-"
        kinds = ", ".join(sorted(set(r["index_kind"].values()))) or "model's own CSR indices"
        lines.append(f"| {r['backend']} | {r['density']} | {r['plain_bytes'] / 2**20:.2f} | "
                     f"{r['compact_bytes'] / 2**20:.2f} | {r['ratio']:.1f}x | {goal} | {kinds} | "
                     f"{r['export_sparse_bytes'] / 2**20:.2f} | {r['export_dense_bytes'] / 2**20:.2f} |")
    lines += ["", "The csr backend's plain layout already held values and indices; compact drops its duplicate "
              "int64 topology. Export: `dynsparse export` of the trained model alone (safetensors; sparse: "
              "nonzeros + int32 CSR indices where smaller than dense).", "",
              f"Command: `{ev['command']}`; commit {ev['commit']}; {ev['time']}.", ""]
    path = write_results("checkpoint_size", {"evidence": ev, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
