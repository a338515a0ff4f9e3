"""Truly sparse Conv2d layers (compiled numba kernels, batch-innermost layout) against PyTorch's
dense convolution (oneDNN), side by side, interleaved, in one process.

One layer's forward + backward (input gradient and weight gradient; the sparse weight gradient
only at the active entries) at batch 128, on 1 and 2 threads, for the WRN-28-2 shapes:
  3x3 64->64 at 16x16 stride 1 (the issue's reference layer), 3x3 32->64 at 32x32 stride 2 (a
  block transition), 1x1 64->64 at 16x16 -- over a density grid; the ratio dense / sparse, each
  kernel's throughput in GFLOP/s (useful FLOPs: 2 per multiply-add at the active entries, times
  3 for forward + two gradients) and the crossover density (where sparse stops winning).
The sparse side gets its input already ``[C, H, W, B]`` (the layout stays batch-innermost through
a network); the dense side gets NCHW. Goals (issue 27): >= 2x at density 0.1, >= 3.5x at 0.05.

With --wrn (or --wrn-only): a whole WRN-28-2 training step, batch 128, 32x32 inputs, block convs
uniform at density 0.1 and 0.05 and as DSR leaves them at sparsity 0.9 (and that halved for 0.95),
dense vs masked vs CSR (see bench_wrn); goals >= 1.5x / >= 2.5x dense.

With --shapes resnet (or all): the layer shapes of ResNet-18/50 (torchvision's stem) at 64x64
(Tiny-ImageNet) and 32x32 (CIFAR) inputs instead (or as well).

Usage: python benchmarks/bench_sparse_conv.py [--repeats 7] [--threads 1 2] [--wrn | --wrn-only]
       [--shapes wrn|resnet|all] [--name sparse_conv]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import itertools

from common import evidence, interleaved, median, write_results

from dynsparse.models.convnets import WideResNet
from dynsparse.sparse.kernels.conv import csc_of, kernels, sparse_conv2d, to_cbhw
from dynsparse.sparse.layers.csr_conv import CSRWideResNet

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
SHAPES = {  # name: c_in, c_out, k, stride, pad, h
    "3x3 64->64 16x16": (64, 64, 3, 1, 1, 16),
    "3x3 32->64 32x32 stride 2": (32, 64, 3, 2, 1, 32),
    "1x1 64->64 16x16": (64, 64, 1, 1, 0, 16),
}
# ResNet-18/50 (torchvision's stem: the input / 4 at layer1) at Tiny-ImageNet's 64x64 (layer1-4 at
# 16, 8, 4, 2) and CIFAR's 32x32 (8, 4, 2, 1); 3x3 64->64 16x16 is ResNet-18's layer1 at 64x64
RESNET_SHAPES = {
    "3x3 128->128 8x8": (128, 128, 3, 1, 1, 8),
    "3x3 64->128 16x16 stride 2": (64, 128, 3, 2, 1, 16),
    "3x3 128->256 8x8 stride 2": (128, 256, 3, 2, 1, 8),
    "3x3 256->512 4x4 stride 2": (256, 512, 3, 2, 1, 4),
    "3x3 256->256 4x4": (256, 256, 3, 1, 1, 4),
    "3x3 512->512 2x2": (512, 512, 3, 1, 1, 2),
    "3x3 512->512 1x1": (512, 512, 3, 1, 1, 1),
    "1x1 256->64 16x16": (256, 64, 1, 1, 0, 16),
    "1x1 64->256 16x16": (64, 256, 1, 1, 0, 16),
    "1x1 2048->512 2x2": (2048, 512, 1, 1, 0, 2),
}


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "amx": any(f.startswith("amx") for f in flags)}


def load() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def crossover(ratios: dict[float, float]) -> float | None:
    """Density where dense/sparse crosses 1, interpolated in log-log between grid points."""
    pts = sorted(ratios.items())
    for (d0, r0), (d1, r1) in itertools.pairwise(pts):
        if r0 >= 1.0 > r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return None if pts[0][1] < 1.0 else float("inf")


def sparse_weight(c_out, c_in, k, density, g):
    """A random CSR weight with exactly round(density * entries) nonzeros (uniform placement)."""
    n = c_in * k * k
    nnz = max(1, round(density * c_out * n))
    flat = torch.randperm(c_out * n, generator=g)[:nnz].sort().values
    rows, cols = flat // n, flat % n
    crow = torch.zeros(c_out + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=c_out), 0)
    return crow, cols.to(torch.int32), torch.randn(nnz, generator=g).requires_grad_()


def bench_shape(shape, batch: int, repeats: int) -> dict:
    c_in, c_out, k, stride, pad, h = shape
    g = torch.Generator().manual_seed(0)
    ho = (h + 2 * pad - k) // stride + 1
    x = torch.randn(batch, c_in, h, h, generator=g).requires_grad_()
    w = torch.randn(c_out, c_in, k, k, generator=g).requires_grad_()
    dy = torch.randn(batch, c_out, ho, ho, generator=g)
    xc, dyc = to_cbhw(x.detach()).requires_grad_(), to_cbhw(dy)

    def dense():
        x.grad = w.grad = None
        F.conv2d(x, w, stride=stride, padding=pad).backward(dy)

    cases, nnz = {"dense": dense}, {}
    for d in DENSITIES:
        crow, col, vals = sparse_weight(c_out, c_in, k, d, g)
        tr = csc_of(crow, col, c_in, k * k)  # cached per topology in a layer
        nnz[d] = vals.numel()

        def sparse(crow=crow, col=col, vals=vals, tr=tr):
            xc.grad = vals.grad = None
            sparse_conv2d(xc, vals, crow, col, (c_out, c_in, k, k), stride, pad, tr).backward(dyc)

        cases[d] = sparse
    for fn in cases.values():  # warm-up: compile / load the kernels, allocate
        fn()
    times = {key: median(ts) for key, ts in interleaved(cases, repeats).items()}
    per_mac = 2 * 3 * ho * ho * batch  # forward + input gradient + weight gradient
    out = {"dense_ms": times["dense"] * 1e3, "dense_gflops": c_out * c_in * k * k * per_mac / times["dense"] / 1e9,
           "sparse": {}}
    for d in DENSITIES:
        out["sparse"][str(d)] = {"ms": times[d] * 1e3, "speedup": times["dense"] / times[d],
                                 "gflops": nnz[d] * per_mac / times[d] / 1e9}
    out["crossover_density"] = crossover({d: times["dense"] / times[d] for d in DENSITIES})
    return out


DSR_PROFILE = Path(__file__).parent / "results" / "wrn28_2_dsr_densities.json"


def wrn_profiles(names: list[str]) -> dict[str, tuple[dict[str, float], bool]]:
    """label -> (density per block conv, per kernel?). Uniform over the layers (DSR's start, masks
    per weight) at sparsity 0.9 and 0.95, and where DSR moves the entries: the per-layer kernel
    densities after 2 epochs of DSR at 0.9 on CIFAR-10 (``DSR_PROFILE``: the early, 32x32 layers
    denser, the late 8x8 ones sparser; the same total), and that profile halved for 0.95 (no DSR
    run at 0.95 was made: an assumption, said in the results)."""
    dsr = json.loads(DSR_PROFILE.read_text())["densities"]
    if set(dsr) != set(names):
        raise SystemExit(f"{DSR_PROFILE} names other layers than WRN-28-2's block convs")
    return {"uniform 0.1 (per weight)": ({n: 0.1 for n in names}, False),
            "uniform 0.05 (per weight)": ({n: 0.05 for n in names}, False),
            "DSR-left, sparsity 0.9 (per kernel)": (dict(dsr), True),
            "DSR-left halved, sparsity 0.95 (per kernel)": ({n: d / 2 for n, d in dsr.items()}, True)}


def bench_wrn(batch: int, repeats: int) -> dict:
    """One WRN-28-2 training step (forward, backward, SGD-momentum update), CIFAR-10 shapes:
    dense (oneDNN), masked (dense + mask multiplies, what the masked engine does) and CSR
    (sparse block convs batch-innermost) for each density profile of :func:`wrn_profiles`."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    wrn = WideResNet(depth=28, widen_factor=2, num_classes=10)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    params = dict(wrn.named_parameters())
    names = [n for n in wrn.sparse_parameter_names() if params[n].dim() == 4 and n != "conv1.weight"
             and "shortcut" not in n]

    def step_fn(model, masks=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        params = dict(model.named_parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            for n, m in (masks or {}).items():
                params[n].grad.mul_(m)
            opt.step()
            if masks:
                with torch.no_grad():
                    for n, m in masks.items():
                        params[n].mul_(m)
        return step, opt

    cases, opts, state, profiles = {}, {}, {}, wrn_profiles(names)
    cases["dense"], opts["dense"] = step_fn(wrn)
    for label, (density, per_kernel) in profiles.items():
        masks = {}
        for n in names:
            shape = params[n].shape[:2] if per_kernel else params[n].shape
            m = torch.zeros(shape.numel())
            m[torch.randperm(shape.numel(), generator=g)[:round(density[n] * shape.numel())]] = 1
            m = m.view(shape)
            masks[n] = m[:, :, None, None].expand(params[n].shape).contiguous() if per_kernel else m
        masked = copy.deepcopy(wrn)
        cases[f"masked {label}"], opts[f"masked {label}"] = step_fn(masked, masks)
        csr = CSRWideResNet(copy.deepcopy(wrn), {n: m.bool() for n, m in masks.items()})
        cases[f"csr {label}"], opts[f"csr {label}"] = step_fn(csr)
    for fn in cases.values():
        fn()
    times = {k: median(ts) for k, ts in interleaved(cases, repeats).items()}
    for k, opt in opts.items():  # weights + optimizer state, as the model holds them
        model_params = [p for group in opt.param_groups for p in group["params"]]
        nbytes = sum(p.numel() * p.element_size() for p in model_params)
        nbytes += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t))
        state[k] = nbytes
    out = {"dense_ms": times["dense"] * 1e3, "weights_and_optimizer_bytes": {"dense": state["dense"]}, "density": {}}
    for label, (density, _) in profiles.items():
        total = sum(density[n] * params[n].numel() for n in names) / sum(params[n].numel() for n in names)
        out["density"][label] = {
            "block_conv_density": total, "mean_layer_density": sum(density.values()) / len(density),
            "masked_ms": times[f"masked {label}"] * 1e3, "csr_ms": times[f"csr {label}"] * 1e3,
            "csr_vs_dense": times["dense"] / times[f"csr {label}"],
            "csr_vs_masked": times[f"masked {label}"] / times[f"csr {label}"],
            "masked_bytes": state[f"masked {label}"], "csr_bytes": state[f"csr {label}"]}
    return out


