"""RigL inside the HuggingFace ``Trainer``, with no callback: pass the optimizer the sparsifier
is attached to as ``optimizers=(optimizer, None)``. A tiny BERT is built from a config (no
download); the data is synthetic. Gradient accumulation and clipping are the Trainer's own.

Run: python examples/huggingface_example.py
(on a GPU if there is one; CPU: a few seconds; pip install transformers accelerate)
"""
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from dynsparse import Periodic, RigL, Sparsifier


class Tokens(torch.utils.data.Dataset):
    """Sequences whose label is their first token modulo 4."""

    def __init__(self, n=256, length=12, vocab=40):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 4}


def main(steps=40):
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # on its device first, then the optimizer and the sparsifier (one moved later follows too)
    model = BertForSequenceClassification(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # the one line: every linear weight of the encoder 80% sparse, RigL until 75% of training
    sparsifier = Sparsifier(model, optimizer, policy=RigL(0.3, when=Periodic(5, end_fraction=0.75)), densities=0.2,
                            exclude=["classifier.*", "bert.pooler.*"], total_steps=steps)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16,
                                 gradient_accumulation_steps=2, max_grad_norm=1.0, lr_scheduler_type="cosine",
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=device == "cpu",
                                 disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, None)).train()
    print(sparsifier.summary())
    print(f"{sparsifier.step_count} optimizer steps, {len(sparsifier.events)} topology updates; "
          f"{sparsifier.num_nonzero_weights()} nonzero of {sparsifier.num_sparse_weights()} sparse weights")
    return sparsifier


if __name__ == "__main__":
    main()
