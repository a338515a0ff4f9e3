"""A small GPT-style language model trained with RigL while FSDP2 shards its parameters.

    torchrun --nproc_per_node 2 examples/gpt_fsdp_rigl.py          # CPU (gloo): under a minute

Every transformer block is its own FSDP unit (``fully_shard``); the sparsifier is built on the
sharded model exactly as on one device. Each rank keeps its rows of every mask; RigL's drops and
gradient-driven growth are decided on the whole tensors, identically on every rank. The data is
synthetic (sequences that repeat a random motif), so the loss falls quickly and nothing is
downloaded. ``--steps`` and ``--density`` change the run; only rank 0 prints.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from dynsparse.sparse import Periodic, RigL, Sparsifier


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def batches(rank: int, batch: int, context: int, vocab: int, seed: int = 0):
    """Each rank its own sequences: a random motif of 3-8 tokens, repeated."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    while True:
        rows = []
        for _ in range(batch):
            motif = torch.randint(vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
            rows.append(motif.repeat(context // motif.numel() + 2)[:context + 1])
        seq = torch.stack(rows)
        yield seq[:, :-1], seq[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE; use nccl (and .cuda()) on GPUs
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model on every rank
    model = GPT()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # every Linear weight (attention, MLP, output head) sparse; embeddings and norms stay dense
    sparsifier = Sparsifier(model, opt, policy=RigL(fraction=0.3, when=Periodic(25, end_fraction=0.75)),
                            densities=a.density, total_steps=a.steps)
    data = batches(rank, a.batch, context=32, vocab=64)
    for step in range(1, a.steps + 1):
        x, y = next(data)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()  # gradients were masked as they arrived; RigL updates every 25 steps
        if step % 25 == 0:
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                print(f"step {step:4d}  loss {float(total) / dist.get_world_size():.3f}  "
                      f"topology changes {len(sparsifier.events)}", flush=True)
    summary = sparsifier.summary()  # every rank takes part (it counts nonzeros over the shards)
    if rank == 0:
        print(summary)
    dist.barrier()  # every rank done with gloo before any tears it down (without it, ~1 in 2 loaded runs aborted)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