def markdown(payload: dict) -> str:
    ev, cpu = payload["evidence"], payload["cpu"]
    lines = ["# Truly sparse Conv2d layers vs dense (oneDNN), forward + backward, batch 128", "",
             (f"`{ev['command']}` at commit `{ev['commit']}`{' (uncommitted changes)' if ev['uncommitted'] else ''}, "
             f"torch {ev['torch']}, {ev['time']}."),
             (f"CPU: {cpu['model']}, {cpu['cores']} cores, avx2={cpu['avx2']} avx512f={cpu['avx512f']} "
             f"amx={cpu['amx']}."),
             (f"Load before: `{payload['load_before']}`; after: `{payload['load_after']}`. "
             "Absolute times depend on the load above; the ratios are side by side, interleaved."), ""]
    if ev.get("note"):
        lines += [f"Note: {ev['note']}", ""]
    for threads, shapes in payload["results"].items():
        lines += [f"## {threads} thread(s)", ""]
        classes = crossover_classes(shapes)
        lines += [("Crossover by (kernel, stride, fan-in class): the lowest among the shapes of the class (fan-in "
                   f"in_channels * k * k, wide above {WIDE_FAN_IN}); `auto`'s table "
                   "(`dynsparse.sparse.storage.convert.CONV_CROSSOVER_DENSITY`) holds the 1-thread row's values."),
                  "", "| kernel | stride | fan-in | crossover density | shapes |", "|---|---|---|---|---|"]
        for (k, stride, wide), (value, names) in sorted(classes.items()):
            lines.append(f"| {k}x{k} | {stride} | {'wide' if wide else 'narrow'} | {fmt(value)} | {', '.join(names)} |")
        lines.append("")
        for name, r in shapes.items():
            lines += [(f"### {name}: dense {r['dense_ms']:.1f} ms ({r['dense_gflops']:.1f} GFLOP/s); "
                      f"crossover density {fmt(r['crossover_density'])}"), "",
                      "| density | sparse ms | dense / sparse | sparse GFLOP/s (useful) |", "|---|---|---|---|"]
            for d, s in r["sparse"].items():
                lines.append(f"| {d} | {s['ms']:.1f} | {s['speedup']:.2f}x | {s['gflops']:.1f} |")
            lines.append("")
    for threads, r in payload.get("wrn", {}).items():
        lines += [(f"## WRN-28-2 training step, batch {payload['batch']}, CIFAR-10 shapes, {threads} thread(s): "
                  f"dense {r['dense_ms']:.0f} ms"), "",
                  ("Block convs sparse (the first conv, shortcuts and fc dense, as in the paper), uniform or "
                  f"as DSR left them (`{DSR_PROFILE.name}`: per-layer kernel densities after 2 epochs of DSR at "
                  "0.9; for 0.95 that profile halved, an assumption: no DSR run at 0.95 was made); masked = "
                  "dense products + mask multiplies; csr = compiled kernels batch-innermost. Block-conv density: "
                  "of all block-conv weights; mean layer density: the mean over the 24 layers (all but each "
                  "block's first conv have the same dense multiply-adds, so the sparse work follows this mean "
                  "more than the first)."), "",
                  ("| block convs | block-conv density | mean layer density | masked ms | csr ms | dense / csr | "
                   "masked / csr | weights + optimizer state: masked / csr bytes |"),
                  "|---|---|---|---|---|---|---|---|"]
        for d, v in r["density"].items():
            lines.append(f"| {d} | {v.get('block_conv_density', float('nan')):.3f} | "
                         f"{v.get('mean_layer_density', float('nan')):.3f} | {v['masked_ms']:.0f} | "
                         f"{v['csr_ms']:.0f} | "
                         f"{v['csr_vs_dense']:.2f}x | {v['csr_vs_masked']:.2f}x | "
                         f"{v['masked_bytes']:,} / {v['csr_bytes']:,} |")
        lines.append("")
    return "\n".join(lines)


