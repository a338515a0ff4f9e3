"""Truly sparse (CSR) linear layers against the masked dense backend, side by side, interleaved.

  layer      -- one 4096x4096 layer, full step (forward, input and weight gradients, SGD-momentum
                update) at batch 32/128/512 over a density grid: ratio masked / CSR, and the
                crossover density (where CSR stops winning) per batch size, for ``auto``.
                Goals at batch 128: >= 12x at density 0.01, >= 40x at 0.001.
  mlp        -- MnistMLP 784-10000-10000-10 at density 0.01 (output layer dense), batch 128: full
                training step plus a DSR-like topology change (1% of each sparse layer dropped
                by magnitude, as many regrown at random) amortized over 100 steps. Goals:
                >= 15x faster, weights + optimizer state >= 20x smaller.
  widest     -- (--widest, heavy) peak RSS of one CSR training step of 784-X-X-10 at density
                0.01, one subprocess per width; the masked backend's is fitted from two measured
                widths and from its tensor bytes. Goal: X >= 150,000 within 24 GiB.

The masked baseline is what dynsparse's masked engine does: a dense weight with zeros off the
mask, a dense gradient multiplied by a float mask, the optimizer step on dense tensors.
Usage: python benchmarks/bench_truly_sparse.py [--repeats 7] [--widest]
       python benchmarks/bench_truly_sparse.py --widest-only   (adds the widest part to the last results)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, evidence, interleaved, median, timed, write_results  # noqa: E402

from dynsparse.models import MnistMLP  # noqa: E402
from dynsparse.sparse.layers.csr_linear import CSRWeight, sample_flat  # noqa: E402

DENSITIES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5)
BATCHES = (32, 128, 512)
GiB = 2**30


def layer_cases(batch: int, densities, size: int = 4096) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size, generator=g).requires_grad_()
    dy = torch.randn(batch, size, generator=g)
    cases = {}
    # masked: one dense weight at density 0.01 (the dense kernels' cost does not depend on it)
    mask = (torch.rand(size, size, generator=g) < 0.01)
    w = torch.nn.Parameter(torch.randn(size, size, generator=g) * mask)
    maskf, opt = mask.float(), torch.optim.SGD([w], lr=0.01, momentum=0.9)

    def masked():
        x.grad = None  # the input gradient is computed, not accumulated, as inside a network
        F.linear(x, w).backward(dy)
        w.grad.mul_(maskf)
        opt.step()
        opt.zero_grad(set_to_none=True)
    cases["masked"] = masked
    for d in densities:
        sw = CSRWeight.random(size, size, d, g)
        sopt = torch.optim.SGD(sw.parameters(), lr=0.01, momentum=0.9)

        def csr(sw=sw, sopt=sopt):
            x.grad = None
            sw.matmul_t(x).backward(dy)
            sopt.step()
            sopt.zero_grad(set_to_none=True)
        cases[f"csr@{d}"] = csr
    return cases


def crossover(ratios: dict[float, float]) -> float | None:
    """Density where masked/CSR crosses 1, interpolated in log-log between grid points."""
    pts = sorted(ratios.items())
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 >= 1.0 > r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return None if pts[0][1] < 1.0 else float("inf")


def mlp_models(width: int, density: float, masked: bool, seed: int = 0):
    torch.manual_seed(seed)
    if masked:
        model = MnistMLP(hidden_sizes=(width, width))
        g = torch.Generator().manual_seed(seed)
        masks = {}
        for name in ("fc1", "fc_int"):
            w = getattr(model, name).weight
            masks[name] = torch.rand(w.shape, generator=g) < density
            w.data.mul_(masks[name])
        model.masks = {k: (m, m.float()) for k, m in masks.items()}  # bool and the cached float view
    else:
        model = MnistMLP(hidden_sizes=(width, width), sparse_density=density)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt


def train_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    for name, (_, maskf) in getattr(model, "masks", {}).items():
        getattr(model, name).weight.grad.mul_(maskf)
    opt.step()
    opt.zero_grad(set_to_none=True)


def topology_change(model, opt, g, fraction: float = 0.01):
    """DSR-like: drop the smallest-magnitude ``fraction`` of each sparse layer, regrow as many at
    uniformly random inactive positions (not the ones just dropped), new weights and state zero."""
    if hasattr(model, "masks"):
        for name, (mask, maskf) in model.masks.items():
            w = getattr(model, name).weight
            flat_mask = mask.view(-1)
            active = torch.nonzero(flat_mask).view(-1)
            k = int(fraction * active.numel())
            drop = active[torch.topk(w.detach().view(-1)[active].abs(), k, largest=False).indices]
            grow = sample_flat(flat_mask.numel(), k, g, exclude=active)  # active includes the dropped
            flat_mask[drop] = False
            flat_mask[grow] = True
            maskf.view(-1)[drop] = 0.0
            maskf.view(-1)[grow] = 1.0
            with torch.no_grad():
                w.view(-1)[drop] = 0.0
                w.view(-1)[grow] = 0.0
                opt.state[w]["momentum_buffer"].view(-1)[drop] = 0.0
        return
    for name in ("fc1", "fc_int"):
        sw = getattr(model, name).weight
        k = int(fraction * sw.num_active)
        drop_pos = torch.topk(sw.values.detach().abs(), k, largest=False).indices
        keep = torch.ones(sw.num_active, dtype=torch.bool)
        keep[drop_pos] = False
        dropped = torch.sort(sw.active_flat()[drop_pos]).values
        sw.set_topology(keep, sw.sample_inactive(k, g, exclude=dropped), optimizer=opt)


def state_bytes(model, opt) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    masks = sum(m.numel() * m.element_size() + f.numel() * f.element_size()
                for m, f in getattr(model, "masks", {}).values())
    optim = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    grads = params  # one gradient per parameter element during the step
    return {"weights_and_indices": params + buffers + masks, "optimizer_state": optim, "gradients": grads,
            "weights_and_optimizer_state": params + buffers + masks + optim}


def bench_mlp(repeats: int, width: int = 10000, density: float = 0.01, batch: int = 128, period: int = 100) -> dict:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    runs = {kind: mlp_models(width, density, kind == "masked") for kind in ("masked", "csr")}
    for model, opt in runs.values():
        train_step(model, opt, x, y)  # warm-up; creates the momentum buffers
    gens = {kind: torch.Generator().manual_seed(2) for kind in runs}
    cases = {}
    for kind, (model, opt) in runs.items():
        cases[f"step_{kind}"] = lambda m=model, o=opt: train_step(m, o, x, y)
        cases[f"topo_{kind}"] = lambda m=model, o=opt, k=kind: topology_change(m, o, gens[k])
    t = interleaved(cases, repeats)
    amort = {k: median(t[f"step_{k}"]) + median(t[f"topo_{k}"]) / period for k in runs}
    mem = {k: state_bytes(*runs[k]) for k in runs}
    return {"shape": f"784-{width}-{width}-10", "density": density, "batch": batch, "period": period,
            "seconds": t, "amortized_step_seconds": amort, "speedup": amort["masked"] / amort["csr"],
            "topology_change_over_step_csr": median(t["topo_csr"]) / median(t["step_csr"]),
            "bytes": mem, "memory_ratio": mem["masked"]["weights_and_optimizer_state"]
            / mem["csr"]["weights_and_optimizer_state"]}


def child(kind: str, width: int, density: float, batch: int) -> None:
    """One process per width: build, train one step, change topology, train again; report peaks."""
    torch.set_num_threads(1)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (KiB on Linux)
    out = {"kind": kind, "width": width, "baseline_rss": peak()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    model, opt = mlp_models(width, density, kind == "masked")
    out["after_build_rss"] = peak()
    out["step_seconds"] = timed(lambda: train_step(model, opt, x, y))
    out["after_step_rss"] = peak()
    if kind == "csr":  # "csr-step" stops after the step: the topology change peaks higher
        out["second_step_seconds"] = timed(lambda: train_step(model, opt, x, y))
        out["topology_seconds"] = timed(lambda: topology_change(model, opt, g))
        out["after_topology_rss"] = peak()
    out["bytes"] = state_bytes(model, opt)
    print(json.dumps(out))


def run_child(kind: str, width: int, density: float, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(width), str(density), str(batch)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        return {"kind": kind, "width": width, "failed": res.stderr[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_widest(widths: list[int], cap_gib: float, density: float = 0.01, batch: int = 128) -> dict:
    masked = [run_child("masked", w, density, batch) for w in (5000, 10000)]
    # peak = a + b * X^2 through the two measured widths, solved for the 24 GiB machine
    (x0, p0), (x1, p1) = [(m["width"], m["after_step_rss"]) for m in masked]
    b = (p1 - p0) / (x1**2 - x0**2)
    a = p0 - b * x0**2
    masked_fit = math.sqrt((24 * GiB - a) / b)
    per_weight = 17  # weight, gradient, momentum, float mask (4 B each) and bool mask (1 B)
    masked_tensors = math.sqrt(24 * GiB / per_weight)
    csr = []
    for w in widths:
        if len(csr) >= 2 and "failed" not in csr[-1]:
            # peak grows with the entries (width^2): skip a width predicted over the cap
            (w0, q0), (w1, q1) = [(c["width"], max(c["after_step_rss"], c.get("after_topology_rss", 0)))
                                  for c in csr[-2:]]
            bb = (q1 - q0) / (w1**2 - w0**2)
            if q1 + bb * (w**2 - w1**2) > cap_gib * GiB:
                csr.append({"width": w, "skipped": f"predicted peak over the {cap_gib} GiB cap"})
                continue
        csr.append(run_child("csr", w, density, batch))
    return {"density": density, "batch": batch, "cap_gib": cap_gib, "masked_measured": masked,
            "masked_widest_fit_24GiB": masked_fit, "masked_widest_from_tensor_bytes_24GiB": masked_tensors,
            "csr": csr}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds at batch 128 and for the MLP")
    ap.add_argument("--repeats-other", type=int, default=3, help="interleaved rounds at batch 32 and 512")
    ap.add_argument("--widest", action="store_true", help="also the widest-MLP memory measurement (minutes, GiBs)")
    ap.add_argument("--widths", default="50000,100000,150000,200000")
    ap.add_argument("--cap-gib", type=float, default=18.0)
    ap.add_argument("--skip-layer", action="store_true", help="skip the per-layer sweep")
    ap.add_argument("--widest-only", action="store_true",
                    help="run only the widest-MLP part and add it to the existing results/truly_sparse.json")
    ap.add_argument("--mlp-only", action="store_true",
                    help="re-measure only the MLP part into the existing results/truly_sparse.json")
    ap.add_argument("--step-only", action="store_true",
                    help="with --widest-only: CSR widths measured through the training step only, added to the table")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), float(args.child[2]), int(args.child[3]))
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    if args.mlp_only:  # re-measure the MLP part into the results of an earlier full run
        payload = json.loads((RESULTS / "truly_sparse.json").read_text())
        payload["results"]["mlp"] = bench_mlp(args.repeats)
        ev = evidence()
        ev["load_average_before"], ev["load_average_after"] = load_before, os.getloadavg()
        payload["evidence_mlp"] = ev
        text = markdown(payload["results"], payload["evidence"], payload.get("evidence_widest"),
                        payload.get("evidence_widest_step_only"), ev)
        write_results("truly_sparse", payload, text)
        print(text)
        return
    if args.widest_only:  # add the widest-MLP part to the results of an earlier full run
        path = RESULTS / "truly_sparse.json"
        payload = json.loads(path.read_text())
        widths = [int(w) for w in args.widths.split(",")]
        ev_key = "evidence_widest"
        if args.step_only:  # add step-only CSR widths to an earlier widest run
            payload["results"]["widest"]["csr"] += [run_child("csr-step", w, 0.01, 128) for w in widths]
            ev_key = "evidence_widest_step_only"
        else:
            payload["results"]["widest"] = bench_widest(widths, args.cap_gib)
        ev = evidence()
        ev["load_average_before"], ev["load_average_after"] = load_before, os.getloadavg()
        payload[ev_key] = ev
        text = markdown(payload["results"], payload["evidence"], payload.get("evidence_widest"),
                        payload.get("evidence_widest_step_only"), payload.get("evidence_mlp"))
        write_results("truly_sparse", payload, text)
        print(text)
        return
    results: dict = {"layer": {}, "crossover_density": {}}
    if not args.skip_layer:
        for batch in BATCHES:
            cases = layer_cases(batch, DENSITIES)
            for fn in cases.values():
                fn()  # warm-up
            t = interleaved(cases, args.repeats if batch == 128 else args.repeats_other)
            ratios = {d: median(t["masked"]) / median(t[f"csr@{d}"]) for d in DENSITIES}
            results["layer"][str(batch)] = {"size": 4096, "seconds": t,
                                            "speedup": {str(d): r for d, r in ratios.items()}}
            results["crossover_density"][str(batch)] = crossover(ratios)
    results["mlp"] = bench_mlp(args.repeats)
    if args.widest:
        results["widest"] = bench_widest([int(w) for w in args.widths.split(",")], args.cap_gib)
    ev = evidence()
    ev["load_average_before"], ev["load_average_after"] = load_before, os.getloadavg()
    ev["dtype"] = "float32"
    payload = {"benchmark": "truly_sparse", "results": results, "evidence": ev}
    previous = RESULTS / "truly_sparse.json"
    if "widest" not in results and previous.exists():
        # the widest part (minutes, GiBs) is measured separately: keep the last one, with its evidence
        old = json.loads(previous.read_text())
        if "widest" in old.get("results", {}):
            results["widest"] = old["results"]["widest"]
            for key in ("evidence_widest", "evidence_widest_step_only"):
                if key in old:
                    payload[key] = old[key]
    text = markdown(results, ev, payload.get("evidence_widest"), payload.get("evidence_widest_step_only"))
    path = write_results("truly_sparse", payload, text)
    print(text)
    print(f"wrote {path}")


def markdown(r: dict, ev: dict, ev_widest: dict | None = None, ev_step: dict | None = None,
             ev_mlp: dict | None = None) -> str:
    lines = [f"# Truly sparse (CSR) against masked dense, {ev['device']}, {ev['threads']} thread, float32", ""]
    if r["layer"]:
        lines += ["## 4096x4096 layer, full step (forward, both gradients, SGD-momentum update): masked / CSR", "",
                  "| batch | " + " | ".join(f"d={d}" for d in DENSITIES) + " | crossover density |",
                  "|---" * (len(DENSITIES) + 2) + "|"]
        for b, v in r["layer"].items():
            cross = r["crossover_density"][b]
            lines.append(f"| {b} | " + " | ".join(f"{v['speedup'][str(d)]:.2f}x" for d in DENSITIES)
                         + (f" | {cross:.3g} |" if cross is not None else " | none in the grid |"))
        s = r["layer"]["128"]["speedup"]
        lines += ["", f"Goals at batch 128: >= 12x at 0.01 (measured {s['0.01']:.1f}x, met: {s['0.01'] >= 12}); "
                  f">= 40x at 0.001 (measured {s['0.001']:.1f}x, met: {s['0.001'] >= 40}).", ""]
    m = r["mlp"]
    mb = m["bytes"]
    lines += [f"## MLP {m['shape']} at density {m['density']}, batch {m['batch']}, "
              f"topology change every {m['period']} steps", "",
              "| | masked | CSR | ratio | goal |", "|---|---|---|---|---|",
              f"| amortized step (s) | {m['amortized_step_seconds']['masked']:.4f} | "
              f"{m['amortized_step_seconds']['csr']:.4f} | {m['speedup']:.1f}x | >= 15x: {m['speedup'] >= 15} |",
              f"| weights + optimizer state (MiB) | {mb['masked']['weights_and_optimizer_state'] / 2**20:.1f} "
              f"| {mb['csr']['weights_and_optimizer_state'] / 2**20:.1f} | {m['memory_ratio']:.1f}x | >= 20x: "
              f"{m['memory_ratio'] >= 20} |",
              "", f"One CSR topology change costs {m['topology_change_over_step_csr']:.2f} CSR training steps.", ""]
    if ev_mlp:
        lines += [f"MLP part re-measured: commit {ev_mlp['commit']}, load average before "
                  f"{ev_mlp['load_average_before'][0]:.2f}, after {ev_mlp['load_average_after'][0]:.2f}; "
                  f"command `{ev_mlp['command']}`.", ""]
    if "widest" in r:
        w = r["widest"]
        lines += [f"## Widest 784-X-X-10 at density {w['density']}, batch {w['batch']} (peak RSS per subprocess)", "",
                  "| backend | X | peak RSS after step (GiB) | after topology change (GiB) | step (s) |",
                  "|---|---|---|---|---|"]
        for c in w["masked_measured"] + w["csr"]:
            if "after_step_rss" in c:
                topo = c.get("after_topology_rss")
                lines.append(f"| {c['kind']} | {c['width']} | {c['after_step_rss'] / GiB:.2f} | "
                             f"{'-' if topo is None else f'{topo / GiB:.2f}'} | {c['step_seconds']:.1f} |")
            else:
                lines.append(f"| csr | {c['width']} | {c.get('skipped') or 'failed: ' + c.get('failed', '')[-80:]} "
                             "| | |")
        lines += ["", f"Masked widest within 24 GiB: {w['masked_widest_fit_24GiB']:.0f} (fit of the measured peaks), "
                  f"{w['masked_widest_from_tensor_bytes_24GiB']:.0f} (17 bytes per dense weight).", ""]
        if ev_widest:
            lines += [f"Widest part: commit {ev_widest['commit']}, load average before "
                      f"{ev_widest['load_average_before'][0]:.2f}, after {ev_widest['load_average_after'][0]:.2f}; "
                      f"command `{ev_widest['command']}`.", ""]
        if ev_step:
            lines += [f"Rows `csr-step` (build and one training step, no topology change): commit {ev_step['commit']}, "
                      f"load average before {ev_step['load_average_before'][0]:.2f}, after "
                      f"{ev_step['load_average_after'][0]:.2f}; command `{ev_step['command']}`.", ""]
    lines += [f"Commit {ev['commit']} (uncommitted changes: {ev['uncommitted']}), torch {ev['torch']}, "
              f"load average before {ev['load_average_before'][0]:.2f}, after {ev['load_average_after'][0]:.2f} "
              "(2 cores shared with other agents' jobs).", f"Command: `{ev['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
