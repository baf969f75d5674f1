"""The house rules, stated as tests a newcomer can read (docs/decisions.md, "Import rules").

import-linter (``make lint``) checks the layers: cli > node > api > ha | backup > dcs | pg > core >
util.  These tests check what it cannot express: no import cycle anywhere, no god class, no
oversized HA file, pure decision code (no I/O modules, not even from the standard library), and no
function-level imports hiding dependencies in ``hakeeper/ha/``.  Every failure names the module,
class or file, and the line, that breaks the rule.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import grimp
import pytest

import hakeeper

PACKAGE_DIR = Path(hakeeper.__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent

MAX_METHODS_PER_CLASS = 30
MAX_LINES_PER_HA_FILE = 600

# Modules whose only job is computing: they must not reach clocks, processes, sockets or databases.
IO_MODULES = frozenset(
    {"asyncio", "time", "os", "subprocess", "socket", "threading", "psycopg", "aiohttp", "aiobotocore"}
)
# Inside hakeeper, pure code may use core and ha.policy; these packages do I/O or drive it.
IMPURE_PACKAGES = ("hakeeper.dcs", "hakeeper.pg", "hakeeper.util", "hakeeper.ha")
PURE_HA_PACKAGE = "hakeeper.ha.policy"
# core/config.py loads YAML files and reads the environment: the one deliberate exception.
IMPURE_CORE_FILES = frozenset({"config.py"})


# ---------------------------------------------------------------------------------------- helpers


def python_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.resolve().relative_to(SOURCE_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def display(path: Path) -> str:
    return str(path.resolve().relative_to(SOURCE_ROOT))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@dataclass(frozen=True, slots=True)
class ImportedName:
    module: str  # absolute dotted name of what is imported
    line: int


def imported_modules(path: Path, tree: ast.Module) -> Iterator[ImportedName]:
    """Every module an import statement anywhere in the file names (TYPE_CHECKING and function
    bodies included).  ``from p import n`` names ``p.n`` when that is a hakeeper module, else ``p``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield ImportedName(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # level 1 is the file's own package, each further level one package up
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield ImportedName(candidate if is_hakeeper_module(candidate) else base, node.lineno)


def is_hakeeper_module(name: str) -> bool:
    if name != "hakeeper" and not name.startswith("hakeeper."):
        return False
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE_DIR / relative).with_suffix(".py").is_file() or (PACKAGE_DIR / relative).is_dir()


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def strongly_connected_components(edges: Mapping[str, Set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on long import chains)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = lowlink[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    return [
        component
        for component in strongly_connected_components(edges)
        if len(component) > 1 or component[0] in edges[component[0]]
    ]


def describe_cycle(graph: grimp.ImportGraph, component: Iterable[str]) -> str:
    members = set(component)
    lines = [f"import cycle among {len(members)} modules: {', '.join(sorted(members))}"]
    for importer in sorted(members):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            details = graph.get_import_details(importer=importer, imported=imported)
            where = ", ".join(f"l.{d['line_number']}" for d in details)
            lines.append(f"    {importer} -> {imported} ({where})")
    return "\n".join(lines)


def hakeeper_graph() -> grimp.ImportGraph:
    # TYPE_CHECKING imports count: a cycle that only type checking sees is still a cycle of design.
    return grimp.build_graph("hakeeper", exclude_type_checking_imports=False, cache_dir=None)


ImportStatement = ast.Import | ast.ImportFrom


def function_level_imports(tree: ast.Module) -> Iterator[tuple[str, ImportStatement]]:
    """(qualified function name, import) for every import inside a function body."""

    def visit(node: ast.AST, scope: list[str], in_function: bool) -> Iterator[tuple[str, ImportStatement]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ImportStatement) and in_function:
                yield ".".join(scope), child
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, [*scope, child.name], True)
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, [*scope, child.name], in_function)
            else:
                yield from visit(child, scope, in_function)

    yield from visit(tree, [], False)


def module_defining(function: str, directory: Path) -> Path | None:
    for path in python_files(directory):
        for node in parse(path).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function:
                return path
    return None


def pure_files() -> list[Path]:
    files = [p for p in python_files(PACKAGE_DIR / "core") if p.name not in IMPURE_CORE_FILES]
    files += python_files(PACKAGE_DIR / "ha" / "policy")
    decide_module = module_defining("decide", PACKAGE_DIR / "ha")
    if decide_module is not None and decide_module not in files:
        files.append(decide_module)
    return files


