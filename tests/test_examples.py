"""The examples run as written, and prove that the optimizer hooks make framework callbacks
unnecessary: a Lightning ``Trainer`` and a HuggingFace ``Trainer`` with just
``Sparsifier(model, optimizer, ...)`` attached train sparse and change the topology.

Lightning and transformers are optional extras (``.[lightning]``, ``.[hf]``, both in ``.[test]``);
without them those tests skip. They import large packages, so they are marked slow."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_sparse(s) -> None:
    for sp in s.params.values():
        assert int((sp.param.detach() * sp.inverse_mask_view()).ne(0).sum()) == 0, sp.name
    assert s.num_nonzero_weights() <= s.num_active_weights() < s.num_sparse_weights()


def test_plain_loop_example():
    s = load("plain_loop").main(steps=24, accumulate=2)
    assert_sparse(s)
    assert s.step_count == 24
    assert [e.step for e in s.events] == [10]  # every 10 steps until 0.75 * 24 = 18
    assert "attn.in_proj_weight" in s.params and "embed.weight" in s.params  # attention and the tied head


@pytest.mark.slow  # 300 steps
def test_custom_model_example():
    acc, s = load("custom_model").main()
    assert_sparse(s)
    assert s.step_count == 300  # explicit calls next to the hooks count each step once


@pytest.mark.slow
def test_lightning_trainer_needs_no_callback():
    pytest.importorskip("lightning")
    model, acc = load("lightning_example").main(epochs=2)
    s = model.sparsifier
    assert_sparse(s)
    assert s.step_count == 32 and [e.step for e in s.events] == [10, 20, 30]
    assert "4.weight" not in s.params and acc > 0.3  # excluded classifier; it learned something


@pytest.mark.slow
def test_huggingface_trainer_needs_no_callback():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    s = load("huggingface_example").main(steps=20)
    assert_sparse(s)
    assert s.step_count == 20  # optimizer steps, not the 40 accumulated micro-batches
    assert [e.step for e in s.events] == [5, 10] and s.totals()["total_pruned"] > 0  # until 0.75 * 20 = 15
    assert torch.is_tensor(next(iter(s.export().values())))
