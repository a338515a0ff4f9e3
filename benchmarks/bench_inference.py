"""CPU inference of a sparse model: ``dynsparse.sparse_inference`` (CSR layers) against the same
model dense (MKL) and as the masked backend leaves it (dense weights zero off the mask, plus the
mask), side by side in one process, interleaved repeat by repeat.

Models: one 4096x4096 linear layer, and the 784-10000-10000-10 MLP (batch norm, folded into the
CSR layers); densities 0.1, 0.01, 0.001 of every hidden linear weight (the MLP's 10-way output
layer stays dense, as it is in training); batches 1, 8, 64. Latency: median and p99 over the
repeats (3 timed forwards per arm and round after an untimed one, rounds interleaved; p99 of a few
dozen is close to their maximum) of the thread's CPU time per forward
(with 1 thread, the forward's cost without the waits for a core of a shared machine) and of the
wall time. Memory: the model's own bytes
(parameters, buffers, masks) and the peak RSS of a subprocess that builds only that arm (the CSR
arm without any dense tensor) and runs the forwards, above the interpreter's baseline. A density
sweep of the layer gives the crossover below which CSR answers faster (``INFERENCE_CROSSOVER``).

Run: python benchmarks/bench_inference.py [--repeats 10] [--threads 1]   (CPU, a few minutes)
Writes benchmarks/results/inference.json and .md, with commit, command and the machine's load.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, evidence, write_results  # noqa: E402
from dynsparse import create_model, sparse_inference  # noqa: E402
from dynsparse.sparse.inference import SparseInferenceLinear  # noqa: E402
from dynsparse.sparse.layers.csr_functions import sample_flat  # noqa: E402

DENSITIES = (0.1, 0.01, 0.001)
BATCHES = (1, 8, 64)
SWEEP = (0.5, 0.3, 0.2, 0.1, 0.05)
MLP_HIDDEN = (10000, 10000)
ARMS = ("dense", "masked", "csr")
INNER = 3  # timed forwards per arm and round, after one untimed


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def sparse_layer(out_f: int, in_f: int, density: float, gen: torch.Generator) -> SparseInferenceLinear:
    """A CSR inference layer of random positions and values, built without a dense tensor."""
    k = max(int(density * out_f * in_f + 0.1), 1)
    flat = sample_flat(out_f * in_f, k, gen)
    rows = torch.div(flat, in_f, rounding_mode="floor")
    crow = torch.zeros(out_f + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
    values = (torch.rand(k, generator=gen) * 2 - 1) / math.sqrt(in_f)
    return SparseInferenceLinear(crow, flat - rows * in_f, values, (out_f, in_f), torch.zeros(out_f))


def build(model: str, density: float, arm: str) -> tuple[nn.Module, int]:
    """The arm's model in eval mode, and its bytes (parameters + buffers + masks)."""
    gen = torch.Generator().manual_seed(0)
    if model == "layer":
        if arm == "csr":
            m = sparse_layer(4096, 4096, density, gen)
            return m.eval(), m.nbytes()
        m = nn.Linear(4096, 4096)
        linears = [m]
    else:
        if arm == "csr":  # the MLP's hidden layers as CSR straight away, the output layer dense
            with torch.device("meta"):
                m = create_model("mnist_mlp", hidden_sizes=MLP_HIDDEN)
            sizes = (784, *MLP_HIDDEN, 10)
            for i, name in enumerate(m.fc_names):
                layer = nn.Linear(sizes[i], sizes[i + 1], bias=False) if name == "fc2" else \
                    sparse_layer(sizes[i + 1], sizes[i], density, gen)
                setattr(m, name, layer)
                setattr(m, f"bn{i + 1}", nn.BatchNorm1d(sizes[i + 1]))
            m = sparse_inference(m.eval())  # folds the norms that follow the CSR layers
            return m, _nbytes(m)
        torch.manual_seed(0)
        m = create_model("mnist_mlp", hidden_sizes=MLP_HIDDEN)
        linears = [getattr(m, n) for n in m.fc_names[:-1]]
    masks = []
    if arm == "masked":
        with torch.no_grad():
            for lin in linears:
                mask = torch.rand(lin.weight.shape, generator=gen) < density
                lin.weight.mul_(mask)
                masks.append(mask)
    return m.eval(), _nbytes(m) + sum(x.numel() for x in masks)


