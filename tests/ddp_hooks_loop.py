"""Run under ``torchrun --nproc-per-node 2`` by tests/test_ddp_hooks.py: a plain DDP loop (gloo)
with micro-batches (``no_sync``) and a ``GradScaler``, once with the sparsifier attached by hooks
(the loop only calls ``scaler.step(optimizer)``) and once with ``hooks=False`` and the explicit
calls, for RigL and SNFS. Each rank saves its final masks, weights, counters and SNFS momentum to
``OUT/<policy>_<mode>_rank<r>.pt``."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dynsparse.sparse import SNFS, Periodic, RigL, Sparsifier

STEPS, MICRO = 9, 2


def run(policy_name: str, hooks: bool, rank: int, out: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = RigL(when=Periodic(2)) if policy_name == "rigl" else SNFS(when=Periodic(3))
    s = Sparsifier(model, opt, policy=policy, densities=0.25, total_steps=100, hooks=hooks)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    for _ in range(STEPS):
        opt.zero_grad()
        for k in range(MICRO):
            x, y = torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
            with ddp.no_sync() if k < MICRO - 1 else contextlib.nullcontext():
                loss = nn.functional.cross_entropy(ddp(x), y) / MICRO
                scaler.scale(loss).backward()
        if hooks:
            scaler.step(opt)  # unscale_, then the optimizer's step: the sparsifier's hooks do the rest
        else:
            scaler.unscale_(opt)
            s.before_optimizer_step()
            scaler.step(opt)
            s.step()
        scaler.update()
    state = {"masks": {n: sp.topology() for n, sp in s.params.items()},
             "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
             "step_count": s.step_count, "totals": s.totals(), "events": len(s.events),
             "momentum": dict(getattr(policy, "momentum", {})), "scale": scaler.get_scale()}
    torch.save(state, out / f"{policy_name}_{'hooks' if hooks else 'explicit'}_rank{rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for policy_name in ("rigl", "snfs"):
            for hooks in (True, False):
                run(policy_name, hooks, rank, out)
        dist.barrier()  # no rank tears gloo down while another still uses it (aborted under load)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
