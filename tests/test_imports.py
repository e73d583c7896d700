"""Dependencies run one way, room by room, without circles, and the merge math imports no Flower.

Between top-level packages: sims -> fl -> strategies. Inside fl/, each subpackage may import only the rooms
listed for it in ``ROOMS`` (the same lines its ``__init__.py`` states). Inside strategies/, the merge math
(modules directly under strategies/) imports neither Flower nor ``strategies.flower``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("strategies", "fl", "sims")  # each may import only itself and those before it
ROOMS = {  # fl/ subpackage -> the other fl/ subpackages it may import
    "data": set(),
    "modeling": {"data"},
    "run": {"data", "modeling"},
    "federation": {"data", "modeling", "run"},
    "experts": {"data", "modeling"},
    "studies": {"data", "modeling", "run", "federation", "experts"},
    "apps": {"data", "modeling", "run", "federation", "studies"},
}


def imported_names(path: Path) -> set[str]:
    """Every name a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    base = root / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Each project module (every .py file under the packages, at any depth) -> the project modules it imports."""
    return {
        module_name(p, root): {n for n in imported_names(p) if n.split(".")[0] in PACKAGES and is_module(n, root)}
        for package in PACKAGES
        for p in sorted((root / package).rglob("*.py"))
    }


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "fl" and len(parts) > 2 else None


def wrong_room_imports(edges: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import from one fl/ room into a room it may not import."""
    found = []
    for module, targets in edges.items():
        here = room(module)
        for target in sorted(targets):
            there = room(target)
            if here and there and there != here and there not in ROOMS[here]:
                found.append(f"{module} imports {target} ({here} may import only {sorted(ROOMS[here]) or 'nothing in fl'})")
    return found


def test_no_module_imports_itself_through_others() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            assert state.get(target) != "open", "import circle: " + " -> ".join(path[path.index(target):] + [target]) if target in path else target
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_walk_sees_every_module_of_the_subpackages() -> None:
    edges = graph()
    assert "fl.federation.client" in edges and "strategies.flower.strategy" in edges
    assert "fl.modeling.model" in edges["fl.studies.baselines"]


def test_dependencies_run_one_way() -> None:
    for module, targets in graph().items():
        layer = PACKAGES.index(module.split(".")[0])
        upward = [t for t in targets if PACKAGES.index(t.split(".")[0]) > layer]
        assert not upward, f"{module} imports {upward}"


def test_fl_rooms_import_only_the_rooms_below_them() -> None:
    assert wrong_room_imports(graph()) == []


def test_a_wrong_room_import_is_caught(tmp_path: Path) -> None:
    for package in ("fl", "fl/data", "fl/studies"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "fl/studies/report.py").write_text("def markdown() -> str:\n    return ''\n")
    (tmp_path / "fl/data/sneaky.py").write_text("def f() -> None:\n    from fl.studies.report import markdown\n")
    assert wrong_room_imports(graph(tmp_path)) == [
        "fl.data.sneaky imports fl.studies.report (data may import only nothing in fl)"
    ]


def test_fl_holds_subpackages_only() -> None:
    loose = sorted(p.name for p in (ROOT / "fl").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly under fl/: {loose}; each belongs in a subpackage"
    for package in [p for p in (ROOT / "fl").iterdir() if p.is_dir() and p.name != "__pycache__"]:
        assert package.name in ROOMS, f"fl/{package.name} is not a room of the import rules (tests/test_imports.py ROOMS)"
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), f"fl/{package.name}/__init__.py says nothing"


def test_merge_rules_are_pure_math_without_flower() -> None:
    for path in (ROOT / "strategies").glob("*.py"):
        names = imported_names(path)
        assert not any(n.split(".")[0] == "flwr" for n in names), f"strategies/{path.name} imports Flower"
        assert not any(n.startswith("strategies.flower") for n in names), f"strategies/{path.name} imports the Flower layer"
    for path in (ROOT / "strategies").rglob("*.py"):
        assert not any(n.startswith("fl.") or n == "fl" for n in imported_names(path)), f"{path} imports fl"
