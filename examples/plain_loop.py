"""RigL on a small byte-level transformer, in the loop you already have: one line attaches it.

The loop below is plain PyTorch (AdamW, cosine schedule, gradient accumulation, clipping) and
never calls dynsparse; the sparsifier rides on the optimizer's step hooks.

Run: python examples/plain_loop.py   (CPU, synthetic data, a few seconds)
"""
import torch
from torch import nn

from dynsparse import Periodic, RigL, Sparsifier


class TinyLM(nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: one sparse tensor
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, tokens):
        h = self.embed(tokens)
        causal = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)
        h = h + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return self.head(h + self.mlp(h))


def main(steps=60, accumulate=2):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    # the one line: 80% sparse, densities spread by ERK, RigL every 10 steps until 75% of training
    sparsifier = Sparsifier(model, optimizer, policy=RigL(0.3, when=Periodic(10, end_fraction=0.75)),
                            densities="erk", density=0.2, total_steps=steps)
    text = torch.arange(2048) * 7 % 64  # a learnable sequence
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            i = torch.randint(0, 2048 - 17, (8,))
            batch = torch.stack([text[j:j + 17] for j in i.tolist()])
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # sees masked gradients
        optimizer.step()
        schedule.step()
    print(sparsifier.summary())
    weights = sparsifier.export()  # a plain state_dict, masks applied
    print(f"final loss {loss.item() * accumulate:.3f}; {len(sparsifier.events)} topology updates; "
          f"{sparsifier.num_nonzero_weights()} nonzero of {sparsifier.num_sparse_weights()} sparse weights; "
          f"exported {len(weights)} tensors")
    return sparsifier


if __name__ == "__main__":
    main()
