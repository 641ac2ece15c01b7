"""The orchestrator's shape, checked from its source: no import circles, the loop imported only by
the package face and the CLI, ``loop.unit`` read only where the unit is built, label state changed
in one module, and no phase that branches on the kind of unit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "orchestrator"
PHASE_MODULES = ("_loop", "_train", "_score", "_select", "_label", "_track", "_start", "_people", "_round")


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Modules of the package that ``tree`` imports anywhere (top level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from ._x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import _x, y: submodules, or names of the package face
                for alias in node.names:
                    found.add(alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__")
            elif node.module and node.module.split(".")[0] == "orchestrator":
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "orchestrator":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_no_import_circle_in_the_orchestrator() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(tree) if m in modules and m != name} for name, tree in modules.items()}
    # The package face imports the loop by design; nothing the loop reaches may import the face back.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import circle in orchestrator/: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_only_the_package_face_and_the_cli_import_the_loop() -> None:
    importers = sorted(name for name, tree in _modules().items() if "_loop" in _imports(tree))
    assert importers == ["__init__", "_cli"]


def test_loop_unit_is_read_only_by_the_unit_builder_and_the_config() -> None:
    readers = set()
    for path in sorted([*ROOT.glob("orchestrator/*.py"), *ROOT.glob("workers/*.py"), *ROOT.glob("strategies/*.py"),
                        *ROOT.glob("benchmarks/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "unit" and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "loop"):
                readers.add(str(path.relative_to(ROOT)))
    assert readers <= {"orchestrator/_units.py", "orchestrator/_config.py"}
    assert "orchestrator/_units.py" in readers


LABEL_STATE_COLUMNS = {"LABELED", "ROUND_LABELED", "PARTIAL", "labeled", "round_labeled", "partial"}


def _assigned_columns(tree: ast.Module) -> set[str]:
    """Column names some rows of which are assigned (``df.loc[rows, COLUMN] = ...``) in ``tree``: a
    change of those samples' state. A whole new or recast column (``df[COLUMN] = ...``) is not one."""
    out = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        for target in targets:
            if not (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute)
                    and target.value.attr in ("loc", "iloc", "at", "iat")):
                continue
            key = target.slice
            parts = key.elts if isinstance(key, ast.Tuple) else [key]
            for part in parts:
                if isinstance(part, ast.Name):
                    out.add(part.id)
                elif isinstance(part, ast.Constant) and isinstance(part.value, str):
                    out.add(part.value)
                elif isinstance(part, ast.List):
                    out.update(e.id for e in part.elts if isinstance(e, ast.Name))
    return out


def test_label_state_changes_in_one_module() -> None:
    writers = sorted(name for name, tree in _modules().items() if _assigned_columns(tree) & LABEL_STATE_COLUMNS)
    assert writers == ["_label_state"], f"label state written outside _label_state.py: {writers}"


def test_phases_do_not_branch_on_the_kind_of_unit() -> None:
    modules = _modules()
    for name in PHASE_MODULES:
        tree = modules[name]
        assert not {"_image_unit", "_region_unit"} & _imports(tree), f"{name} imports a unit implementation"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "name" and isinstance(node.value, ast.Attribute):
                assert node.value.attr != "unit", f"{name}.py:{node.lineno} reads unit.name"
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not {"region", "image"} & set(constants), f"{name}.py:{node.lineno} compares with a unit name"
