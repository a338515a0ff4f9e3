"""Training throughput (images/s), dense against DSR at sparsity 0.9, side by side, interleaved:
WRN-28-2 on CIFAR-10-shaped data (batch 100) and ResNet-50 on ImageNet-shaped data (batch 64 on
a GPU, 224 px; on CPU a few steps at 112 px, for a ratio only). Synthetic inputs held on the
device, so the loop measures the model and the sparsifier, not the loader. Uses bf16 autocast and
channels_last on CUDA (the settings a GPU user would pick), plain float32 on CPU.

Target (issue 6, GPU): DSR >= 0.95x dense images/s for WRN-28-2.
Usage: python benchmarks/bench_throughput.py [--steps 20] [--repeats 3] [--models wrn,resnet]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import evidence, interleaved, median, write_results  # noqa: E402

from dynsparse.models import create_model, sparse_parameter_names  # noqa: E402
from dynsparse.sparse import DSR, Periodic, Sparsifier  # noqa: E402
from dynsparse.train import train_one_epoch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def workload(name: str, sparse: bool, steps: int):
    torch.manual_seed(0)
    if name == "wrn28_2":
        model, shape, batch, n_prune = create_model("cifar10_WideResNet", layers=28, widen_factor=2), (3, 32, 32), 100, 20000
    else:
        size = 224 if CUDA else 112
        model, shape, batch, n_prune = create_model("imagenet_resnet50", widen_factor=1, num_classes=1000), (3, size, size), 64 if CUDA else 16, 400000
    model = model.to(DEVICE)
    if CUDA:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    names = sparse_parameter_names(model)
    sp = (Sparsifier(model, opt, policy=DSR(n_prune=n_prune, when=Periodic(100)), densities={n: 0.1 for n in names})
          if sparse else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (batch,), generator=g).to(DEVICE)
    batches = [(x, y)] * steps
    run = lambda: train_one_epoch(model, batches, opt, sp, autocast=torch.bfloat16 if CUDA else None,
                                  channels_last=CUDA)
    return run, batch * steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20 if CUDA else 4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="wrn28_2,resnet50")
    args = ap.parse_args()
    results, md = {}, []
    for name in args.models.split(","):
        (dense, n), (dsr, _) = workload(name, False, args.steps), workload(name, True, args.steps)
        dense(), dsr()  # warm-up (cuDNN autotuning, allocator)
        t = interleaved({"dense": dense, "dsr": dsr}, args.repeats, sync=True)
        ips = {k: n / median(v) for k, v in t.items()}
        ratio = ips["dsr"] / ips["dense"]
        results[name] = {"images_per_step": n // args.steps, "steps": args.steps, "seconds": t,
                         "images_per_s": ips, "dsr_over_dense": ratio, "target": 0.95, "met": ratio >= 0.95}
        md.append(f"| {name} | {ips['dense']:.1f} | {ips['dsr']:.1f} | {ratio:.3f} | >= 0.95 | {ratio >= 0.95} |")
    ev = evidence()
    text = "\n".join([f"# Training throughput ({DEVICE.type}, median of {args.repeats}, interleaved)", "",
                      "| model | dense img/s | DSR 0.9 img/s | ratio | target | met |", "|---|---|---|---|---|---|", *md, "",
                      f"Device {ev['device']}, {ev['threads']} threads, torch {ev['torch']}, commit {ev['commit']}."
                      + ("" if CUDA else " CPU: absolute numbers are not meaningful; the ratio is."),
                      f"Command: `{ev['command']}`" + (f" Note: {ev['note']}" if ev['note'] else ""), ""])
    path = write_results(f"throughput_{DEVICE.type}", {"benchmark": "throughput", "results": results, "evidence": ev}, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
