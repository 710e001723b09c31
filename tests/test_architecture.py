"""The package's shape: no import circle, the product apart from its harness, no private
torch or Ray attribute outside the one workaround module, shipped configs."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raytrain"
LIBRARY = ("raytrain.data", "raytrain.model", "raytrain.geometry", "raytrain.body", "raytrain.train",
           "raytrain.eval", "raytrain.tuning", "raytrain.predict", "raytrain.checkpoints", "raytrain.losses",
           "raytrain.config", "raytrain.registry", "raytrain.safe_pickle", "raytrain.workarounds",
           "raytrain.console", "raytrain.files")
HARNESS = ("raytrain.synthetic", "raytrain.bench", "raytrain.apps", "raytrain.cli")
WORKAROUND = "raytrain.workarounds"
PRIVATE = ("._iterator", "_shutdown_workers", "_storage_Use_Count", "_new_shared", "_typed_storage", "_cdata",
           "._internal", "_raylet", "internal_kv", "._parent(", "._workers", "_worker_group_state",
           '"_iterator"', '"_workers"')  # also through getattr


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every raytrain module `path` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x`
    return {m for m in found if m.startswith("raytrain")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_library_never_imports_the_harness(graph):
    wrong = sorted((m, dep) for m, deps in graph.items() if _within(m, LIBRARY)
                   for dep in deps if _within(dep, HARNESS))
    assert not wrong, wrong


def test_validation_does_not_reach_into_training(graph):
    """train/ imports eval/protocol.py for validation, never the other way round."""
    wrong = sorted(dep for dep in graph["raytrain.eval.protocol"] if _within(dep, ("raytrain.train",)))
    assert not wrong, wrong


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of the directed graph `edges` as a path [a, b, ..., a], or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return []

    for module in sorted(edges):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return []


def test_no_import_circle(graph):
    """No cycle between modules (package __init__ re-exports aside: they import downward)."""
    edges = {m: {d for d in deps if not PACKAGE.joinpath(*d.split(".")[1:], "__init__.py").exists()}
             for m, deps in graph.items()}
    cycle = find_cycle(edges)
    assert not cycle, " -> ".join(cycle)


def _package(module: str) -> str:
    """The unit a module belongs to: its subpackage of raytrain, or the top-level module."""
    return ".".join(module.split(".")[:2])


def test_no_two_packages_import_each_other(graph):
    """Between packages (a subpackage with everything in it, or a top-level module) the
    imports, at the top of a file or inside a function, form no circle: not two packages
    importing each other, not a longer ring."""
    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        edges.setdefault(_package(module), set()).update(
            _package(dep) for dep in deps if _package(dep) != _package(module) and _package(dep) != "raytrain")
    mutual = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert not mutual, mutual
    cycle = find_cycle(edges)
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_private_torch_and_ray_attributes_only_in_the_workaround_module():
    found = []
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path) == WORKAROUND:
            continue
        text = path.read_text()
        found += [f"{path.name}: {token}" for token in PRIVATE if token in text]
    assert not found, found


def test_commands_read_only_shipped_files():
    """Configs and search spaces ship with the package (pyproject.toml maps configs/ and tune/spaces/
    into it); code finds them by bare name, in a checkout as the files a user sees."""
    from raytrain.config import shipped_config, shipped_space
    for resolved, shown in ((shipped_config("demo"), "configs/demo.yaml"),
                            (shipped_space("demo"), "tune/spaces/demo.yaml")):
        assert resolved == PACKAGE.parent / shown and resolved.is_file(), shown
    for path in PACKAGE.rglob("*.py"):
        assert "parents[2]" not in path.read_text(), path  # nothing reaches above the package
