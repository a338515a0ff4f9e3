"""The CSR linear layer's compiled (numba) products against PyTorch's, and what they do to the
784-10000-10000-10 MLP's training step at density 0.01 (batch 128), side by side in one process.

- ``ops``: each product of the MLP's two CSR layers (fc1 784->10000, fc_int 10000->10000) and of
  a small layer (the bit-identity check's 784->300 at density 0.1, batch 50), PyTorch's against
  the compiled one (``dynsparse.sparse.kernels.csr_linear``), interleaved, per thread count.
- ``breakdown``: one CSR training step under ``torch.profiler`` (1 thread), self time per
  product, with PyTorch's products (``torch`` mode) and with ``auto`` (the default).
- ``step``: the whole step through the engine, as ``bench_sparse_engine.py`` measures it
  (``Sparsifier(..., policy=DSR, backend=...)``, a DSR change amortized over 100 steps): the dense
  network (no sparsifier), masked, and CSR with each kernel mode, interleaved, per thread count.

Records the CPU model and its vector extensions (AVX-512, AMX) and the load average.

Usage: python benchmarks/bench_csr_kernels.py [--repeats 5] [--threads 1,2] [--parts ops,breakdown,step]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sparse_engine import build, change, step  # noqa: E402
from common import evidence, interleaved, median, write_results  # noqa: E402

from dynsparse.models import MnistMLP  # noqa: E402
from dynsparse.sparse.kernels import csr_linear as csr_kernels  # noqa: E402
from dynsparse.sparse.layers.csr_functions import spmm  # noqa: E402
from dynsparse.sparse.layers.csr_linear import CSRWeight  # noqa: E402

LAYERS = {"fc_int 10000x10000 d=0.01 B=128": (10000, 10000, 0.01, 128),
          "fc1 10000x784 d=0.01 B=128": (10000, 784, 0.01, 128),
          "784->300 d=0.1 B=50 (bit-identity check)": (300, 784, 0.1, 50)}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def set_threads(threads: int) -> None:
    """PyTorch's and numba's thread counts alike (the fused batch norm runs on numba's)."""
    import numba
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def with_mode(mode: str, fn):
    def run():
        previous = csr_kernels.set_mode(mode)
        try:
            fn()
        finally:
            csr_kernels.set_mode(previous)
    return run


def op_cases(w: CSRWeight, v: torch.Tensor, xt: torch.Tensor, dyt: torch.Tensor) -> dict:
    pattern = torch.sparse_csr_tensor(w.crow_indices, w.col_indices, v, w.shape, check_invariants=False)
    return {
        "forward/torch": lambda: spmm(w.crow_indices, w.col_indices, v, xt),
        "forward/numba": lambda: csr_kernels.spmm(w.crow_indices, w.col_indices, v, xt),
        "input_grad/torch": lambda: spmm(w.t_crow, w.t_col, v.index_select(0, w.t_perm), dyt),
        "input_grad/numba": lambda: csr_kernels.spmm_t(w.t_crow, w.t_col, w.t_perm, v, dyt),
        "weight_grad/torch": lambda: torch.sparse.sampled_addmm(pattern, dyt, xt.t(), beta=0.0).values(),
        "weight_grad/numba": lambda: csr_kernels.sddmm(w.crow_indices, w.col_indices, dyt, xt)}


def bench_ops(repeats: int, threads: int) -> dict:
    set_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (o, i, d, b) in LAYERS.items():
        w = CSRWeight.random(o, i, d, g)
        v, xt, dyt = w.values.detach(), torch.randn(i, b, generator=g), torch.randn(o, b, generator=g)
        cases = op_cases(w, v, xt, dyt)
        for fn in cases.values():
            fn()  # compile / load from numba's cache, warm caches
        t = interleaved(cases, repeats)
        ms = {k: {"min": min(v) * 1e3, "median": median(v) * 1e3} for k, v in t.items()}
        out[name] = {"ms": ms, "numba_speedup_min": {op: ms[f"{op}/torch"]["min"] / ms[f"{op}/numba"]["min"]
                                                     for op in csr_kernels.OPS}}
    return out


CATEGORIES = {  # profiler event -> part of the step
    "aten::sparse_sampled_addmm": "weight-gradient SDDMM", "csr_kernels::sddmm": "weight-gradient SDDMM",
    "aten::_embedding_bag_forward_only": "forward products", "csr_kernels::spmm": "forward products",
    "aten::_embedding_bag": "input-gradient products", "csr_kernels::spmm_t": "input-gradient products",
    "aten::index_select": "input-gradient products", "aten::mm": "dense output layer (fc2)",
    "aten::addmm": "dense output layer (fc2)",
    "aten::native_batch_norm": "batch norm + ReLU", "aten::native_batch_norm_backward": "batch norm + ReLU",
    "aten::threshold_backward": "batch norm + ReLU", "aten::clamp_min": "batch norm + ReLU",
    "aten::relu": "batch norm + ReLU", "aten::copy_": "layout copies (x^T, dy^T)",
    "_BNReLU": "batch norm + ReLU", "_BNReLUBackward": "batch norm + ReLU",
    "Optimizer.step#SGD.step": "optimizer step", "aten::add_": "optimizer step", "aten::mul_": "optimizer step"}


def bench_breakdown(steps: int = 5) -> dict:
    """Self time of every op of a CSR step under torch.profiler (1 thread), by kernel mode."""
    from torch.profiler import ProfilerActivity, profile
    set_threads(1)
    torch.manual_seed(0)
    model = MnistMLP(hidden_sizes=(10000, 10000), sparse_density=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    runs = {mode: with_mode(mode, lambda: step(model, opt, x, y)) for mode in ("torch", "auto")}
    parts: dict[str, dict[str, float]] = {mode: {} for mode in runs}
    for run in runs.values():
        run()
    for _ in range(steps):  # one profiled step per mode per round, interleaved (a shared machine)
        for mode, run in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            for ev in prof.key_averages():
                part = CATEGORIES.get(ev.key, "other")
                parts[mode][part] = parts[mode].get(part, 0.0) + ev.self_cpu_time_total / 1e3 / steps
    return {mode: {"ms_per_step": dict(sorted(p.items(), key=lambda kv: -kv[1])), "total_ms": sum(p.values())}
            for mode, p in parts.items()}


def bench_step(repeats: int, threads: int, period: int = 100) -> dict:
    set_threads(threads)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    torch.manual_seed(0)
    dense = MnistMLP(hidden_sizes=(10000, 10000))
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)
    masked, csr = build(10000, 0.01, "masked"), build(10000, 0.01, "csr")
    cases = {"dense": lambda: step(dense, dense_opt, x, y),
             "step_masked": lambda: step(*masked[:2], x, y),
             "change_masked": lambda: (step(*masked[:2], x, y), change(masked[2]))}
    for mode in ("torch", "auto"):
        cases[f"step_csr_{mode}"] = with_mode(mode, lambda: step(*csr[:2], x, y))
        cases[f"change_csr_{mode}"] = with_mode(mode, lambda: (step(*csr[:2], x, y), change(csr[2])))
    for name in ("dense", "step_masked", "step_csr_torch", "step_csr_auto"):
        cases[name]()  # warm-up: momentum buffers, numba's kernels loaded
    t = interleaved(cases, repeats)
    med = {k: median(v) for k, v in t.items()}
    amort = {"masked": med["step_masked"] + max(med["change_masked"] - med["step_masked"], 0.0) / period}
    for mode in ("torch", "auto"):
        amort[f"csr_{mode}"] = (med[f"step_csr_{mode}"]
                                + max(med[f"change_csr_{mode}"] - med[f"step_csr_{mode}"], 0.0) / period)
    return {"threads": threads, "period": period, "seconds": t, "median_seconds": med,
            "amortized_step_seconds": amort,
            "speedup_vs_masked": {m: amort["masked"] / amort[f"csr_{m}"] for m in ("torch", "auto")},
            "speedup_vs_dense": {m: med["dense"] / amort[f"csr_{m}"] for m in ("torch", "auto")}}


def markdown(res: dict) -> str:
    ev = res["evidence"]
    cpu = ev["cpu"]
    lines = ["# CSR linear layer: compiled (numba) products against PyTorch's", "",
             f"`{ev['command']}` at {ev['commit'][:10]}{' (uncommitted changes)' if ev['uncommitted'] else ''}, "
             f"torch {ev['torch']}, {ev['time']}.", "",
             f"CPU: **{cpu['model']}**; avx512f: {'avx512f' in cpu['vector_extensions']}, "
             f"AMX: {any(f.startswith('amx') for f in cpu['vector_extensions'])}; {cpu['cores_available']} cores.", "",
             f"Load (`uptime`) before: `{res['uptime_before']}`; after: `{res['uptime_after']}`. "
             f"{ev['note'] or ''}", ""]
    if "step" in res:
        lines += ["## Whole training step, 784-10000-10000-10 at density 0.01, batch 128 (through the engine, DSR "
                  "change amortized over 100 steps)", "",
                  "| threads | dense (s) | masked (s) | CSR, PyTorch products (s) | CSR, auto (s) | masked / CSR torch "
                  "| masked / CSR auto | dense / CSR torch | dense / CSR auto |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["step"]:
            a, m = r["amortized_step_seconds"], r["median_seconds"]
            lines.append(f"| {r['threads']} | {m['dense']:.4f} | {a['masked']:.4f} | {a['csr_torch']:.4f} | "
                         f"{a['csr_auto']:.4f} | {r['speedup_vs_masked']['torch']:.1f}x | "
                         f"**{r['speedup_vs_masked']['auto']:.1f}x** | {r['speedup_vs_dense']['torch']:.1f}x | "
                         f"**{r['speedup_vs_dense']['auto']:.1f}x** |")
        lines += ["", "Medians of interleaved rounds (a masked or CSR change case runs a step first; its median less "
                  "the step's is the change).", ""]
    if "breakdown" in res:
        b = res["breakdown"]
        keys = list(b["torch"]["ms_per_step"])
        lines += ["## One CSR step under torch.profiler, 1 thread (self time, ms per step)", "",
                  "| part | PyTorch products | auto |", "|---|---|---|"]
        for k in keys:
            lines.append(f"| {k} | {b['torch']['ms_per_step'][k]:.1f} | {b['auto']['ms_per_step'].get(k, 0.0):.1f} |")
        lines += [f"| total | {b['torch']['total_ms']:.1f} | {b['auto']['total_ms']:.1f} |", ""]
    if "ops" in res:
        lines += ["## Per product, PyTorch against numba (ms, minimum of interleaved rounds)", "",
                  "| layer | threads | forward torch | forward numba | input grad torch | input grad numba "
                  "| weight grad torch | weight grad numba |", "|---|---|---|---|---|---|---|---|"]
        for threads, per in res["ops"].items():
            for name, r in per.items():
                ms = r["ms"]
                lines.append(f"| {name} | {threads} | " + " | ".join(
                    f"{ms[f'{op}/{k}']['min']:.2f}" for op in csr_kernels.OPS for k in ("torch", "numba")) + " |")
        lines.append("")
    lines.append(f"`auto` runs compiled: {sorted(csr_kernels.AUTO_OPS)} for layers with active entries x batch >= "
                 f"{csr_kernels.AUTO_MIN_WORK}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--parts", default="ops,breakdown,step")
    ap.add_argument("--name", default="csr_kernels", help="results file name in benchmarks/results")
    args = ap.parse_args()
    if not csr_kernels.available():
        sys.exit("this benchmark needs numba: pip install 'dynsparse[kernels]'")
    parts, threads = args.parts.split(","), [int(t) for t in args.threads.split(",")]
    res: dict = {"evidence": evidence(), "uptime_before": uptime()}
    if "ops" in parts:
        res["ops"] = {t: bench_ops(max(args.repeats, 7), t) for t in threads}
    if "breakdown" in parts:
        res["breakdown"] = bench_breakdown()
    if "step" in parts:
        res["step"] = [bench_step(args.repeats, t) for t in threads]
    res["uptime_after"] = uptime()
    md = markdown(res)
    path = write_results(args.name, res, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
