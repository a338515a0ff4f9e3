"""Training runs for tests/test_fsdp.py: the same tiny model and data, unsharded (one process,
``python tests/fsdp_worker.py OUT ...``) or FSDP2-sharded under torchrun (``--fsdp``). Writes, on
rank 0, the losses of every step and the whole masks after every topology update, per policy.

``--save DIR`` / ``--resume DIR``: a distributed checkpoint (model, optimizer, sparsifier) after
``--steps`` steps / continue from one (any number of ranks) for ``--steps`` more.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynsparse.sparse import (
    DSR,
    MEST,
    SET,
    SNFS,
    DeepR,
    GradualPruning,
    Periodic,
    RigL,
    Sparsifier,
    Static,
)
from dynsparse.sparse.when import AtEpochEnds

PRUNE = {"0.weight": 0.8, "2.weight": 0.7, "4.weight": 0.75, "6.weight": 0.6}
EPOCH = 10  # steps per (pretend) epoch, for gradual pruning at epoch ends

POLICIES = {
    "set": lambda: SET(fraction=0.2, when=Periodic(5)),
    "rigl": lambda: RigL(fraction=0.3, when=Periodic(5, end_fraction=0.75)),
    "dsr": lambda: DSR(n_prune=15, when=Periodic(5)),
    "snfs": lambda: SNFS(fraction=0.4, when=Periodic(5, end_fraction=0.75)),
    "static": Static,
    "mest": lambda: MEST(fraction=0.3, when=Periodic(5, end_fraction=0.75)),
    "set-initial": lambda: SET(fraction=0.2, when=Periodic(5)),  # new weights drawn, written per shard
    "rigl-conv": lambda: RigL(fraction=0.3, when=Periodic(5, end_fraction=0.75)),  # masks per kernel slice
    # noise on every step's gradients, sign flips dropped and regrown at random every step
    "deepr": lambda: DeepR(eta=0.05, temperature=lambda epoch: 0.02),
    "deepr-initial": lambda: DeepR(eta=0.05, temperature=lambda epoch: 0.02),  # regrown weights drawn, per shard
    "prune": lambda: GradualPruning(PRUNE, when=AtEpochEnds(count=4)),
    "prune-global": lambda: GradualPruning(PRUNE, cubic=True, global_threshold=True, when=AtEpochEnds(count=4)),
}
# fewer steps for the later additions (the tests are slow): DeepR changes masks every step
STEPS = {"deepr": 40, "deepr-initial": 40, "prune": 50, "prune-global": 50}


class ConvNet(nn.Module):
    """A conv layer (7 filters: 3, 2 and 2 per rank of 3) masked per kernel slice, then a linear one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 7, (1, 2)), nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x.view(-1, 2, 1, 3))).flatten(1))
BATCH = 12  # divides by 2 and 3: the ranks' half or third batches average to the whole batch's gradient


def build(policy: str, fsdp: bool, device: str = "cpu"):
    torch.manual_seed(0)
    # 10, 7, 4 and 3 rows: uneven shards over 2 and 3 ranks (of 3 ranks, one holds 1 row of the 7
    # and one no row of the 4). 3 classes: with 2, cross-entropy gives the two output rows gradients
    # of equal magnitude, and RigL's growth would choose between exact ties
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 4),
                          nn.Tanh(), nn.Linear(4, 3)).to(device)
    if policy == "rigl-conv":
        model = ConvNet().to(device)
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.children():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fully_shard(layer)
        fully_shard(model)
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if policy in ("rigl", "static", "rigl-conv")
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    s = Sparsifier(model, opt, policy=POLICIES[policy](), densities=0.5, total_steps=400, seed=3,
                   new_weights="initial" if policy.endswith("-initial") else "zero",
                   granularity=2 if "conv" in policy else 4)
    return model, opt, s


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 6, generator=g)
    return x, torch.randint(0, 3, (BATCH,), generator=g)


def whole_masks(s) -> dict[str, torch.Tensor]:
    out = {}
    for n, sp in s.params.items():
        t = sp.topology()
        out[n] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def train(model, opt, s, steps: int, start: int, rank: int, world: int, fsdp: bool, device: str = "cpu"):
    losses, updates = [], []
    per = BATCH // world if fsdp else BATCH
    for step in range(start, start + steps):
        x, y = (t.to(device) for t in batch(step))
        x, y = (x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) if fsdp else (x, y)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if fsdp:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
        if isinstance(s.policy, GradualPruning) and (step + 1) % EPOCH == 0:
            s.end_epoch()
            s.set_epoch((step + 1) // EPOCH)
        if isinstance(s.policy, DeepR) or (s.events and s.events[-1].step == s.step_count):  # DeepR records no events
            updates.append((s.step_count, {k: v.cpu() for k, v in whole_masks(s).items()}))
    return losses, updates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--save")
    ap.add_argument("--resume")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # float64: sums in another order stay far below any decision
    rank, world = 0, 1
    if a.fsdp:
        if a.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if a.device == "cuda" else "cpu"
    results = {}
    for policy in a.policies.split(","):
        model, opt, s = build(policy, a.fsdp, device)
        start = 0
        if a.resume:
            start = load(Path(a.resume) / policy, model, opt, s)
        steps = min(a.steps, STEPS.get(policy, a.steps))
        losses, updates = train(model, opt, s, steps, start, rank, world, a.fsdp, device)
        if a.save:
            save(Path(a.save) / policy, model, opt, s)
        results[policy] = {"losses": losses, "updates": updates, "export": {k: v.cpu() for k, v in s.export().items()},
                           "summary": s.summary(),
                           "step_count": s.step_count, "world": world,
                           "momentum": {n: (m.full_tensor() if hasattr(m, "full_tensor") else m).cpu()
                                        for n, m in getattr(s.policy, "momentum", {}).items()}}
    if rank == 0:
        torch.save(results, a.out)
    if a.fsdp:
        dist.barrier()  # no rank tears gloo down while another still uses it (aborted under load)
        dist.destroy_process_group()


def save(path: Path, model, opt, s) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "sparsifier": s.state_dict()}, checkpoint_id=str(path))


def load(path: Path, model, opt, s) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "sparsifier": s.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    s.load_state_dict(state["sparsifier"])
    return s.step_count


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
