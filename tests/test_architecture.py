"""The package's shape: packages by concern in layers, no import cycles, a self-contained engine, and a top level
that holds only the public face."""
from __future__ import annotations

import ast
from pathlib import Path

import dynsparse

PACKAGE = Path(dynsparse.__file__).parent
# what dynsparse/sparse/ may import from the rest of the package
ENGINE_ALLOWED = {"dynsparse.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modules: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Every dynsparse module ``path`` imports at run time, at module level or inside functions. ``from P import x``
    names module P.x when it is one of ``modules``, else P."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names)
    return {m for m in found if m.split(".")[0] == "dynsparse"}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path, set(modules)) if m in modules and m != name}
    return edges


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt == "dynsparse" or nxt.endswith(".__init__"):
                continue  # the package's re-exports sit on top of everything
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_engine_imports_nothing_of_the_cli_config_models_or_loop():
    for name, deps in graph().items():
        if name.startswith("dynsparse.sparse"):
            outside = {d for d in deps if not d.startswith("dynsparse.sparse")} - ENGINE_ALLOWED
            assert not outside, f"{name} imports {sorted(outside)}"


# What each package may import from the rest of dynsparse (besides itself), bottom layer first. "dynsparse" is the
# package's face, imported below it only for ``__version__``. A sweep's job is a ``dynsparse train`` command line, so
# experiments may parse one with cli.flags, and nothing else of the command line.
LAYERS = {
    "errors": set(),
    "sparse": {"errors"},
    "outputs": {"errors", "dynsparse"},
    "models": {"errors", "sparse"},
    "data": {"errors", "outputs"},
    "training": {"errors", "sparse", "outputs", "models", "data"},
    "experiments": {"errors", "sparse", "outputs", "models", "data", "training", "cli.flags"},
    "cli": {"errors", "sparse", "outputs", "models", "data", "training", "experiments", "dynsparse"},
}
# the top level: the public face only (the package's __init__ and its one exception type)
TOP_LEVEL_MODULES = {"__init__.py", "errors.py"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dynsparse"


def test_each_package_imports_only_the_layers_below_it():
    bad = []
    for name, deps in graph().items():
        layer = layer_of(name)
        if layer == "dynsparse":
            continue  # the face re-exports from every layer
        allowed = LAYERS[layer]
        for dep in deps:
            dep_layer = layer_of(dep)
            if dep_layer != layer and dep_layer not in allowed and \
                    not any(dep == a or dep.startswith(a + ".") for a in {f"dynsparse.{x}" for x in allowed}):
                bad.append(f"{name} -> {dep}")
    assert not bad, f"imports against the layering (tests/test_architecture.py LAYERS): {sorted(bad)}"


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), f"packages without a layer rule: {sorted(packages - set(LAYERS))}"


def test_the_top_level_holds_only_the_public_face():
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules == TOP_LEVEL_MODULES, f"top-level modules besides the face: {sorted(modules - TOP_LEVEL_MODULES)}"
    stray = [p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"
             and not (p / "__init__.py").is_file()]
    assert not stray, f"top-level folders that are not packages: {stray}"


def test_the_layering_check_can_fail(tmp_path, monkeypatch):
    # data importing the training package goes against the layers and is reported
    pkg = tmp_path / "dynsparse"
    for sub in ("data", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "run.py").write_text("")
    (pkg / "data" / "loaders.py").write_text("def f():\n    from dynsparse.training.run import g\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_each_package_imports_only_the_layers_below_it()
    except AssertionError as e:
        assert "dynsparse.data.loaders -> dynsparse.training.run" in str(e)
    else:
        raise AssertionError("an import against the layers went unnoticed")


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    # a fake pair of modules that import each other is reported
    pkg = tmp_path / "dynsparse"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from dynsparse.b import g\n")
    (pkg / "b.py").write_text("from dynsparse.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "dynsparse.a" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


# A policy is handed a Context (dynsparse/sparse/policy.py), never the sparsifier: it may name
# Sparsifier in annotations (under TYPE_CHECKING) but must not depend on it at run time. The
# check is on what each module imports itself (Python's package initialisation aside).
SPARSIFIER_MODULES = ("dynsparse.sparse.sparsifier", "dynsparse.sparse.Sparsifier", "dynsparse.Sparsifier")


def policy_modules() -> list[Path]:
    engine = PACKAGE / "sparse"
    return [engine / "policy.py", engine / "dropgrow.py", *sorted((engine / "policies").glob("*.py"))]


def sparsifier_imports(path: Path) -> set[str]:
    """The run-time imports of ``path`` that reach the sparsifier: ``from P import x`` counts as P and P.x
    (``from dynsparse.sparse import Sparsifier`` is the class through the package)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return {m for m in found if m.startswith(SPARSIFIER_MODULES)}


def test_no_policy_imports_the_sparsifier_at_run_time():
    assert len(policy_modules()) >= 10  # policy, dropgrow and the eight policies: the glob found them
    found = {module_name(p): sorted(deps) for p in policy_modules() if (deps := sparsifier_imports(p))}
    assert not found, f"policy modules that import the sparsifier at run time: {found}"


def test_the_policy_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dynsparse.sparse.sparsifier import Policy, Sparsifier\n")
    assert sparsifier_imports(bad) == {"dynsparse.sparse.sparsifier", "dynsparse.sparse.sparsifier.Policy",
                                       "dynsparse.sparse.sparsifier.Sparsifier"}
    inside = tmp_path / "inside.py"
    inside.write_text("def f():\n    from dynsparse.sparse import Sparsifier\n")
    assert sparsifier_imports(inside) == {"dynsparse.sparse.Sparsifier"}
    annotations_only = tmp_path / "ok.py"
    annotations_only.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from dynsparse.sparse.sparsifier import Sparsifier\n")
    assert sparsifier_imports(annotations_only) == set()


def test_the_command_line_starts_without_the_distributed_tensor_package():
    # torch.distributed.tensor (DTensor, with sympy) costs ~1 s of every process's start: the CLI,
    # every torchrun rank; the sharded storage imports it only when a model is sharded
    import subprocess
    import sys
    code = ("import sys, dynsparse, dynsparse.cli.commands, dynsparse.training.run; "
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
