"""No import cycles inside `distill`, and every module imports on its own.

A cycle between modules works until someone imports them in the other order (a CLI command, a
test, a user's script) and gets "cannot import name ... from partially initialized module".
Two checks:

- static: the graph of *import-time* `distill.*` imports, read with `ast` (module top level,
  class bodies, `try`/`if` blocks; not function bodies, not `if TYPE_CHECKING:`), has no cycle.
  Importing `distill.a.b` also runs `distill/a/__init__.py`, so the packages on the way count as
  imported too. And `distill.answers`, the answer/grading leaf every stage shares, imports
  nothing from `distill` at all, not even lazily.
- dynamic: a fresh interpreter imports every module as the *first* `distill` module (the
  `distill.*` entries of sys.modules are dropped between imports; third-party libraries stay
  loaded, which keeps it fast), in a random order whose seed is printed (set
  DISTILL_IMPORT_SEED to replay one). A module whose missing dependency is outside `distill`
  (vllm, onnx, ...) is skipped, not failed.
"""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "distill"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_nodes(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (see the module docstring)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_nodes(node.body)
            yield from import_time_nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                yield from import_time_nodes(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from import_time_nodes(node.body)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
                     known: set[str]) -> set[str]:
    """The `distill` modules one import statement executes (with the packages on the way)."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        if node.level:  # relative: resolve against the importer's package
            base = importer.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from pkg import sub` imports the submodule when there is one.
        targets = {f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                   for a in node.names}
    out = set()
    ancestors = {importer.rsplit(".", i)[0] for i in range(1, importer.count(".") + 1)}
    for target in targets:
        parts = target.split(".")
        if parts[0] != "distill":
            continue
        # The packages on the way run too, except the importer's own (they already run first).
        out |= {".".join(parts[:i]) for i in range(1, len(parts))} - ancestors
        out.add(target)
    return (out & known) - {importer}


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> the `distill` modules it imports at import time (`lazy`: anywhere, function
    bodies and TYPE_CHECKING blocks included)."""
    modules = all_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        nodes = ([n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
                 if lazy else import_time_nodes(tree.body))
        graph[name] = set().union(*(imported_modules(n, name, is_package, known)
                                    for n in nodes))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), for the report."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return component  # unreachable for a strongly connected component


def test_the_static_checker_sees_a_cycle() -> None:
    """The checker itself can fail: a made-up two-module circle is found."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert strongly_connected(graph) == [["a", "b"]]
    assert one_cycle(graph, ["a", "b"]) == ["a", "b", "a"]
    tree = ast.parse(textwrap.dedent("""
        from typing import TYPE_CHECKING
        from distill.b import x
        if TYPE_CHECKING:
            from distill.c import y
        try:
            import distill.d.e
        except ImportError:
            pass
        def f():
            from distill.f import z
        class K:
            from . import g
    """))
    known = {"distill", "distill.b", "distill.c", "distill.d", "distill.d.e", "distill.f",
             "distill.g"}
    found = set().union(*(imported_modules(n, "distill.a", False, known)
                          for n in import_time_nodes(tree.body)))
    assert found == {"distill.b", "distill.d", "distill.d.e", "distill.g"}  # not its own parent


def test_no_import_time_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "distill.answers" in graph  # the walk found the package
    cycles = [one_cycle(graph, c) for c in strongly_connected(graph)]
    for component, cycle in zip(strongly_connected(graph), cycles, strict=True):
        print(f"cycle: {' -> '.join(cycle)}  (component: {', '.join(component)})")
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


ANSWER_PATH = {"distill.answers", "distill.filter.rows", "distill.filter.verify",
               "distill.teachers.reasoning", "distill.evaluate.metrics", "distill.train.devcurve"}


def test_answer_modules_are_in_no_cycle_even_through_lazy_imports() -> None:
    """A function-level import hides a circle from import time, not from the design: the
    answer/grading modules (once filter/rows.py <-> filter/verify.py) stay out of every circle.
    Lazy circles elsewhere are printed, not failed."""
    graph = import_graph(lazy=True)
    mine = []
    for component in strongly_connected(graph):
        print(f"lazy cycle: {' -> '.join(one_cycle(graph, component))}  "
              f"(component: {', '.join(component)})")
        if ANSWER_PATH & set(component):
            mine.append(component)
    assert not mine, mine


def test_answers_is_a_leaf() -> None:
    """distill.answers imports the standard library and, lazily, math_verify: nothing else."""
    tree = ast.parse((PACKAGE / "answers.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in distill.answers"
            names.add((node.module or "").split(".")[0])
    outside = {n for n in names if n not in sys.stdlib_module_names and n != "math_verify"}
    assert not outside, f"distill.answers imports {sorted(outside)}"
    top = {n for node in import_time_nodes(tree.body) for n in (
        [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import)
        else [(node.module or "").split(".")[0]])}
    assert "math_verify" not in top  # lazily: `import distill.answers` stays light


_IMPORT_EACH = """
import importlib, json, random, sys
names, seed = json.loads(sys.argv[1]), int(sys.argv[2])
random.Random(seed).shuffle(names)
report = {"order": names, "failed": {}, "skipped": {}}
for name in names:
    for loaded in [m for m in sys.modules if m == "distill" or m.startswith("distill.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing and missing != "distill":
            report["skipped"][name] = f"needs {e.name}"
        else:
            report["failed"][name] = f"{type(e).__name__}: {e}"
    except BaseException as e:
        report["failed"][name] = f"{type(e).__name__}: {e}"
print("REPORT" + json.dumps(report))
"""


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    seed = int(os.environ.get("DISTILL_IMPORT_SEED") or random.SystemRandom().randrange(10**6))
    print(f"import order seed: {seed} (replay: DISTILL_IMPORT_SEED={seed})")
    names = sorted(all_modules())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names), str(seed)],
                          capture_output=True, text=True, timeout=300, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")), None)
    if line is None:
        pytest.fail(f"seed {seed}: the import run died (rc {proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}")
    report = json.loads(line.removeprefix("REPORT"))
    for name, why in sorted(report["skipped"].items()):
        print(f"skipped {name}: {why}")
    assert len(report["skipped"]) < len(names) / 2, report["skipped"]  # not a broken install
    assert not report["failed"], (
        f"seed {seed}, order {report['order']}:\n"
        + "\n".join(f"{n}: {why}" for n, why in sorted(report["failed"].items())))