# ------------------------------------------------------------------------------ the house rules


def test_no_import_cycle_among_hakeeper_modules() -> None:
    graph = hakeeper_graph()
    cycles = import_cycles(graph)
    assert not cycles, "hakeeper modules must not import each other in a circle:\n" + "\n".join(
        describe_cycle(graph, cycle) for cycle in cycles
    )


def test_no_class_has_more_than_30_methods() -> None:
    too_big = []
    for path in python_files(PACKAGE_DIR):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
                if len(methods) > MAX_METHODS_PER_CLASS:
                    too_big.append(
                        f"{display(path)}:{node.lineno} class {node.name} has {len(methods)} methods"
                    )
    assert not too_big, (
        f"a class with more than {MAX_METHODS_PER_CLASS} methods does several jobs; split it:\n"
        + "\n".join(too_big)
    )


def test_no_file_in_ha_is_over_600_lines() -> None:
    too_long = []
    for path in python_files(PACKAGE_DIR / "ha"):
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > MAX_LINES_PER_HA_FILE:
            too_long.append(f"{display(path)} has {count} lines")
    assert not too_long, (
        f"files in hakeeper/ha/ stay under {MAX_LINES_PER_HA_FILE} lines (one concern per file):\n"
        + "\n".join(too_long)
    )


def test_decision_code_and_the_core_model_import_nothing_that_does_io() -> None:
    offenders = []
    for path in pure_files():
        for imported in imported_modules(path, parse(path)):
            top = imported.module.split(".")[0]
            impure_hakeeper = any(in_package(imported.module, p) for p in IMPURE_PACKAGES) and not in_package(
                imported.module, PURE_HA_PACKAGE
            )
            if top in IO_MODULES or impure_hakeeper:
                offenders.append(f"{display(path)}:{imported.line} imports {imported.module}")
    assert not offenders, (
        "decide(), hakeeper/ha/policy/ and hakeeper/core/ (but core/config.py) are pure: no "
        f"{', '.join(sorted(IO_MODULES))}, nor hakeeper.dcs/pg/util or ha outside ha.policy:\n"
        + "\n".join(offenders)
    )


def test_the_decide_function_is_found() -> None:
    # Guards the purity test above against checking nothing once decide() moves.
    assert module_defining("decide", PACKAGE_DIR / "ha") is not None, (
        "no module in hakeeper/ha/ defines decide()"
    )


def test_no_function_level_imports_in_ha() -> None:
    hidden = []
    for path in python_files(PACKAGE_DIR / "ha"):
        for function, node in function_level_imports(parse(path)):
            hidden.append(f"{display(path)}:{node.lineno} in {function}(): {ast.unparse(node)}")
    assert not hidden, (
        "imports inside functions hide dependencies (and dodge cycles); import at module level:\n"
        + "\n".join(hidden)
    )


# ------------------------------------------------------- the tools these rules rely on, checked


def test_cycle_finder_reports_each_circle_once_and_ignores_chains() -> None:
    edges = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),  # d -> e: a chain, no cycle
        "f": {"f"},  # a module importing itself
        "g": {"h"},
        "h": {"g"},
    }
    components = [c for c in strongly_connected_components(edges) if len(c) > 1 or c[0] in edges[c[0]]]
    assert sorted(components) == [["a", "b", "c"], ["f"], ["g", "h"]]


def test_grimp_sees_type_checking_and_function_level_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "circlepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from circlepkg import second\n"
    )
    (package / "second.py").write_text("def late() -> None:\n    from circlepkg import first\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "circlepkg", raising=False)

    graph = grimp.build_graph("circlepkg", exclude_type_checking_imports=False, cache_dir=None)

    assert import_cycles(graph) == [["circlepkg.first", "circlepkg.second"]]
    assert "circlepkg.first -> circlepkg.second (l.4)" in describe_cycle(graph, import_cycles(graph)[0])


def test_function_level_import_finder_names_the_function() -> None:
    tree = ast.parse(
        "import os\n"
        "if os:\n    import sys\n"
        "class A:\n    def run(self):\n        if True:\n            from x import y\n"
        "async def go():\n    import z\n"
    )
    found = [(function, node.lineno) for function, node in function_level_imports(tree)]
    assert found == [("A.run", 7), ("go", 9)]
