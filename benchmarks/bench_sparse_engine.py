"""The engine on each storage: a full DSR training step through ``Sparsifier(backend=...)``, CSR
against masked, side by side, interleaved, one process, one thread.

For each MLP shape: the time of a training step (forward, backward, the sparsifier's hooks,
``optimizer.step()``) and of one DSR topology change (``policy.update`` and the re-masking or
the CSR storage move: drop below the threshold, regrow as many at random, optimizer state
remapped), and the step with the change amortized over ``period`` steps. Also the bytes of
weights, index buffers, masks and optimizer state, and the ratio topology change / step.

Shapes: the issue's 784-10000-10000-10 at density 0.01 (batch 128), and the wide-versus-narrow
study's 784-1000-1000-10 at density 0.1466 and 784-3000-3000-10 at 0.0223 (batch 100: the
study's per-epoch cost is 600 of these steps).

Usage: python benchmarks/bench_sparse_engine.py [--repeats 5] [--shapes 10000,1000,3000]
       python benchmarks/bench_sparse_engine.py --widest 150000   (peak memory through a DSR change; ~20 GiB)
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import evidence, interleaved, median, timed, write_results  # noqa: E402

from dynsparse import Sparsifier  # noqa: E402
from dynsparse.models import MnistMLP  # noqa: E402
from dynsparse.sparse.policies.dsr import DSR  # noqa: E402
from dynsparse.sparse.when import Periodic  # noqa: E402

SHAPES = {10000: (0.01, 128), 1000: (0.1466, 100), 3000: (0.0223, 100)}


def build(width: int, density: float, backend: str, seed: int = 0):
    torch.manual_seed(seed)
    # the masked storage needs the dense model; CSR of the widest shape is built sparse directly
    # (as `dynsparse train` does above 2^24 weights), smaller ones converted (same topology)
    direct = backend == "csr" and width * width > 1 << 24
    model = MnistMLP(hidden_sizes=(width, width), sparse_density=density if direct else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    active = int(density * (784 * width + width * width + width * 10))
    # DSR adapts its threshold to prune about n_prune entries per change: 1% of the active ones
    policy = DSR(n_prune=max(active // 100, 1), when=Periodic(10**9))  # changes only when called below
    s = Sparsifier(model, opt, policy=policy, densities=density, backend=backend, seed=seed)
    return model, opt, s


def step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def change(s) -> None:
    s._record(*s.policy.update(s.context()))


def state_bytes(model, opt, s) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    masks = sum(sp.mask.numel() * sp.mask.element_size() + sp.mask_view().numel() * 4
                for sp in s.params.values() if sp.storage == "masked")
    optim = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return {"weights_indices_masks": params + buffers + masks, "optimizer_state": optim,
            "total": params + buffers + masks + optim}


def bench(width: int, repeats: int, period: int) -> dict:
    density, batch = SHAPES[width]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    runs = {b: build(width, density, b) for b in ("masked", "csr")}
    cases = {}
    for b, (model, opt, s) in runs.items():
        step(model, opt, x, y)  # warm-up: momentum buffers exist before anything is timed
        cases[f"step_{b}"] = lambda m=model, o=opt: step(m, o, x, y)
        cases[f"change_{b}"] = lambda s=s, m=model, o=opt: (step(m, o, x, y), change(s))
    t = interleaved(cases, repeats)
    # a change case runs a step first (the change needs fresh weights): subtract the step's median
    change_s = {b: max(median(t[f"change_{b}"]) - median(t[f"step_{b}"]), 0.0) for b in runs}
    amort = {b: median(t[f"step_{b}"]) + change_s[b] / period for b in runs}
    mem = {b: state_bytes(*runs[b]) for b in runs}
    same = {n: runs["masked"][2].params[n].num_active == runs["csr"][2].params[n].num_active
            for n in runs["masked"][2].params}
    return {"shape": f"784-{width}-{width}-10", "density": density, "batch": batch, "period": period,
            "seconds": t, "step_seconds": {b: median(t[f"step_{b}"]) for b in runs}, "change_seconds": change_s,
            "amortized_step_seconds": amort, "speedup": amort["masked"] / amort["csr"],
            "change_over_step": {b: change_s[b] / median(t[f"step_{b}"]) for b in runs},
            "bytes": mem, "memory_ratio": mem["masked"]["total"] / mem["csr"]["total"],
            "same_entry_counts_after_changes": same}


def markdown(res: dict, ev: dict) -> str:
    lines = ["# DSR through the engine: CSR storage against masked", "",
             f"`{ev['command']}` at {ev['commit'][:10]}{' (uncommitted changes)' if ev['uncommitted'] else ''}, "
             f"{ev['device']}, {ev['threads']} thread(s), torch {ev['torch']}, {ev['time']}. "
             f"Load: {ev['note'] or 'not recorded'}.", "",
             "| MLP | density | batch | step masked (s) | step CSR (s) | DSR change masked (s) | DSR change CSR (s) "
             "| change / step, CSR | amortized speedup | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["shapes"]:
        lines.append(f"| {r['shape']} | {r['density']} | {r['batch']} | {r['step_seconds']['masked']:.4f} | "
                     f"{r['step_seconds']['csr']:.4f} | {r['change_seconds']['masked']:.4f} | "
                     f"{r['change_seconds']['csr']:.4f} | {r['change_over_step']['csr']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['memory_ratio']:.1f}x |")
    lines += ["", "Medians of interleaved rounds; a DSR change is amortized over "
              f"{res['shapes'][0]['period']} steps. Memory: weights, index buffers, masks (bool and the cached "
              "float view) and optimizer state.", ""]
    return "\n".join(lines)


def widest(width: int, density: float = 0.01, batch: int = 128) -> dict:
    """Peak RSS of the CSR engine at one width: build, a step, a DSR change, a step (this process)."""
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # noqa: E731 (KiB on Linux)
    out = {"width": width, "density": density, "batch": batch}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    model, opt, s = build(width, density, "csr")
    out["peak_gib_after_build"] = peak()
    out["step_seconds"] = timed(lambda: step(model, opt, x, y))
    out["peak_gib_after_step"] = peak()
    out["change_seconds"] = timed(lambda: change(s))
    out["peak_gib_after_change"] = peak()
    out["second_step_seconds"] = timed(lambda: step(model, opt, x, y))
    out["peak_gib_after_second_step"] = peak()
    out["pruned_grown"] = [s.total_pruned, s.total_grown]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--period", type=int, default=100)
    ap.add_argument("--shapes", default="10000,1000,3000")
    ap.add_argument("--name", default="sparse_engine", help="results file name in benchmarks/results")
    ap.add_argument("--widest", type=int, default=None, metavar="X",
                    help="instead: peak RSS of the CSR engine on 784-X-X-10 at density 0.01 through a DSR change "
                         "(written to results/sparse_engine_widest_X.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.widest:
        ev = evidence()
        res = {"evidence": ev, "widest": widest(args.widest)}
        md = (f"# CSR engine, 784-{args.widest}-{args.widest}-10 at density 0.01: peak RSS through a DSR change\n\n"
              f"`{ev['command']}` at {ev['commit'][:10]}, {ev['device']}, torch {ev['torch']}, {ev['time']}.\n\n"
              + "".join(f"- {k}: {v}\n" for k, v in res["widest"].items()))
        write_results(f"sparse_engine_widest_{args.widest}", res, md)
        print(md)
        return
    ev = evidence()
    ev["load_before"] = os.getloadavg()
    shapes = [bench(int(w), args.repeats, args.period) for w in args.shapes.split(",")]
    ev["load_after"] = os.getloadavg()
    res = {"evidence": ev, "shapes": shapes}
    path = write_results(args.name, res, markdown(res, ev))
    print(markdown(res, ev))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
