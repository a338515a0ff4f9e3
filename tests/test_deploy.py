"""Deploying a run (issue 25): compact checkpoints, ``dynsparse export``, ``load_sparse``,
``sparse_inference``, and a CSR model saved by HuggingFace / Lightning."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

from dynsparse import Sparsifier, Static, create_model, load_model, load_sparse, sparse_inference
from dynsparse.cli.commands import main, parse_train_args
from dynsparse.errors import DynsparseError
from dynsparse.sparse.compact import decode_index, encode_index, pack_state, unpack_state
from dynsparse.sparse.inference import SparseInferenceLinear
from dynsparse.training.checkpoint import read_checkpoint
from dynsparse.training.run import run_training

DSR = ("--initial-sparsity-fc", "0.9", "--rewire", "--threshold-prune", "--rewire-scaling", "--n-prune-params", "50")


def cfg_for(data, runs, *extra):
    schedule = data / "schedule.yaml"  # a rewire period of 3 steps, so tiny runs reallocate
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\n  - 1 : 0.05\nrewire_period_schedule:\n  - 0 : 3\n")
    return parse_train_args(["--model", "mnist_mlp", "--data", str(data), "--runs-dir", str(runs), "--batch-size", "16",
                             "--epochs", "2", "--no-progress", "--schedule-file", str(schedule), *DSR, *extra])[0]


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("model",):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            other = b["optimizer"]["state"][i][k]
            assert torch.equal(v, other) if torch.is_tensor(v) else v == other
    for k, v in a["sparsifier"]["masks"].items():
        assert torch.equal(v, b["sparsifier"]["masks"][k]), k


BACKENDS = {"masked": (), "csr": ("--sparse-backend", "csr", "--no-batch-norm")}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_compact_checkpoint_resumes_exactly(tiny_mnist, tmp_path, backend):
    flags = BACKENDS[backend]
    run_training(cfg_for(tiny_mnist, tmp_path / "a", *flags))
    run_training(cfg_for(tiny_mnist, tmp_path / "b", *flags, "--epochs", "1"))
    run_b = tmp_path / "b" / "mnist_mlp_0"
    raw = torch.load(run_b / "checkpoint.pt", weights_only=True)
    assert set(raw["compact"]) == {"fc1.weight", "fc_int.weight", "fc2.weight"}
    assert raw["sparsifier"]["masks"] == {}  # every mask is in the compact part (csr: the model's own indices)
    if backend == "masked":
        assert "fc1.weight" not in raw["model"] and raw["compact"]["fc1.weight"]["optimizer"]  # momentum compact too
    run_training(cfg_for(tiny_mnist, tmp_path / "b", *flags, "--resume", str(run_b)))
    a, b = read_checkpoint(tmp_path / "a" / "mnist_mlp_0"), read_checkpoint(run_b)
    assert_same_state(a, b)
    assert a["events"] == b["events"] and len(a["events"]) > 0
    assert [r["test_loss"] for r in a["history"]] == [r["test_loss"] for r in b["history"]]


def test_old_plain_checkpoint_still_loads(tiny_mnist, tmp_path):
    run_training(cfg_for(tiny_mnist, tmp_path / "a"))
    run_training(cfg_for(tiny_mnist, tmp_path / "b", "--epochs", "1"))
    run_b = tmp_path / "b" / "mnist_mlp_0"
    old = read_checkpoint(run_b)  # the v1 layout: dense weights and momentum, bool masks
    old["format"] = "dynsparse-checkpoint-v1"
    assert "compact" not in old and old["model"]["fc1.weight"].shape == (300, 784)
    torch.save(old, run_b / "checkpoint.pt")
    run_training(cfg_for(tiny_mnist, tmp_path / "b", "--resume", str(run_b)))
    assert_same_state(read_checkpoint(tmp_path / "a" / "mnist_mlp_0"), read_checkpoint(run_b))


def _saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


@pytest.mark.parametrize("density,goal", [(0.01, 20), (0.1, 4)])
def test_compact_checkpoint_size_goals(density, goal):
    # the model: a masked 784-2000-2000-10 MLP with SGD momentum, one step taken
    torch.manual_seed(0)
    model = create_model("mnist_mlp", hidden_sizes=(2000, 2000))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = Sparsifier(model, opt, policy=Static(), densities=density, hooks=False)
    model(torch.randn(8, 784)).sum().backward()
    s.before_optimizer_step()
    opt.step()
    s.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": s.state_dict()}
    packed = pack_state(state, s)
    ratio = _saved_bytes(state) / _saved_bytes(packed)
    assert ratio >= goal, ratio
    back = unpack_state(packed)
    assert_same_state(state, back)


def test_index_encoding_picks_the_smaller_and_round_trips():
    g = torch.Generator().manual_seed(0)
    for density, kind in ((0.005, "crow"), (0.5, "bits")):
        flat = torch.sort(torch.randperm(300 * 40, generator=g)[:int(density * 12000)]).values
        index = encode_index(flat, (300, 40))
        assert kind in index
        assert torch.equal(decode_index(index, (300, 40)), flat)


def test_state_nonzero_off_the_mask_stays_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = Sparsifier(model, opt, policy=Static(), densities=0.2, hooks=False, mask_optimizer_state=False)
    model(torch.randn(4, 20)).sum().backward()
    opt.step()  # no before_optimizer_step: the momentum is nonzero off the mask
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": s.state_dict()}
    packed = pack_state(state, s)
    assert not packed["compact"]["0.weight"]["optimizer"]  # kept dense, as it is
    assert_same_state(state, unpack_state(packed))


# ---- export ------------------------------------------------------------------------------------
def _trained(tiny_mnist, tmp_path, backend):
    run_training(cfg_for(tiny_mnist, tmp_path, *BACKENDS[backend], "--epochs", "1"))
    run = tmp_path / "mnist_mlp_0"
    ckpt = read_checkpoint(run)
    cfg = ckpt["config"]
    torch.manual_seed(0)
    model = create_model("mnist_mlp", batch_norm=not cfg["no_batch_norm"])
    if backend == "csr":  # the trained model as it ran: CSR layers
        Sparsifier(model, None, policy=Static(), densities=0.5, backend="csr")
    model.load_state_dict(ckpt["model"])
    return run, model.eval()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_export_round_trips(tiny_mnist, tmp_path, backend):
    run, trained = _trained(tiny_mnist, tmp_path, backend)
    x = torch.rand(5, 784)
    with torch.no_grad():
        expected = trained(x)
    assert main(["export", str(run), "--out", str(tmp_path / "dense.safetensors"), "--format", "dense"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "sparse.safetensors")]) == 0
    from safetensors.torch import load_file
    dense = load_file(tmp_path / "dense.safetensors")
    plain = create_model("mnist_mlp", batch_norm=backend == "masked").eval()
    plain.load_state_dict(dense)  # any copy of the architecture, without dynsparse
    with torch.no_grad():
        got = plain(x)
    if backend == "masked":
        assert torch.equal(got, expected)  # to the bit
    else:  # the trained model ran CSR products
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    back = load_sparse(tmp_path / "sparse.safetensors", dense=True)
    assert back.keys() == dense.keys() and all(torch.equal(back[k], dense[k]) for k in dense)
    csr = load_sparse(tmp_path / "sparse.safetensors")
    assert csr["fc1.weight"].layout == torch.sparse_csr and torch.equal(csr["fc1.weight"].to_dense(),
                                                                        dense["fc1.weight"])
    assert (tmp_path / "sparse.safetensors").stat().st_size < (tmp_path / "dense.safetensors").stat().st_size / 3
    served = load_model(tmp_path / "sparse.safetensors", backend="csr")
    assert isinstance(served.fc1, SparseInferenceLinear)
    with torch.no_grad():
        torch.testing.assert_close(served(x), expected, atol=1e-6, rtol=0)


def test_export_bad_inputs_one_line_exit_2_nothing_written(tiny_mnist, tmp_path, capsys):
    run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1"))
    run = tmp_path / "mnist_mlp_0"
    no_ckpt = tmp_path / "empty_run"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text("{}")
    not_ours = tmp_path / "notes.txt"
    not_ours.write_text("hello")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "checkpoint.pt").read_bytes()[:2000])
    out = tmp_path / "out.safetensors"
    for source, message in ((tmp_path / "nowhere", "not found"), (no_ckpt, "not found"),
                            (not_ours, "corrupt or unreadable"), (truncated, "corrupt or unreadable")):
        assert main(["export", str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))
    assert main(["export", str(run), "--out", str(out), "--format", "coo"]) == 2
    assert "invalid choice" in capsys.readouterr().err and not out.exists()


def test_load_sparse_refuses_foreign_and_truncated_files(tiny_mnist, tmp_path):
    from safetensors.torch import save_file
    run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1"))
    good = tmp_path / "m.safetensors"
    assert main(["export", str(tmp_path / "mnist_mlp_0"), "--out", str(good)]) == 0
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    for path, message in ((foreign, "not a dynsparse export"), (truncated, "truncated"),
                          (tmp_path / "none.safetensors", "not found")):
        with pytest.raises(DynsparseError, match=message) as e:
            load_sparse(path)
        assert "\n" not in str(e.value)
    meta = json.loads(__import__("safetensors").safe_open(str(good), "pt").metadata()["architecture"])
    assert meta["model"] == "mnist_mlp" and meta["num_classes"] == 10


# ---- inference ---------------------------------------------------------------------------------
def test_sparse_inference_matches_dense_at_every_batch_path():
    torch.manual_seed(0)
    model = create_model("mnist_mlp", hidden_sizes=(200, 100))
    for m in model.modules():  # trained statistics, so that folding the norms is tested
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    with torch.no_grad():
        for name in ("fc1", "fc_int"):
            w = getattr(model, name).weight
            w.mul_(torch.rand_like(w) < 0.05)
    model.eval()
    xs = [torch.rand(b, 784) for b in (1, 5, 40)]  # mv, MKL's product, embedding_bag
    with torch.no_grad():
        expected = [model(x) for x in xs]
    sparse_inference(model)  # auto: the 5% layers convert, the dense output layer stays
    assert isinstance(model.fc1, SparseInferenceLinear) and isinstance(model.fc2, nn.Linear)
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn3, nn.BatchNorm1d)  # folded where converted
    with torch.no_grad():
        for x, e in zip(xs, expected):
            torch.testing.assert_close(model(x), e, atol=1e-5, rtol=1e-5)
    with pytest.raises(DynsparseError, match="valid choices: auto, csr"):
        sparse_inference(model, backend="coo")


# ---- HuggingFace and Lightning ---------------------------------------------------------------------
@pytest.mark.slow
def test_huggingface_save_of_a_csr_model_reloads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=4)
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    Sparsifier(model, optimizer, policy=Static(), densities=0.3, exclude=["classifier.*", "bert.pooler.*"],
               backend="csr")
    data = [{"input_ids": torch.randint(4, 40, (12,)), "labels": torch.tensor(i % 4)} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    copy.deepcopy(model).save_pretrained(str(tmp_path / "copy"))  # a copy saves itself, densely too
    reloaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved")).eval()
    assert isinstance(reloaded.bert.encoder.layer[0].output.dense, nn.Linear)
    ids = torch.randint(4, 40, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5,
                                   rtol=0)
    copied = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "copy")).eval()
    assert torch.equal(copied.bert.encoder.layer[0].output.dense.weight,
                       reloaded.bert.encoder.layer[0].output.dense.weight)
    w = reloaded.bert.encoder.layer[0].output.dense.weight
    assert 0.2 < float(w.ne(0).float().mean()) <= 0.3  # the sparse weights, not a fresh initialization


def _lightning_module(L):
    from dynsparse import SET, Periodic

    class Net(L.LightningModule):
        """CSR layers are built with the module (so a checkpoint's CSR weights load into them); the
        optimizer is made there too and handed to Lightning; the sparsifier's own state rides
        in the checkpoint through the two hooks."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
            self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
            self.sparsifier = Sparsifier(self.net, self.optimizer, policy=SET(0.3, when=Periodic(3)), densities=0.2,
                                         exclude="2.*", backend="csr", total_steps=16)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return self.optimizer

        def on_save_checkpoint(self, checkpoint):
            checkpoint["sparsifier"] = self.sparsifier.state_dict()

        def on_load_checkpoint(self, checkpoint):
            self.sparsifier.load_state_dict(checkpoint["sparsifier"])

    return Net


@pytest.mark.slow
def test_lightning_checkpoint_of_a_csr_model_resumes(tmp_path):
    L = pytest.importorskip("lightning")
    import logging
    logging.getLogger("lightning").setLevel(logging.ERROR)
    Net = _lightning_module(L)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # 8 steps an epoch

    def fit(epochs, ckpt_path=None, save=False):
        model = Net()
        callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")] if save else []
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=save,
                            callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model

    straight = fit(2)
    fit(1, save=True)
    resumed = fit(2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert straight.sparsifier.step_count == resumed.sparsifier.step_count == 16
    assert len(straight.sparsifier.events) > 2
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