WIDE_FAN_IN = 1152  # as dynsparse.sparse.storage.convert.WIDE_FAN_IN


def crossover_classes(shapes: dict) -> dict:
    """(k, stride, wide) -> (lowest crossover among the measured shapes of that class, their names):
    the spatial size is unknown when ``auto`` decides (it depends on the input), and in the ResNets
    the wide layers are the late, small ones, whose crossovers are lower."""
    out: dict = {}
    for name, r in shapes.items():
        c_in, _, k, stride, _, _ = {**SHAPES, **RESNET_SHAPES}[name]
        key = (k, stride, c_in * k * k > WIDE_FAN_IN)
        # none: dense faster at every density (never convert); above the grid: the grid's top
        value = min(r["crossover_density"], max(DENSITIES)) if r["crossover_density"] is not None else 0.0
        low, names = out.get(key, (float("inf"), []))
        out[key] = (min(low, value), [*names, name])
    return out


def fmt(x):
    return "none (dense faster everywhere)" if x is None else ("above the grid" if x == float("inf") else f"{x:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--wrn", action="store_true", help="also the whole WRN-28-2 training step (slow)")
    ap.add_argument("--wrn-only", action="store_true", help="only the WRN-28-2 step")
    ap.add_argument("--name", default="sparse_conv", help="results file name in benchmarks/results")
    ap.add_argument("--shapes", choices=("wrn", "resnet", "all"), default="wrn",
                    help="layer shapes: WRN-28-2's (default), ResNet-18/50's at 64x64 and 32x32 inputs, or both")
    args = ap.parse_args()
    import numba
    kernels()
    before = load()
    results = {}
    for t in args.threads:
        torch.set_num_threads(t)
        numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
        results[str(t)] = {}
        shapes = {"wrn": SHAPES, "resnet": RESNET_SHAPES, "all": {**SHAPES, **RESNET_SHAPES}}[args.shapes]
        for name, shape in ({} if args.wrn_only else shapes).items():
            results[str(t)][name] = r = bench_shape(shape, args.batch, args.repeats)
            print(f"{t} thread(s) {name}: dense {r['dense_ms']:.1f} ms; "
                  + ", ".join(f"{d}: {s['speedup']:.2f}x" for d, s in r["sparse"].items()), flush=True)
    wrn = {}
    if args.wrn or args.wrn_only:
        for t in args.threads:
            torch.set_num_threads(t)
            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
            wrn[str(t)] = r = bench_wrn(args.batch, args.repeats)
            print(f"{t} thread(s) WRN-28-2 step: dense {r['dense_ms']:.0f} ms; "
                  + ", ".join(f"{d}: csr {v['csr_vs_dense']:.2f}x dense, {v['csr_vs_masked']:.2f}x masked"
                              for d, v in r["density"].items()), flush=True)
    payload = {"benchmark": "sparse_conv", "cpu": cpu_info(), "load_before": before, "load_after": load(),
               "batch": args.batch, "results": {k: v for k, v in results.items() if v}, "wrn": wrn,
               "evidence": evidence()}
    print(write_results(args.name, payload, markdown(payload)))


if __name__ == "__main__":
    main()
