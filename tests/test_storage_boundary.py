"""Code outside the storage modules never tells the storages apart (issue 24, item 3): no
``storage ==`` branch anywhere else, and no policy (nor ``Needs.gather``) reaching through a view to
its trained parameter (``sp.param``, ``sp.param.grad``) or naming a storage class. What differs
between masked and CSR storage is a member of the protocol (dynsparse/sparse/storage.py)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dynsparse

PACKAGE = Path(dynsparse.__file__).parent
ENGINE = PACKAGE / "sparse"
# the storages, the protocol and what builds them: the package dynsparse/sparse/storage/ (issue 24: no
# storage branch outside it)
STORAGE_MODULES = set((ENGINE / "storage").glob("*.py"))
STORAGE_CLASSES = {"SparseParam", "CSRParam", "ShardedParam", "CSRWeight"}


def policy_modules() -> list[Path]:
    return [ENGINE / "policy.py", ENGINE / "dropgrow.py", *sorted((ENGINE / "policies").glob("*.py"))]


def storage_branches(path: Path) -> list[int]:
    """Lines comparing something's ``.storage`` (``sp.storage == "csr"``, ``in``, ``!=``)."""
    return sorted(node.lineno for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Compare)
            and any(isinstance(side, ast.Attribute) and side.attr == "storage"
                    for side in (node.left, *node.comparators)))


def storage_reach(path: Path) -> list[str]:
    """What a policy module must not touch: ``.param``, ``.storage`` and the storage classes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("param", "storage"):
            found.append((node.lineno, f"line {node.lineno}: .{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in STORAGE_CLASSES:
            found.append((node.lineno, f"line {node.lineno}: {node.id}"))
        elif isinstance(node, ast.alias) and node.name in STORAGE_CLASSES:
            found.append((0, f"import of {node.name}"))
    return [text for _, text in sorted(found)]


def test_no_storage_branch_outside_the_storage_modules():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p not in STORAGE_MODULES]
    assert len(files) > 50
    found = {str(p.relative_to(PACKAGE)): lines for p in files if (lines := storage_branches(p))}
    assert not found, f"branches on the storage outside the storage modules: {found}"


def test_no_policy_reaches_the_parameter_or_names_a_storage():
    assert len(policy_modules()) >= 10  # policy (Needs.gather), dropgrow and the eight policies
    found = {p.name: hits for p in policy_modules() if (hits := storage_reach(p))}
    assert not found, f"policy modules that reach past the storage protocol: {found}"


def test_the_checks_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(sp):\n    if sp.storage == 'csr':\n        return sp.param.grad\n"
                   "    return 'masked' != sp.storage\n")
    assert storage_branches(bad) == [2, 4]
    assert storage_reach(bad) == ["line 2: .storage", "line 3: .param", "line 4: .storage"]
    names = tmp_path / "names.py"
    names.write_text("from dynsparse.sparse.storage.sharded import ShardedParam\nisinstance(1, ShardedParam)\n")
    assert storage_reach(names) == ["import of ShardedParam", "line 2: ShardedParam"]
    ok = tmp_path / "ok.py"
    ok.write_text("def f(sp):\n    return sp.active_grad_scores(), sp.label == 'csr'\n")
    assert storage_branches(ok) == [] and storage_reach(ok) == []


MIXES = '''from __future__ import annotations

import torch

from dynsparse.sparse.storage import SparseStorage


def policy_step(sp: SparseStorage, g: torch.Generator) -> None:
    handles = sp.lowest_active(sp.magnitude(), 3)
    gone = sp.drop(handles)
    sp.activate(sp.grow_random(3, gone, g))
    sp.activate(sp.grow_top(sp.dense_scores(torch.ones(sp.shape)), 3, gone))
    sp.active_mean(sp.dense_scores(torch.ones(sp.shape)))
    sp.activate(handles)  # MIX: a drop-side handle is no flat index
    sp.grow_random(3, handles, g)  # MIX: exclude is the record drop returns, not the handles
    sp.drop(sp.grow_random(3, gone, g))  # MIX: a flat index is no handle
    sp.grow_top(sp.magnitude(), 3, gone)  # MIX: drop-side scores are no grow scores
    sp.active_mean(sp.magnitude())  # MIX: nor here
'''


@pytest.mark.slow  # a few seconds with the cache CI's own mypy run leaves; a minute without
def test_mypy_refuses_a_policy_that_mixes_handles_flat_indices_and_scores(tmp_path):
    pytest.importorskip("mypy")
    src = tmp_path / "mixes.py"
    src.write_text(MIXES)
    root = PACKAGE.parent
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml"), str(src)],
                         cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    flagged = sorted(int(line.split(":")[1]) for line in out.stdout.splitlines() if ": error:" in line)
    expected = [i for i, line in enumerate(MIXES.splitlines(), 1) if "# MIX" in line]
    assert len(expected) == 5 and flagged == expected, out.stdout
