"""Schedule lookup at boundaries, the original files unchanged, and malformed files."""
from __future__ import annotations

from pathlib import Path

import pytest

from dynsparse.errors import DynsparseError
from dynsparse.training.epoch_schedules import BUNDLED_DIR, PiecewiseConstant, load_schedules, resolve_schedule_path


def test_wrnet_schedule_boundaries():
    s = load_schedules("./learning_schedules/wrnet_schedule.yaml")  # resolved to the bundled copy
    assert [s.lr(e) for e in (0, 59, 60, 119, 120, 159, 160, 199)] == [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008,
                                                                       0.0008]
    assert [s.rewire_period_at(e) for e in (0, 24, 25, 79, 80, 139, 140, 1000)] == [100, 100, 200, 200, 400, 400, 800,
                                                                                    800]
    assert [s.deepr_temperature(e) for e in (0, 24, 25, 80, 140)] == [1e-5, 1e-5, 1e-8, 1e-12, 1e-15]


def test_prune_schedule_has_lr_zero_in_epoch_zero():
    s = load_schedules(BUNDLED_DIR / "resnet_prune_schedule.yaml")
    assert [s.lr(e) for e in (0, 1, 14, 15, 25, 35)] == [0.0, 0.01, 0.01, 0.01, 0.001, 0.0001]


def test_all_bundled_files_load_and_the_originals_are_unchanged():
    names = sorted(p.name for p in BUNDLED_DIR.glob("*.yaml"))
    assert len(names) == 10 and {"mnist_schedule.yaml", "mnist_prune_schedule.yaml", "sparse_learning_mnist.yaml",
                                 "wide_vs_narrow.yaml"} <= set(names)
    original = Path(__file__).resolve().parents[2] / "shared" / "reference" / "original" / "learning_schedules"
    if original.is_dir():
        for f in original.glob("*.yaml"):
            assert (BUNDLED_DIR / f.name).read_bytes() == f.read_bytes()
    for n in names:
        assert load_schedules(n).lr(0) >= 0


def test_no_file_means_constant():
    s = load_schedules(None, default_lr=0.05)
    assert s.lr(0) == s.lr(500) == 0.05 and s.rewire_period_at(7) == 100


def test_missing_lists_fall_back_to_defaults(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("lr_schedule:\n  - 0 : 0.3\n  - 2 : 0.03\n")
    s = load_schedules(f, default_rewire_period=50)
    assert (s.lr(1), s.lr(2), s.rewire_period_at(9)) == (0.3, 0.03, 50)


@pytest.mark.parametrize("text,needle", [
    ("lr_schedule: [", "not valid YAML"),
    ("foo: 1\n", "has none of the keys"),
    ("lr_schedule:\n  - 0 : 0.1\nbogus: []\n", "unknown keys"),
    ("lr_schedule: 0.1\n", "must be a list"),
    ("lr_schedule:\n  - 5 : 0.1\n", "must start at epoch 0"),
    ("lr_schedule:\n  - 0 : 0.1\n  - 0 : 0.2\n", "strictly increasing"),
    ("lr_schedule:\n  - 0 : fast\n", "is not 'integer epoch : number'"),
])
def test_malformed_schedule_files(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(DynsparseError) as e:
        load_schedules(f)
    assert needle in str(e.value)


def test_missing_file_names_the_bundled_choices():
    with pytest.raises(DynsparseError, match="wrnet_schedule.yaml"):
        resolve_schedule_path("nowhere/missing.yaml")


def test_piecewise_lookup_before_second_breakpoint():
    p = PiecewiseConstant((0, 10), (1.0, 2.0))
    assert (p(9), p(10), p(11)) == (1.0, 2.0, 2.0)