def _nbytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def child(model: str, density: float, arm: str, batch: int) -> None:
    """Print the peak RSS (bytes) above the baseline of building the arm, and of then serving
    ``batch`` rows (a fresh input, two forwards: the second shows the allocator's reuse)."""
    torch.set_num_threads(1)
    in_f = 4096 if model == "layer" else 784
    with torch.no_grad():  # the libraries' own first-call buffers belong to the baseline, not to the arm
        nn.Linear(in_f, 8)(torch.rand(64, in_f))
        for b in BATCHES:  # each batch size has its own product (MKL's mv, MKL's mm, embedding_bag)
            SparseInferenceLinear.from_dense(torch.eye(8, in_f))(torch.rand(b, in_f))
    gc.collect()
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim(0)  # the baseline without the warm-up's freed heap (else the trim below would count against the arm)
    base, base_file = _status_kib("VmRSS"), _status_kib("RssFile")
    m, _ = build(model, density, arm)
    build_peak = _status_kib("VmHWM") - base
    gc.collect()
    trim(0)  # hand the build's freed temporaries back to the system
    # VmHWM, not ru_maxrss (Linux carries ru_maxrss over an exec: a child of a big parent would
    # report the parent's peak); reset after building, so the second peak is the serving one
    Path("/proc/self/clear_refs").write_text("5")
    with torch.no_grad():
        x = torch.rand(batch, in_f)
        for _ in range(2):
            m(x)
    # file-backed pages are the torch library's code that building touched for the first time
    # (sample_flat's unique, bincount, ...: about 3 MiB for the CSR arm), shared by every process
    # that loads torch, not memory of the model: left out of the serving peak, recorded apart
    code = max(_status_kib("RssFile") - base_file, 0)
    print(json.dumps({"peak_rss_bytes": (_status_kib("VmHWM") - base - code) * 1024,
                      "build_peak_bytes": build_peak * 1024,
                      "code_pages_bytes": code * 1024}))


