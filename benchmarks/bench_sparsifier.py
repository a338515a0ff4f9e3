"""Cost of the sparsity engine, side by side in one process, interleaved:

  overhead  -- training steps (batch 100, SGD momentum) of the MNIST MLP and of WRN-16-2 with
               the DSR sparsifier (masking every step, reallocation every `--period` steps,
               amortized) against the same loop without it. Target: <= 1.05x. Measured twice:
               called by the loop (`hooks=False`, as `dynsparse train` does) and attached
               through optimizer and gradient hooks (the library's default, one line).
  realloc   -- one DSR reallocation on WRN-28-2 at sparsity 0.9 against one training step at
               batch 100. Target: reallocation < step.

Synthetic inputs (timing does not depend on pixel values). CPU unless CUDA is available.
The WRN-16-2 blocks are shorter than the period, so they time the per-step masking only; the
reallocation's own cost is the third measurement (amortized over 100 steps it is ~1e-4 of a step).
Usage: python benchmarks/bench_sparsifier.py [--steps 60] [--repeats 7]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import evidence, interleaved, median, timed, write_results  # noqa: E402

from dynsparse.models import create_model  # noqa: E402
from dynsparse.sparse import DSR, Periodic, Sparsifier  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(model_name: str, sparse: bool, density: float, period: int, hooks: bool = False, **kw):
    torch.manual_seed(0)
    model = create_model(model_name, **kw).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sp = (Sparsifier(model, opt, policy=DSR(n_prune=2000, when=Periodic(period)), densities=density, hooks=hooks)
          if sparse else None)
    return model, opt, sp


def make_steps(model, opt, sp, x, y, steps, explicit: bool = True):
    """``explicit``: the loop calls the sparsifier (dynsparse train's way); otherwise only
    ``optimizer.step()``, the sparsifier attached through its hooks (the library's default)."""
    def run():
        model.train()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sp and explicit:
                sp.before_optimizer_step()
            opt.step()
            if sp and explicit:
                sp.step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="training steps per timed block (MLP: 5x, WRN: a sixth)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved blocks per case (3 were too noisy on 2 cores)")
    ap.add_argument("--period", type=int, default=100, help="DSR reallocation period in steps")
    args = ap.parse_args()
    sync = DEVICE.type == "cuda"
    g = torch.Generator().manual_seed(0)
    results, md = {}, []

    workloads = {
        "mnist_mlp": (dict(), torch.randn(100, 1, 28, 28, generator=g), 0.02, args.steps * 5),
        "wrn_16_2": (dict(layers=16, widen_factor=2), torch.randn(100, 3, 32, 32, generator=g), 0.1,
                     max(args.steps // 6, 5)),
    }
    for name, (kw, x, density, steps) in workloads.items():
        model_name = "mnist_mlp" if name == "mnist_mlp" else "cifar10_WideResNet"
        x = x.to(DEVICE)
        y = torch.randint(0, 10, (100,), generator=g).to(DEVICE)
        dense = make_steps(*setup(model_name, False, density, args.period, **kw), x, y, steps)
        sparse = make_steps(*setup(model_name, True, density, args.period, **kw), x, y, steps)
        hooked = make_steps(*setup(model_name, True, density, args.period, hooks=True, **kw), x, y, steps,
                            explicit=False)
        dense(), sparse(), hooked()  # warm-up
        t = interleaved({"dense": dense, "dsr": sparse, "dsr_hooks": hooked}, args.repeats, sync)
        ratio = median(t["dsr"]) / median(t["dense"])
        ratio_hooks = median(t["dsr_hooks"]) / median(t["dense"])
        results[f"overhead_{name}"] = {"steps": steps, "seconds": t, "ratio": ratio, "target": 1.05,
                                       "met": ratio <= 1.05,
                                       "ratio_attached_by_hooks": ratio_hooks}
        md.append(f"| {name}: {steps} steps with DSR (loop calls it) / without | {ratio:.3f} | <= 1.05 | "
                  f"{ratio <= 1.05} |")
        md.append(f"| {name}: the same, DSR attached by optimizer/gradient hooks / without | {ratio_hooks:.3f} "
                  "| - | - |")

    # one reallocation on WRN-28-2 at 0.9 against one training step at batch 100
    model, opt, sp = setup("cifar10_WideResNet", True, 0.1, 10**9, layers=28, widen_factor=2)
    x = torch.randn(100, 3, 32, 32, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (100,), generator=g).to(DEVICE)
    step = make_steps(model, opt, sp, x, y, 1)
    step()
    sp.policy.threshold = 0.01  # a realistic operating point: thousands of entries move
    realloc_t, step_t, moved = [], [], []
    def realloc():
        moved.append(sp.policy.update(sp.context())[0])
        sp.apply_masks()

    for _ in range(args.repeats):
        step_t.append(timed(step, sync))
        realloc_t.append(timed(realloc, sync))
        sp.policy.threshold = 0.01
    r = median(realloc_t) / median(step_t)
    results["realloc_wrn_28_2"] = {"realloc_seconds": realloc_t, "step_seconds": step_t, "entries_moved": moved,
                                   "ratio": r, "target": "< 1", "met": r < 1}
    md.append(f"| WRN-28-2 @0.9: one DSR reallocation ({median(moved):.0f} entries moved) / one step (batch 100) "
              f"| {r:.3f} | < 1 | {r < 1} |")

    ev = evidence()
    text = "\n".join([f"# Sparsifier cost ({DEVICE.type}, median of {args.repeats}, interleaved)", "",
                      "| measurement | ratio | target | met |", "|---|---|---|---|", *md, "",
                      f"Device {ev['device']}, {ev['threads']} threads, torch {ev['torch']}, commit {ev['commit']}.",
                      f"Command: `{ev['command']}`" + (f" Note: {ev['note']}" if ev['note'] else ""), ""])
    path = write_results("sparsifier", {"benchmark": "sparsifier", "results": results, "evidence": ev}, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
