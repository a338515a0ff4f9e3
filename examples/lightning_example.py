"""DSR inside PyTorch Lightning, with no callback: the sparsifier is built on the optimizer that
``configure_optimizers`` returns and rides on its step hooks (Lightning calls
``optimizer.step(closure)``; the sparsifier acts after the closure has computed the gradients).

Run: python examples/lightning_example.py   (CPU, synthetic data, a few seconds; pip install lightning)
"""
import logging

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dynsparse import DSR, Periodic, Sparsifier


class Classifier(L.LightningModule):
    def __init__(self, total_steps: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
        self.total_steps = total_steps
        self.sparsifier = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        # the one line; the classifier layer stays dense
        self.sparsifier = Sparsifier(self.net, optimizer, policy=DSR(n_prune=300, when=Periodic(10)),
                                     densities=0.1, exclude="4.*", total_steps=self.total_steps)
        return optimizer


def main(epochs=4):
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    y = (x[:, :4].argmax(1))  # learnable: the largest of the first four inputs
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Classifier(total_steps=epochs * len(loader))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(model, loader)
    s = model.sparsifier
    with torch.no_grad():
        acc = (model.net(x).argmax(1) == y).float().mean().item()
    print(s.summary())
    print(f"accuracy {acc:.3f}; {s.step_count} optimizer steps, {len(s.events)} reallocations; "
          f"{s.num_nonzero_weights()} nonzero of {s.num_sparse_weights()} sparse weights")
    return model, acc


if __name__ == "__main__":
    main()
