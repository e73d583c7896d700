"""Dependencies run one way (sims -> fl -> strategies), without circles, and the merge math imports no Flower."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("strategies", "fl", "sims")  # each may import only itself and those before it
FLOWER_SIDE = {"strategies.flower", "strategies.replies", "strategies.records", "strategies.streaming"}  # the thin Flower layer of strategies/


def imported_names(path: Path) -> set[str]:
    """Every name a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def imports_of(path: Path) -> set[str]:
    """The project's modules among them."""
    return {n for n in imported_names(path) if n.split(".")[0] in PACKAGES and (ROOT / (n.replace(".", "/") + ".py")).is_file()}


def graph() -> dict[str, set[str]]:
    return {f"{p.parent.name}.{p.stem}": imports_of(p) for package in PACKAGES for p in (ROOT / package).glob("*.py")}


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


def test_dependencies_run_one_way() -> None:
    for module, targets in graph().items():
        layer = PACKAGES.index(module.split(".")[0])
        upward = [t for t in targets if PACKAGES.index(t.split(".")[0]) > layer]
        assert not upward, f"{module} imports {upward}"


def test_merge_rules_are_pure_math_without_flower() -> None:
    for path in (ROOT / "strategies").glob("*.py"):
        module = f"strategies.{path.stem}"
        if module in FLOWER_SIDE:
            continue
        assert not any(n.split(".")[0] == "flwr" for n in imported_names(path)), f"{module} imports Flower"
