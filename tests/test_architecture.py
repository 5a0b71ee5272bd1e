"""The architecture invariants: the packages meet only in climate_text_schema, and the builder never needs torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "climate_text_schema": ROOT / "schemas" / "src" / "climate_text_schema",
    "merra2_text_data": ROOT / "packages" / "merra2_text_data" / "src" / "merra2_text_data",
    "fusion_trainer": ROOT / "packages" / "fusion_trainer" / "src" / "fusion_trainer",
}


def _imported_roots(package_dir: Path) -> set[str]:
    roots: set[str] = set()
    for path in package_dir.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("merra2_text_data", {"fusion_trainer", "torch"}),
        ("fusion_trainer", {"merra2_text_data"}),
        ("climate_text_schema", {"merra2_text_data", "fusion_trainer", "torch"}),
    ],
)
def test_static_imports_respect_boundaries(package: str, forbidden: set[str]) -> None:
    found = _imported_roots(SOURCES[package]) & forbidden
    assert not found, f"{package} imports {sorted(found)}"


@pytest.mark.parametrize("package", ["climate_text_schema", "merra2_text_data"])
def test_runtime_import_pulls_no_torch(package: str) -> None:
    """Importing the package (its CLI, and the modules its lazy names load) loads neither torch nor the other
    package."""
    lazy = {"climate_text_schema": ["reference", "index", "storage", "hub"], "merra2_text_data": ["pipeline", "store.versions"]}
    mods = [package] + ([f"{package}.cli"] if (SOURCES[package] / "cli.py").exists() else [])
    mods += [f"{package}.{m}" for m in lazy[package]]
    code = (
        "import sys, json, importlib\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {'torch','fusion_trainer'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_every_package_ships_py_typed() -> None:
    for path in SOURCES.values():
        assert (path / "py.typed").exists(), path


def test_the_caption_format_lives_once_in_the_contract() -> None:
    """Only climate_text_schema defines the caption parser and the templates; the packages import them."""
    defined: dict[str, list[str]] = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                names = [node.name] if isinstance(node, ast.FunctionDef) else []
                if isinstance(node, ast.Assign):
                    names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names = [node.target.id]
                for name in names:
                    if name in ("parse_caption_numbers", "TEMPLATES", "_TEMPLATES", "TEXT_FORMAT", "canonical_caption"):
                        defined.setdefault(name, []).append(f"{package}/{path.name}")
    assert defined == {
        "parse_caption_numbers": ["climate_text_schema/caption_reading.py"],
        "TEMPLATES": ["climate_text_schema/captions.py"],
        "TEXT_FORMAT": ["climate_text_schema/captions.py"],
        "canonical_caption": ["climate_text_schema/caption_reading.py"],
    }


def _module_graph(package: str) -> dict[str, set[str]]:
    """Arrows between a package's own modules: every import, at module level, inside functions or under
    TYPE_CHECKING (a function-level import that runs back up is still a cycle a reader must hold in mind)."""
    root = SOURCES[package]
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules and a.name != name)
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names} & modules.keys()
                graph[name].update(subs - {name})
                if target in modules and target != name and len(subs) < len(node.names):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_no_import_cycles(package: str) -> None:
    graph = _module_graph(package)
    assert len(graph) > 5 and sum(map(len, graph.values())) > 10, "the import graph was read"
    assert _cycles(graph) == [], f"{package}: modules that import each other (arrows must point down)"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


MODULE_LINES = 400
OVERSIZE: dict[str, int] = {}  # modules not split yet (issue 18: none left); a ceiling may only come down


def test_no_module_grows_past_its_ceiling() -> None:
    """Modules stay under 400 lines; the few not split yet may not grow (a ratchet: lower a ceiling when one shrinks,
    drop it when the module is under the limit)."""
    sizes = {f"{package}/{path.relative_to(folder)}": len(path.read_text(encoding="utf-8").splitlines())
             for package, folder in SOURCES.items() for path in folder.rglob("*.py")}  # fmt: skip
    over = {name: n for name, n in sizes.items() if n > OVERSIZE.get(name, MODULE_LINES)}
    assert not over, f"modules over their line ceiling (split them by concept): {over}"
    stale = {name: (sizes.get(name), cap) for name, cap in OVERSIZE.items() if sizes.get(name, 0) <= MODULE_LINES}
    assert not stale, f"under {MODULE_LINES} lines now or gone: drop them from OVERSIZE: {stale}"


FLOORS = {
    "merra2_text_data": ["run", "store", "samples", "config", "source"],
    "fusion_trainer": ["training", "evaluation", "data", "model"],
}
"""Each package's folders, top to bottom (docs/architecture.md): a folder imports only the folders below it."""


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_folders_import_only_downwards(package: str) -> None:
    floors = FLOORS[package]
    graph = _module_graph(package)
    folders = {f.name for f in SOURCES[package].iterdir() if (f / "__init__.py").exists()}
    assert folders == set(floors), "a folder was added or removed: place it in FLOORS and the docs"

    def floor(module: str) -> int | None:
        parts = module.split(".")
        return floors.index(parts[1]) if len(parts) > 2 and parts[1] in floors else None

    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if floor(a) is not None and floor(b) is not None and floor(b) < floor(a))  # type: ignore[operator]
    assert not upward, f"imports that run up the folders of {package}: {upward}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(package_dir: Path) -> list[str]:
    """Every `from <own module> import _name` and `<own module>._name` in a package: a name one module keeps to
    itself, reached from another (at module level or inside a function)."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in SOURCES):
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{path.name}:{node.lineno} from {node.module or '.'} import {alias.name}")
                    else:
                        modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in SOURCES)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and _private(node.attr)):  # fmt: skip
                found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_no_module_reaches_for_another_modules_private_names(package: str) -> None:
    """A name with a leading underscore is its module's own; a helper that another module needs is public there."""
    assert _private_imports(SOURCES[package]) == []


def test_the_private_name_check_finds_one(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from .b import _helper\nfrom . import b\nx = b._other\ny = b.fine\n")
    assert _private_imports(tmp_path) == ["a.py:1 from b import _helper", "a.py:3 b._other"]
