"""Training throughput (images/s), dense against DSR at sparsity 0.9, side by side, interleaved:
WRN-28-2 on CIFAR-10-shaped data (batch 100) and ResNet-50 on ImageNet-shaped data (batch 64 on
a GPU, 224 px; on CPU 112 px and batch 16, for a ratio only). Synthetic inputs held on the
device, so the loop measures the model and the sparsifier, not the loader. Uses bf16 autocast and
channels_last on CUDA (the settings a GPU user would pick), plain float32 on CPU;
``torch.backends.cudnn.benchmark`` is on for both arms.

Each timed repeat is a whole number of DSR's update periods (``--period``, 100 steps as in
training; ``--periods`` per repeat) and starts on a period boundary, so every repeat contains
exactly that many topology changes at the real rate, and the output counts them per repeat
(``topology_changes_per_repeat``). The warm-up is one such repeat per arm (cuDNN autotuning, the
allocator, the update's first run). The update's own cost (the policy's update and the re-masking
after it, device-synchronized on both sides) is measured separately, after the timed repeats.

Target (issue 6, GPU): DSR >= 0.95x dense images/s for WRN-28-2.
Usage: python benchmarks/bench_throughput.py [--period 100] [--periods 1] [--repeats 3] [--models wrn28_2,resnet50]
       python benchmarks/bench_throughput.py --quick --output /tmp/bench   # WRN-16-2, batch 8, seconds on a CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import evidence, interleaved, median, write_results  # noqa: E402

from dynsparse.models import create_model, sparse_parameter_names  # noqa: E402
from dynsparse.sparse import DSR, Periodic, Sparsifier  # noqa: E402
from dynsparse.training.loop import train_one_epoch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MODELS = ("wrn28_2", "resnet50", "wrn16_2")


def build(name: str, quick: bool):
    """The model, its input shape, batch size and DSR's n_prune (about 2% of its sparse weights)."""
    if name == "resnet50":
        size = 224 if CUDA else 112
        model = create_model("imagenet_resnet50", widen_factor=1, num_classes=1000)
        return model, (3, size, size), 64 if CUDA else 16, 400000
    layers = 16 if name == "wrn16_2" else 28
    model = create_model("cifar10_WideResNet", layers=layers, widen_factor=2)
    return model, (3, 32, 32), 8 if quick else 100, 2000 if layers == 16 else 20000


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def workload(name: str, sparse: bool, steps: int, period: int, quick: bool):
    torch.manual_seed(0)
    model, shape, batch, n_prune = build(name, quick)
    model = model.to(DEVICE)
    if CUDA:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    names = sparse_parameter_names(model)
    sp = (Sparsifier(model, opt, policy=DSR(n_prune=n_prune, when=Periodic(period)), densities={n: 0.1 for n in names})
          if sparse else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (batch,), generator=g).to(DEVICE)
    batches = [(x, y)] * steps
    changes: list[int] = []

    def run() -> None:
        before = len(sp.events) if sp is not None else 0
        train_one_epoch(model, batches, opt, sp, autocast=torch.bfloat16 if CUDA else None, channels_last=CUDA)
        changes.append(len(sp.events) - before if sp is not None else 0)
    return run, batch, sp, changes


def update_seconds(sp: Sparsifier, times: int = 3) -> list[float]:
    """The topology update alone, as the sparsifier runs it after a due step (the policy's update,
    then re-masking weights and optimizer state), synchronized on both sides."""
    out = []
    for _ in range(times):
        sync()
        t0 = time.perf_counter()
        sp._record(*sp.policy.update(sp.context()))
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--period", type=int, default=None, help="DSR's update period in steps (100; --quick: 4)")
    ap.add_argument("--periods", type=int, default=1, help="update periods per timed repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per arm (3; --quick: 2)")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--quick", action="store_true", help="WRN-16-2, batch 8, period 4, 2 repeats: a smoke run")
    ap.add_argument("--output", type=Path, default=None, help="directory for the results (benchmarks/results)")
    args = ap.parse_args()
    period = args.period or (4 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 3)
    models = (args.models or ("wrn16_2" if args.quick else "wrn28_2,resnet50")).split(",")
    if period < 1 or args.periods < 1 or repeats < 1 or any(m not in MODELS for m in models):
        ap.error(f"--period, --periods and --repeats must be >= 1 and --models of {', '.join(MODELS)}")
    torch.backends.cudnn.benchmark = True  # both arms: convolution algorithms chosen by timing, as in training
    steps = period * args.periods
    results, md = {}, []
    for name in models:
        (dense, batch, _, _), (dsr, _, sp, changes) = (workload(name, False, steps, period, args.quick),
                                                       workload(name, True, steps, period, args.quick))
        dense(), dsr()  # warm-up: one whole repeat each, its topology change included
        t = interleaved({"dense": dense, "dsr": dsr}, repeats, sync=True)
        per_repeat = changes[1:]  # the warm-up's first
        update = update_seconds(sp)
        ips = {k: batch * steps / median(v) for k, v in t.items()}
        ratio = ips["dsr"] / ips["dense"]
        share = median(update) * args.periods / median(t["dsr"])
        results[name] = {"images_per_step": batch, "steps_per_repeat": steps, "period": period,
                         "topology_changes_per_repeat": per_repeat, "seconds": t, "images_per_s": ips,
                         "update_seconds": update, "update_share_of_dsr_repeat": share,
                         "dsr_over_dense": ratio, "target": 0.95, "met": ratio >= 0.95}
        md.append(f"| {name} | {ips['dense']:.1f} | {ips['dsr']:.1f} | {ratio:.3f} | {min(per_repeat)} | "
                  f"{1e3 * median(update):.2f} ms ({100 * share:.2f}%) | >= 0.95 | {ratio >= 0.95} |")
    ev = evidence()
    text = "\n".join([f"# Training throughput ({DEVICE.type}, median of {repeats}, interleaved)", "",
                      f"Each timed repeat: {steps} steps = {args.periods} DSR update period(s) of {period} steps; "
                      f"cudnn.benchmark {torch.backends.cudnn.benchmark}.", "",
                      "| model | dense img/s | DSR 0.9 img/s | ratio | topology changes per repeat | one update "
                      "(share of a DSR repeat) | target | met |", "|---|---|---|---|---|---|---|---|", *md, "",
                      f"Device {ev['device']}, {ev['threads']} threads, torch {ev['torch']}, commit {ev['commit']}."
                      + ("" if CUDA else " CPU: absolute numbers are not meaningful; the ratio is."),
                      f"Command: `{ev['command']}`" + (f" Note: {ev['note']}" if ev['note'] else ""), ""])
    payload = {"benchmark": "throughput", "quick": args.quick, "cudnn_benchmark": torch.backends.cudnn.benchmark,
               "results": results, "evidence": ev}
    path = write_results(f"throughput_{DEVICE.type}", payload, text, directory=args.output)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
