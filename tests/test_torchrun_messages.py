"""Under torchrun an error is said once, by rank 0 (dynsparse/cli/torchrun.py). The other ranks
used to wait a fixed 3 s and then speak: on a loaded machine torchrun took 4 s to stop them, so
the line appeared twice. Now a rank stays quiet once local rank 0's error file exists."""
from __future__ import annotations

import json

import pytest

from dynsparse.cli import torchrun


@pytest.fixture
def rank1(tmp_path, monkeypatch):
    attempt = tmp_path / "attempt_0"
    for r in ("0", "1"):
        (attempt / r).mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "1" / "error.json"))
    monkeypatch.setattr(torchrun, "OTHER_RANKS_WAIT_S", 0.0)
    monkeypatch.setattr(torchrun, "RANK0_ERROR_WAIT_S", 0.3)
    return attempt


def test_a_rank_stays_quiet_when_rank_0_said_the_error(rank1, capsys):
    (rank1 / "0" / "error.json").write_text("{}")
    torchrun.say_error("dynsparse: error: bad")
    assert capsys.readouterr().err == ""
    assert not (rank1 / "1" / "error.json").exists()


def test_a_rank_that_failed_on_its_own_says_so_with_its_rank(rank1, capsys):
    torchrun.say_error("dynsparse: error: bad")
    line = "dynsparse (rank 1): error: bad"
    assert capsys.readouterr().err.strip() == line
    assert json.loads((rank1 / "1" / "error.json").read_text())["message"]["message"] == line


def test_rank_0_speaks_at_once(rank1, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(rank1 / "0" / "error.json"))
    torchrun.say_error("dynsparse: error: bad")
    assert capsys.readouterr().err.strip() == "dynsparse: error: bad"
    assert (rank1 / "0" / "error.json").exists()
