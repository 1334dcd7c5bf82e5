"""The package's shape: one-way imports, no hidden imports, short functions, an API per CLI verb.

The layer arrows themselves are import-linter contracts (``pyproject.toml``, run by
``make test``); these tests check what import-linter does not.
"""
import ast
import inspect
from pathlib import Path

import grimp
import pytest

import mexify
from mexify import api
from mexify.cli import _COMMANDS

PACKAGE = Path(mexify.__file__).parent
MAX_LINES = 60  # code lines of a function, docstring excluded


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _strongly_connected(graph, modules):
    """Tarjan's algorithm over the module import graph; components with more than one module are cycles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in modules:
                continue
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = set()
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.add(n)
                if n == m:
                    break
            out.append(comp)

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return [c for c in out if len(c) > 1]


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("mexify")
    # the package __init__ re-exports the API; every module below it is checked
    modules = {m for m in graph.modules if m != "mexify"}
    assert _strongly_connected(graph, modules) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _strongly_connected(graph, {"p.a", "p.b", "p.c"}) == [{"p.a", "p.b"}]


def test_no_function_local_imports_of_mexify():
    found = []
    for path in _sources():
        for fn in _functions(ast.parse(path.read_text())):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "mexify":
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {fn.name}")
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mexify" for a in node.names):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {fn.name}")
    assert found == []


def _code_lines(fn) -> int:
    body = fn.body
    first = body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    start = body[1].lineno if is_doc and len(body) > 1 else first.lineno
    return fn.end_lineno - start + 1


def test_functions_are_short():
    long = [f"{p.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name} ({_code_lines(fn)} lines)"
            for p in _sources() for fn in _functions(ast.parse(p.read_text())) if _code_lines(fn) > MAX_LINES]
    assert long == []


def test_line_counter_counts_code_not_docstrings():
    fn = _functions(ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n    return a\n'))[0]
    assert _code_lines(fn) == 2


@pytest.mark.parametrize("verb", list(_COMMANDS) + ["load"])
def test_every_cli_verb_has_a_documented_api_function(verb):
    fn = getattr(api, verb)
    assert inspect.isfunction(fn) and fn.__module__ == "mexify.api"
    doc = inspect.getdoc(fn)
    assert doc and len(doc.splitlines()[0]) > 10


def test_cli_modules_import_only_the_api():
    for path in (PACKAGE / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mexify"):
                names = [a.name for a in node.names]
                assert node.module in ("mexify.api", "mexify.cli._common", "mexify.cli.convert") or (
                    node.module == "mexify" and names == ["api"]
                ), f"{path.name}: from {node.module} import {names}"
