"""Cost of a topology change under FSDP2 against one training step, and memory per rank against
the unsharded run (issue 26), on CPU with gloo.

    python benchmarks/bench_fsdp.py [--worlds 2,4] [--width 1024] [--steps 60]

Runs the same MLP (3 hidden layers of ``--width``: ~3.2M parameters at 1024, 90% sparse, SGD
with momentum, global batch 256 split over the ranks) unsharded in one process and sharded by
``fully_shard`` (one unit per layer) on each world size, with RigL, SET and DSR updating every 5
steps. Per run: the median wall time of a step without a topology change, of a step with one
(RigL's gradient read, the update and the re-masking included), the time inside the update
itself, and, per rank, the bytes of parameters, gradients, optimizer state and masks (the
sparsifier's cached float mask included), the peak of the transient whole-tensor copies an
update makes (masks and scores), and the process's peak RSS. Writes
benchmarks/results/fsdp.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

POLICIES = ("rigl", "set", "dsr")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(ts) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in ts if torch.is_tensor(t))


def worker(a) -> None:
    import torch.distributed as dist

    from dynsparse.sparse import DSR, SET, Periodic, RigL, Sparsifier
    torch.set_num_threads(1)
    sharded = "RANK" in os.environ
    rank, world = 0, 1
    if sharded:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for policy in POLICIES:
        torch.manual_seed(0)
        w = a.width
        model = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                              nn.Linear(w, 10))
        if sharded:
            from torch.distributed.fsdp import fully_shard
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        make = {"rigl": lambda: RigL(0.3, when=Periodic(5)), "set": lambda: SET(0.3, when=Periodic(5)),
                "dsr": lambda: DSR(n_prune=3000, when=Periodic(5))}[policy]
        s = Sparsifier(model, opt, policy=make(), densities=0.1, total_steps=10**6)
        inside: list[float] = []
        update = s._update

        def timed_update(update=update, inside=inside):
            t0 = time.perf_counter()
            result = update()
            inside.append(time.perf_counter() - t0)
            return result
        s._update = timed_update
        g = torch.Generator().manual_seed(rank)
        per = a.batch // world
        x, y = torch.randn(per, w, generator=g), torch.randint(0, 10, (per,), generator=g)
        plain, changing = [], []
        for step in range(1, a.steps + 1):
            if sharded:
                dist.barrier()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sharded:
                dist.barrier()
            dt = time.perf_counter() - t0
            if step > 5:  # warm-up
                (changing if step % 5 == 0 else plain).append(dt)
        sps = list(s.params.values())
        params = list(model.parameters())
        state = [v for p in params for v in opt.state.get(p, {}).values()]
        masks = [sp.mask for sp in sps] + [v for sp in sps for _, v in sp._cache.values()]
        transient = sum(sp.num_entries * (1 + 4) for sp in sps) if sharded else 0  # whole masks + whole scores
        out[policy] = {"step_s": statistics.median(plain), "update_step_s": statistics.median(changing),
                       "update_inside_s": statistics.median(inside) if inside else None, "updates": len(inside),
                       "change_cost_steps": (statistics.median(changing) - statistics.median(plain))
                       / statistics.median(plain),
                       "bytes": {"params": _bytes(params), "grads": _bytes(p.grad for p in params),
                                 "optimizer": _bytes(state), "masks": _bytes(masks), "update_transient": transient},
                       "params": sum(p.numel() for p in params)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if sharded:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        out = {"ranks": gathered}
        dist.barrier()  # no rank tears gloo down while another still uses it (aborted under load)
        dist.destroy_process_group()
    else:
        out = {"ranks": [out]}
    if rank == 0:
        Path(a.out).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    from common import evidence, write_results
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    load_before = os.getloadavg()
    for world in [1, *map(int, a.worlds.split(","))]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            args = [__file__, "--worker", "--out", str(out), "--width", str(a.width), "--steps", str(a.steps),
                    "--batch", str(a.batch)]
            cmd = [sys.executable, *args] if world == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            runs["unsharded" if world == 1 else f"fsdp{world}"] = json.loads(out.read_text())
    payload = {"evidence": evidence(), "load_before": load_before, "load_after": os.getloadavg(),
               "width": a.width, "steps": a.steps, "batch": a.batch, "runs": runs}
    write_results("fsdp", payload, markdown(payload))
    print(markdown(payload))


def markdown(p: dict) -> str:
    mb = 1 / 2**20
    lines = ["# FSDP2 on CPU (gloo): topology change vs training step, memory per rank\n",
             f"MLP width {p['width']}, global batch {p['batch']}, density 0.1, update every 5 steps, {p['steps']} "
             f"steps (5 warm-up). Load average before/after: {p['load_before'][0]:.1f} / {p['load_after'][0]:.1f} "
             f"(machine shared with other work). Commit {p['evidence']['commit'][:10]}, torch "
             f"{p['evidence']['torch']}.\n",
             "| run | policy | step ms | step with change ms | update itself ms | change cost (steps) |",
             "|---|---|---:|---:|---:|---:|"]
    for run, r in p["runs"].items():
        for pol in POLICIES:
            worst = max(rank[pol]["change_cost_steps"] for rank in r["ranks"])
            x = r["ranks"][0][pol]
            lines.append(f"| {run} | {pol} | {x['step_s'] * 1e3:.1f} | {x['update_step_s'] * 1e3:.1f} | "
                         f"{(x['update_inside_s'] or 0) * 1e3:.1f} | {worst:.2f} |")
    lines += ["",
              "| run | params MiB/rank | grads | optimizer | masks (bool + cached float) | update transient "
              "| peak RSS MiB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for run, r in p["runs"].items():
        b = max((rank["rigl"]["bytes"] for rank in r["ranks"]), key=lambda d: d["params"])
        rss = max(rank["peak_rss_mb"] for rank in r["ranks"])
        lines.append(f"| {run} | {b['params'] * mb:.1f} | {b['grads'] * mb:.1f} | {b['optimizer'] * mb:.1f} | "
                     f"{b['masks'] * mb:.1f} | {b['update_transient'] * mb:.1f} | {rss:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
