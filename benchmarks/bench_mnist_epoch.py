"""Time one MNIST training epoch (60k images, batch 100, LeNet-300-100 with BN, SGD) three ways,
side by side in one process, interleaved:

  dynsparse   -- dynsparse's on-device TensorLoader + train_one_epoch (dense, no sparsifier)
  plain       -- (a) a plain PyTorch loop over in-memory tensors (shuffle, index, normalize)
  dataloader  -- (b) a plain loop over a torch DataLoader of per-sample tensors, as the original:
                 torchvision's MNIST item (a PIL image) + ToTensor + Normalize, 1 worker process

Targets (issue 2): dynsparse <= 1.1x plain and <= 0.25x dataloader.
Usage: python benchmarks/bench_mnist_epoch.py [--data ../shared/data] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import evidence, interleaved, median, write_results  # noqa: E402

from dynsparse.data import MNIST_MEAN, MNIST_STD, TensorLoader, load_mnist, resolve_data_root  # noqa: E402
from dynsparse.errors import DynsparseError  # noqa: E402
from dynsparse.models import create_model  # noqa: E402
from dynsparse.training.loop import train_one_epoch  # noqa: E402


class PerSample(torch.utils.data.Dataset):
    """What torchvision's MNIST + ToTensor + Normalize does per sample."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div(255).unsqueeze(0)
        return (x - MNIST_MEAN[0]) / MNIST_STD[0], int(self.labels[i])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    try:
        x, y, _, _ = load_mnist(resolve_data_root(args.data), download=False)
        source = "MNIST"
    except DynsparseError:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (60000, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (60000,),
                                                                                                        generator=g)
        source = "synthetic (no MNIST found)"
    device = torch.device("cpu")
    bs = args.batch_size

    def fresh():
        torch.manual_seed(0)
        model = create_model("mnist_mlp")
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def run_dynsparse():
        model, opt = fresh()
        loader = TensorLoader(x.to(device), y.to(device), batch_size=bs, shuffle=True, seed=0,
                              mean=MNIST_MEAN, std=MNIST_STD)
        loader.set_epoch(0)
        train_one_epoch(model, loader, opt)

    def step(model, opt, xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run_plain():
        model, opt = fresh()
        model.train()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]
            step(model, opt, (x[idx].float().div(255) - MNIST_MEAN[0]) / MNIST_STD[0], y[idx])

    per_sample, pipeline = PerSample(x[:, 0], y), "tensor ops per sample (torchvision not installed)"
    try:  # the original's exact per-sample pipeline: torchvision's MNIST.__getitem__ (PIL image) + ToTensor + Normalize
        from torchvision import datasets, transforms

        class OriginalMNIST(datasets.MNIST):
            """torchvision's MNIST over tensors already read (it wants unpacked IDX files; ours are .gz)."""

            def __init__(self, images, labels, transform):
                datasets.VisionDataset.__init__(self, "", transform=transform)
                self.train, self.data, self.targets = True, images, labels

        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
        per_sample = OriginalMNIST(x[:, 0].contiguous(), y, tf)
        pipeline = "torchvision.datasets.MNIST.__getitem__ (PIL) + ToTensor + Normalize, as the original"
    except ImportError:
        pass

    def run_dataloader():
        model, opt = fresh()
        model.train()
        loader = torch.utils.data.DataLoader(per_sample, batch_size=bs, shuffle=True, num_workers=1)
        for xb, yb in loader:
            step(model, opt, xb, yb)

    cases = {"dynsparse": run_dynsparse, "plain": run_plain, "dataloader": run_dataloader}
    run_dynsparse()  # warm-up
    times = interleaved(cases, args.repeats)
    med = {k: median(v) for k, v in times.items()}
    ratios = {"dynsparse_over_plain": med["dynsparse"] / med["plain"],
              "dynsparse_over_dataloader": med["dynsparse"] / med["dataloader"]}
    targets = {"dynsparse_over_plain": 1.1, "dynsparse_over_dataloader": 0.25}
    payload = {"benchmark": "mnist_epoch", "data": source, "per_sample_pipeline": pipeline, "batch_size": bs,
               "repeats": args.repeats,
               "seconds": times, "median_seconds": med, "ratios": ratios, "targets": targets,
               "met": {k: ratios[k] <= targets[k] for k in targets}, "evidence": evidence()}
    md = [f"# MNIST epoch ({source}, batch {bs}, median of {args.repeats}, interleaved)", "",
          "| loop | seconds/epoch |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in med.items()]
    md += ["", "| ratio | measured | target | met |", "|---|---|---|---|"]
    md += [f"| {k} | {ratios[k]:.3f} | <= {targets[k]} | {payload['met'][k]} |" for k in ratios]
    ev = payload["evidence"]
    md += ["", f"Per-sample loop: {pipeline}, 1 worker process.",
           f"Device {ev['device']}, {ev['threads']} threads, torch {ev['torch']}, commit {ev['commit']}.",
           f"Command: `{ev['command']}`" + (f" Note: {ev['note']}" if ev['note'] else ""), ""]
    path = write_results("mnist_epoch", payload, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
