"""The shape of the code: splitc's import graph, read from the source with ``ast``.

* no import cycles, counting imports inside functions;
* a splitc module is imported inside a function only in the CLI glue, and an optional heavy
  dependency (torch, hls4ml, ONNX Runtime, ...) is loaded lazily only from
  :mod:`splitc.optional`;
* the board side stays apart: ``runtime/`` and ``targets/`` import nothing of the compile side,
  and ``passes/`` (the IR layer) imports nothing of the runtime;
* the compile side's rooms go one way: frontend and backend below planning, planning below the
  driver, the driver below the CLI.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: folder -> the package it is installed as (pyproject's package-dir)
FOLDERS = {"splitc": "splitc", "passes": "splitc.passes", "runtime": "splitc.runtime",
           "targets": "splitc.targets"}
#: modules that may import splitc modules inside functions (typer commands load what they use)
CLI_GLUE = {"splitc.cli", "splitc.cli_runtime"}
#: third-party packages that may load lazily, from splitc.optional only
HEAVY = {"torch", "hls4ml", "onnxruntime", "sklearn", "scipy", "xgboost", "matplotlib",
         "cairosvg", "graphviz", "tensorflow", "keras"}
LAZY_HOME = "splitc.optional"
#: The compile side's rooms, lowest first: a module may import its own room and lower ones.
ROOMS = ["splitc.errors", "splitc.optional", "splitc.passes", "splitc.frontend",
         "splitc.backend", "splitc.planning", "splitc.report", "splitc.draw", "splitc.driver",
         "splitc.cli_runtime", "splitc.cli"]


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module or package (a splitc one), or a third-party top name
    nested: bool  # inside a function
    line: int


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, nested: bool, line: int) -> None:
        if target.startswith("splitc"):
            while target not in known and "." in target:  # a name imported from a module
                target = target.rsplit(".", 1)[0]
        else:
            target = target.split(".")[0]
        found.append(Import(module, target, nested, line))

    def walk(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                         | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, nested, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child.level, child.module)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    add(full if full in known else base, nested, child.lineno)
            walk(child, inner)

    walk(tree, False)
    return found


def graph() -> tuple[dict[str, Path], list[Import]]:
    mods = modules()
    known = set(mods)
    return mods, [i for m, p in mods.items() for i in imports_of(m, p, known)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str | None:
    for r in ROOMS:
        if module == r or module.startswith(r + "."):
            return r
    return None


def where(i: Import) -> str:
    return f"{i.source} (line {i.line}) imports {i.target}"


def test_the_graph_is_read():
    """The reader sees what is there (a test of the test: an empty graph passes anything)."""
    mods, imports = graph()
    assert {"splitc.driver", "splitc.runtime.worker", "splitc.passes.split.spatial",
            "splitc.planning.search", "splitc.frontend.load"} <= set(mods)
    assert Import("splitc.runtime.worker", "splitc.runtime.artifact", False,
                  next(i.line for i in imports if i.source == "splitc.runtime.worker"
                       and i.target == "splitc.runtime.artifact")) in imports


def test_no_import_cycles():
    _, imports = graph()
    edges: dict[str, set[str]] = {}
    for i in imports:
        if i.target.startswith("splitc") and i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
    assert cycles(edges) == []


def test_splitc_modules_are_imported_at_the_top_outside_the_cli():
    _, imports = graph()
    bad = [where(i) for i in imports if i.nested and i.target.startswith("splitc")
           and i.source not in CLI_GLUE]
    assert bad == []


def test_heavy_dependencies_load_lazily_from_one_place():
    _, imports = graph()
    bad = [where(i) for i in imports if i.nested and i.target in HEAVY
           and i.source != LAZY_HOME]
    assert bad == []


def test_the_board_side_imports_nothing_of_the_compile_side():
    _, imports = graph()
    bad = []
    for i in imports:
        if not i.target.startswith("splitc"):
            continue
        for side in ("splitc.runtime", "splitc.targets"):
            if room_of(i.source, side) and not room_of(i.target, side):
                bad.append(where(i))
        if room_of(i.source, "splitc.passes") and room_of(i.target, "splitc.runtime"):
            bad.append(where(i))
    assert bad == []


def room_of(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_compile_side_rooms_import_downwards():
    _, imports = graph()
    bad = []
    for i in imports:
        a, b = room(i.source), room(i.target)
        if a and b and ROOMS.index(b) > ROOMS.index(a):
            bad.append(where(i))
    assert bad == []


def test_every_compile_side_module_has_a_room():
    mods, _ = graph()
    homeless = [m for m in mods if room(m) is None and not m.startswith(
        ("splitc.runtime", "splitc.targets")) and m != "splitc"]
    assert homeless == []
