"""DSR on a model that is not one of dynsparse's: a small transformer classifier.

Run: python examples/custom_model.py   (CPU, synthetic data, a few seconds)
"""
import torch
from torch import nn

from dynsparse import DSR, Periodic, Sparsifier


class TinyTransformer(nn.Module):
    def __init__(self, vocab=50, dim=64, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def main():
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # every nn.Linear / conv weight is made 90% sparse; DSR moves 200 entries every 20 steps
    sparsifier = Sparsifier(model, optimizer, policy=DSR(n_prune=200, when=Periodic(20)), densities=0.1)
    tokens = torch.randint(0, 50, (512, 12))
    labels = tokens[:, 0] % 4  # learnable: the class is a function of the first token
    for _ in range(300):
        idx = torch.randint(0, 512, (32,))
        loss = nn.functional.cross_entropy(model(tokens[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
    with torch.no_grad():
        acc = (model(tokens).argmax(1) == labels).float().mean().item()
    events = sparsifier.drain_events()
    print(f"accuracy {acc:.3f}, {sparsifier.num_active_weights()} of {sparsifier.num_sparse_weights()} "
          f"sparse weights active, {len(events)} reallocations, threshold {sparsifier.policy.threshold:.2e}")
    return acc, sparsifier


if __name__ == "__main__":
    main()
