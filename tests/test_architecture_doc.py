"""docs/architecture.md stays true to the code: every file it names exists, every `jobyard.x.y`
module it names imports from the source tree, and its package import graph is the one the
imports make. Reads files only (unit tier).

Run as a module to print the import graph the doc should hold:

    .venv/bin/python -m tests.test_architecture_doc
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

from tests.support import ROOT

DOC = ROOT / "docs/architecture.md"

#: The packages, in the order the graph lists them (foundations first), and where their source is.
PACKAGES = {
    "job_engine": "packages/job_engine",
    "queue": "packages/queue",
    "dispatcher": "packages/dispatcher",
    "django": "packages/django",
    "worker": "apps/worker",
    "temporal_worker": "apps/temporal_worker",
    "api": "apps/api",
    "cli": "apps/cli",
}

#: A file name as the doc writes it: at least one slash and a known extension. Written from the
#: repository root, or from the `jobyard` namespace (`dispatcher/routing.py`).
FILE_NAME = re.compile(
    r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:py|lua|md|toml|yml|yaml|ini|html|sh|j2|mako))\b"
)
#: A dotted module name: `jobyard.queue.reclaim` (one of the packages': `jobyard.job`, the
#: workflow's name, and `jobyard.lua` are not modules).
MODULE_NAME = re.compile(r"(?<![\w./])(jobyard(?:\.\w+)+)")

GRAPH_START, GRAPH_END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"

MODULE_LEVEL, IN_FUNCTION, TYPES_ONLY = "module level", "inside functions", "types only"


def namespace_root(package: str) -> Path:
    return ROOT / PACKAGES[package] / "src" / "jobyard"


def resolve(name: str) -> Path | None:
    """The file a name in the doc stands for, if it exists: from the repository root, else from
    a package's `jobyard` namespace directory, else next to the doc (a relative link)."""
    candidates = [ROOT / name, DOC.parent / name]
    candidates += [namespace_root(package) / name for package in PACKAGES]
    return next((path for path in candidates if path.is_file()), None)


def module_exists(dotted: str) -> bool:
    """`jobyard.a.b` is a module or package of the source tree, or `jobyard.a` is one that
    defines `b` (a dotted name may end in a class or function)."""
    parts = dotted.split(".")[1:]
    if not parts or parts[0] not in PACKAGES:
        return False
    base = namespace_root(parts[0]).parent / "jobyard"
    for cut in (len(parts), len(parts) - 1):
        path = base.joinpath(*parts[:cut])
        module = path.with_suffix(".py") if path.suffix != ".py" else path
        found = module if module.is_file() else path / "__init__.py"
        if found.is_file():
            rest = parts[cut:]
            if not rest:
                return True
            defined = rf"\b(def|class)\s+{rest[0]}\b|^{rest[0]}\b\s*[:=]"
            return re.search(defined, found.read_text(), re.MULTILINE) is not None
    return False


def _import_context(node: ast.AST, context: str) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        return IN_FUNCTION
    return context


def _imports(tree: ast.AST) -> list[tuple[str, str]]:
    """(imported module, context) for every absolute import in a module."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, context: str) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, context) for alias in node.names)
            return
        if isinstance(node, ast.ImportFrom):
            if node.module and node.level == 0:
                found.append((node.module, context))
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inner = TYPES_ONLY if context == MODULE_LEVEL else context
            for statement in node.body:
                visit(statement, inner)
            for statement in node.orelse:
                visit(statement, context)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, _import_context(node, context))

    visit(tree, MODULE_LEVEL)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """importer package -> imported package -> the contexts its imports are made in."""
    graph: dict[str, dict[str, set[str]]] = {package: defaultdict(set) for package in PACKAGES}
    for package, location in PACKAGES.items():
        source = root / location / "src" / "jobyard" / package
        for path in sorted(source.rglob("*.py")):
            for module, context in _imports(ast.parse(path.read_text(), str(path))):
                parts = module.split(".")
                other = parts[1] if parts[0] == "jobyard" and len(parts) > 1 else None
                if other in PACKAGES and other != package:
                    graph[package][other].add(context)
    return graph


def graph_table(graph: dict[str, dict[str, set[str]]]) -> str:
    """The graph as the doc's table: an edge is "module level" if any import of it is."""
    lines = [
        "| package | imports at module level | imports only inside functions |",
        "| --- | --- | --- |",
    ]
    for package in PACKAGES:
        edges = graph[package]
        top = [f"`{p}`" for p in PACKAGES if MODULE_LEVEL in edges.get(p, ())]
        lazy = [
            f"`{p}`" + (" (types only)" if IN_FUNCTION not in edges[p] else "")
            for p in PACKAGES
            if p in edges and MODULE_LEVEL not in edges[p]
        ]
        lines.append(f"| `{package}` | {', '.join(top) or '-'} | {', '.join(lazy) or '-'} |")
    return "\n".join(lines)


def documented_graph() -> str:
    text = DOC.read_text()
    start, end = text.index(GRAPH_START) + len(GRAPH_START), text.index(GRAPH_END)
    return text[start:end].strip()


def test_every_file_named_exists() -> None:
    names = set(FILE_NAME.findall(DOC.read_text()))
    assert len(names) > 50, "the pattern stopped finding the doc's file names"
    missing = sorted(name for name in names if resolve(name) is None)
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_module_named_exists() -> None:
    names = {
        name for name in MODULE_NAME.findall(DOC.read_text()) if name.split(".")[1] in PACKAGES
    }
    assert len(names) > 5, "the pattern stopped finding the doc's module names"
    missing = sorted(name for name in names if not module_exists(name))
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_the_checks_refuse_what_does_not_exist() -> None:
    """The two checks above would pass on anything if the resolvers did."""
    assert resolve("dispatcher/routing.py") is not None
    assert resolve("queue/jobyard.lua") is not None
    assert resolve("tests/test_lua_script.py") is not None
    assert resolve("flow-control.md") is not None
    assert resolve("dispatcher/no_such_module.py") is None
    assert resolve("packages/queue/src/jobyard/queue/store.py") is None  # now a package
    assert module_exists("jobyard.queue.reclaim")
    assert module_exists("jobyard.dispatcher.engines.base")
    assert module_exists("jobyard.queue.store.runs")
    assert not module_exists("jobyard.queue.no_such_module")
    assert not module_exists("jobyard.nowhere")


def test_the_import_graph_is_the_codes() -> None:
    expected = graph_table(import_graph())
    assert documented_graph() == expected, (
        "docs/architecture.md's import graph differs from the code's; the current one is:\n"
        + expected
    )


def test_job_engine_imports_no_other_package() -> None:
    """The layering the doc describes: job_engine is the foundation, and no package but the
    CLI imports an app."""
    graph = import_graph()
    assert not graph["job_engine"]
    apps = {"worker", "temporal_worker", "api", "cli"}
    for package in PACKAGES:
        if package != "cli":
            assert not apps & set(graph[package]) - {package}, package


def test_the_graph_sees_imports_inside_functions_and_type_checking() -> None:
    tree = ast.parse(
        "from jobyard.queue import keys\n"
        "if TYPE_CHECKING:\n    from jobyard.api import app\n"
        "def f():\n    import jobyard.worker.process\n"
    )
    assert _imports(tree) == [
        ("jobyard.queue", MODULE_LEVEL),
        ("jobyard.api", TYPES_ONLY),
        ("jobyard.worker.process", IN_FUNCTION),
    ]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    print(graph_table(import_graph(root)))