def _status_kib(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def peak_rss(model: str, density: float, arm: str) -> dict:
    """Per batch size, a fresh subprocess: {"peak_rss_bytes": {batch: bytes}, "build_peak_bytes": {batch: bytes}}."""
    res: dict[str, dict] = {"peak_rss_bytes": {}, "build_peak_bytes": {}, "code_pages_bytes": {}}
    for b in BATCHES:
        out = subprocess.run([sys.executable, __file__, "--child", model, str(density), arm, str(b)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        got = json.loads(out.strip().splitlines()[-1])
        for k in res:
            res[k][str(b)] = got[k]
    return res


def measure_memory() -> dict:
    memory = {}
    for model in ("layer", "mlp"):
        for density in DENSITIES:
            for arm in (ARMS if density == 0.01 else ("csr",)):
                memory[f"{model}/{density}/{arm}"] = peak_rss(model, density, arm)
                print(f"memory {model} d={density} {arm}: "
                      + ", ".join(f"b={b} {v / 2**20:.1f} MiB" for b,
                                  v in memory[f"{model}/{density}/{arm}"]["peak_rss_bytes"].items())
                      + f"; load {load()}", flush=True)
    return memory


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


def time_arms(arms: dict[str, nn.Module], in_f: int, batch: int, repeats: int) -> dict[str, dict]:
    """Per arm, median and p99 of the wall time and of the thread's CPU time of one forward. On a
    machine shared with other work the wall time also holds the waits for a core (a preemption
    costs milliseconds, more than a whole sparse forward); the CPU time is what the forward costs."""
    x = torch.rand(batch, in_f)
    wall: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}
    with torch.no_grad():
        for _ in range(repeats):
            for name, m in arms.items():  # rounds interleaved: slow phases hit every arm alike
                m(x)  # untimed: a server answering requests keeps its model warm in the caches,
                for _ in range(INNER):  # while the previous arm (a dense 64 MiB weight) flushed them
                    w0, c0 = time.perf_counter(), time.thread_time()
                    m(x)
                    c1, w1 = time.thread_time(), time.perf_counter()
                    wall[name].append(w1 - w0)
                    cpu[name].append(c1 - c0)
    return {k: {"median_ms": 1e3 * statistics.median(cpu[k]), "p99_ms": 1e3 * pct(cpu[k], 0.99),
                "wall_median_ms": 1e3 * statistics.median(wall[k]), "wall_p99_ms": 1e3 * pct(wall[k], 0.99)}
            for k in arms}


def crossover(ratios: dict[float, float]) -> float | None:
    """Density where dense time / CSR time crosses 1, log-interpolated between measured densities;
    None when CSR is faster at every density measured (the crossover lies above the densest)."""
    pts = sorted(ratios.items())
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 >= 1 > r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return pts[0][0] if pts[0][1] < 1 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10, help="rounds; each times 3 forwards per arm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-only", action="store_true",
                    help="re-measure only the memory section; keep the latency and crossover results of the results "
                         "file")
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "DENSITY", "ARM", "BATCH"))
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], float(a.child[1]), a.child[2], int(a.child[3]))
    torch.set_num_threads(a.threads)
    if a.memory_only:
        old = json.loads((RESULTS / "inference.json").read_text())
        lat_ev = old.get("latency_evidence", old["evidence"])
        mem_load = load()
        memory = measure_memory()
        mem_ev = {**evidence(), "load_before": mem_load, "load_after": load()}
        return report(old["rows"], memory,
                      {int(b): {**s, "ratios": {float(d): r for d, r in s["ratios"].items()}}  # JSON keys are strings
                                            for b, s in old["crossover"].items()}, lat_ev, mem_ev)
    load_before, rows = load(), []
    for model, in_f in (("layer", 4096), ("mlp", 784)):
        for density in DENSITIES:
            built = {arm: build(model, density, arm) for arm in ARMS}
            arms = {arm: m for arm, (m, _) in built.items()}
            for batch in BATCHES:
                reps = a.repeats if model == "layer" or batch < 64 else max(3, a.repeats // 3)
                t = time_arms(arms, in_f, batch, reps)
                rows.append({"model": model, "density": density, "batch": batch, "repeats": reps, "times": t,
                             "model_bytes": {arm: b for arm, (_, b) in built.items()},
                             "speedup_vs_dense": t["dense"]["median_ms"] / t["csr"]["median_ms"],
                             "speedup_vs_masked": t["masked"]["median_ms"] / t["csr"]["median_ms"]})
                print(f"{model} d={density} b={batch}: dense {t['dense']['median_ms']:.3f} ms, masked "
                      f"{t['masked']['median_ms']:.3f} ms, csr {t['csr']['median_ms']:.3f} ms "
                      f"({rows[-1]['speedup_vs_dense']:.1f}x); load {load()}", flush=True)
            del built, arms
    mem_load = load()
    memory = measure_memory()
    mem_ev = {"load_before": mem_load, "load_after": load()}
    sweep = {}
    dense_layer = build("layer", 1.0, "dense")[0]
    for batch in BATCHES:
        ratios = {}
        for density in SWEEP:
            t = time_arms({"dense": dense_layer, "csr": build("layer", density, "csr")[0]}, 4096, batch,
                          max(3, a.repeats // 3))
            ratios[density] = t["dense"]["median_ms"] / t["csr"]["median_ms"]
        sweep[batch] = {"ratios": ratios, "crossover_density": crossover({**ratios, **{
            r["density"]: r["speedup_vs_dense"] for r in rows if r["model"] == "layer" and r["batch"] == batch}})}
        print(f"crossover at batch {batch}: {sweep[batch]['crossover_density']} (None: above {max(SWEEP)})", flush=True)
    ev = {**evidence(), "load_before": load_before, "load_after": load(), "repeats": a.repeats}
    report(rows, memory, sweep, ev, {**ev, **mem_ev})


def report(rows, memory, sweep, ev, mem_ev) -> None:
    """``ev``: evidence of the latency and crossover runs; ``mem_ev``: of the memory run (the same
    run, or a later ``--memory-only`` one)."""
    load_before, load_after = ev["load_before"], ev["load_after"]
    get = {(r["model"], r["density"], r["batch"]): r for r in rows}
    layer_goal = get[("layer", 0.01, 1)]["speedup_vs_dense"]
    mlp_goal = get[("mlp", 0.01, 1)]["speedup_vs_dense"]
    mem_ratio = {m: {b: memory[f"{m}/0.01/dense"]["peak_rss_bytes"][b] / memory[f"{m}/0.01/csr"]["peak_rss_bytes"][b]
                     for b in memory[f"{m}/0.01/csr"]["peak_rss_bytes"]} for m in ("layer", "mlp")}
    bytes_ratio = {m: get[(m, 0.01, 1)]["model_bytes"]["dense"] / get[(m, 0.01, 1)]["model_bytes"]["csr"]
                   for m in ("layer", "mlp")}
    goals = {"layer_batch1_vs_dense": [layer_goal, layer_goal >= 20], "mlp_batch1_vs_dense": [mlp_goal, mlp_goal >= 10],
             "memory_peak_rss_by_batch": {m: {b: [v, v >= 20] for b, v in r.items()} for m, r in mem_ratio.items()},
             "memory_model_bytes": {m: [v, v >= 20] for m, v in bytes_ratio.items()}}
    L = [f"# Sparse inference on CPU ({ev['device']}, {ev['threads']} thread(s), float32)", "",
         f"Latency and crossover run: load average (1, 5, 15 min) before {load_before}; after {load_after} (the "
         f"machine was shared with other work; the arms ran interleaved in one process, so their ratios are what "
         f"counts).", "",
         "## Latency: median (p99) of the thread's CPU time per forward, ms; speed-up of CSR over dense", "",
         "The wall-clock medians (in the JSON, `wall_median_ms`) include waits for a core on the shared machine.", "",
         "| model | density | batch | dense (MKL) | masked | CSR | CSR vs dense | CSR vs masked |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["times"]
        cell = lambda k, t=t: f"{t[k]['median_ms']:.3f} ({t[k]['p99_ms']:.3f})"  # noqa: E731
        L.append(f"| {r['model']} | {r['density']} | {r['batch']} | {cell('dense')} | {cell('masked')} | {cell('csr')} "
                 f"| {r['speedup_vs_dense']:.1f}x | {r['speedup_vs_masked']:.1f}x |")
    L += ["", "## Memory", "",
          "Peak RSS above the baseline (torch imported, every batch size's kernels warmed up) of a "
          "fresh subprocess per arm and batch size that builds only that arm, then (peak reset after building) serves "
          "one input of that batch twice; the serving peak holds the model, the input, the activations and the "
          "allocator's slack, not the torch library's code pages that building touched first (file-backed, shared; "
          "`code_pages_bytes` in the JSON). Building: the largest build peak of the three subprocesses.", "",
          f"Memory measured with `{mem_ev['command']}`; commit {mem_ev['commit']}"
          f"{' (uncommitted changes)' if mem_ev['uncommitted'] else ''}; {mem_ev['time']}; load average before "
          f"{mem_ev['load_before']}, after {mem_ev['load_after']}.", "",
          "| model | density | arm | model bytes (MiB) | peak RSS serving batch " + " | batch ".join(map(str, BATCHES))
          + " (MiB) | peak RSS building (MiB) |", "|---|---|---|---|" + "---|" * len(BATCHES) + "---|"]
    for key, peak in memory.items():
        model, density, arm = key.split("/")
        mb = get[(model, float(density), 1)]["model_bytes"][arm]
        L.append(f"| {model} | {density} | {arm} | {mb / 2**20:.1f} | "
                 + " | ".join(f"{peak['peak_rss_bytes'][str(b)] / 2**20:.1f}" for b in BATCHES)
                 + f" | {max(peak['build_peak_bytes'].values()) / 2**20:.1f} |")
    L += ["", "Dense / CSR peak RSS serving at density 0.01 (goal >= 20x):", "",
          "| model | " + " | ".join(f"batch {b}" for b in BATCHES) + " |", "|---|" + "---|" * len(BATCHES)]
    for m, r in mem_ratio.items():
        L.append(f"| {m} | " + " | ".join(f"{r[str(b)]:.1f}x{'' if r[str(b)] >= 20 else ' (short)'}"
                                          for b in BATCHES) + " |")
    L += ["", "## Crossover (4096x4096 layer): dense time / CSR time by density", "",
          "| batch | " + " | ".join(f"d={d}" for d in SWEEP) + " | crossover density |",
          "|---" * (len(SWEEP) + 2) + "|"]
    for b, s in sweep.items():
        c = s["crossover_density"]
        shown = f"{c:.3f}" if c is not None else f"above {max(SWEEP)} (CSR faster at every density swept)"
        L.append(f"| {b} | " + " | ".join(f"{s['ratios'][d]:.2f}x" for d in SWEEP) + f" | {shown} |")
    L += ["", "## Goals at density 0.01", "",
          f"- layer, batch 1, >= 20x faster than dense: {layer_goal:.1f}x, met: {layer_goal >= 20}",
          f"- MLP, batch 1, >= 10x faster than dense: {mlp_goal:.1f}x, met: {mlp_goal >= 10}",
          "- memory >= 20x smaller than dense: model bytes "
          + ", ".join(f"{m} {v:.1f}x" for m, v in bytes_ratio.items())
          + "; peak RSS serving "
          + "; ".join(f"{m} " + ", ".join(f"batch {b} {v:.1f}x (met: {v >= 20})" for b, v in r.items())
                      for m, r in mem_ratio.items()), "",
          f"Latency and crossover: command `{ev['command']}`; commit "
          f"{ev['commit']}{' (uncommitted changes)' if ev['uncommitted'] else ''}; {ev['time']}; torch {ev['torch']}.",
          ""]
    path = write_results("inference",
                         {"evidence": mem_ev, "latency_evidence": ev, "rows": rows, "peak_rss_bytes": memory,
                                       "crossover": sweep, "goals": goals}, "\n".join(L))
    print("\n".join(L))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
