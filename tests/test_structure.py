"""The package's shape: no import cycles (imports inside functions count too), modules and functions of a
size a reader can hold, and each fact (defaults, method lists) written once."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "segcli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _from_module(node: ast.ImportFrom, name: str, is_pkg: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _handed_on(mods: dict[str, Path]) -> dict[str, dict[str, str]]:
    """For each package face: {name it only hands on: the module it takes the name from}."""
    out: dict[str, dict[str, str]] = {}
    for name, path in mods.items():
        if path.name != "__init__.py":
            continue
        names: dict[str, str] = {}
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                mod = _from_module(node, name, True)
                if mod in mods:
                    names.update({a.asname or a.name: mod for a in node.names})
        out[name] = names
    return out


def _imports(path: Path, name: str, known: set[str], handed: dict[str, dict[str, str]]) -> set[str]:
    """segcli modules imported anywhere in ``path`` (module level, inside functions, TYPE_CHECKING blocks).

    ``from pkg import x`` is an edge to ``pkg.x`` when that is a module, to the module ``pkg/__init__.py``
    takes ``x`` from when the face only hands it on, and to ``pkg`` itself when the face defines ``x``:
    a child that takes a name its package defines is a cycle, one that takes a handed-on name is not.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _from_module(node, name, is_pkg)
            for a in node.names:
                full = f"{mod}.{a.name}"
                targets.append(full if full in known else handed.get(mod, {}).get(a.name, mod))
        for t in targets:
            # the longest known module name the target starts with
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("segcli"):
                out.add(t)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    """The import graph of the checkout as it is now (built once: parsing every module is the slow part)."""
    mods = _modules()
    known = set(mods)
    handed = _handed_on(mods)
    return {m: _imports(p, m, known, handed) for m, p in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    """Every edge counts, a package face's edges to its own children included."""
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_names_resolve_through_package_faces(tmp_path):
    """The resolution the cycle test relies on: a handed-on name is followed to its module, a name the face
    defines stays an edge to the face (the cycle this test exists to catch)."""
    pkg = tmp_path / "segcli"
    (pkg / "io").mkdir(parents=True)
    (pkg / "io" / "__init__.py").write_text("from segcli.io.types import Image\n\ndef sniff():\n    pass\n")
    (pkg / "io" / "types.py").write_text("class Image:\n    pass\n")
    (pkg / "io" / "tiff.py").write_text("from segcli.io import Image\nfrom segcli.io import sniff\n")
    mods = {"segcli.io": pkg / "io" / "__init__.py", "segcli.io.types": pkg / "io" / "types.py",
            "segcli.io.tiff": pkg / "io" / "tiff.py"}
    handed = _handed_on(mods)
    assert handed["segcli.io"] == {"Image": "segcli.io.types"}
    edges = _imports(mods["segcli.io.tiff"], "segcli.io.tiff", set(mods), handed)
    assert edges == {"segcli.io.types", "segcli.io"}
    graph = {m: _imports(p, m, set(mods), handed) for m, p in mods.items()}
    graph["segcli.io"].add("segcli.io.tiff")  # the face importing its child, as real faces do
    assert _find_cycle(graph) == ["segcli.io", "segcli.io.tiff", "segcli.io"]


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _importers(graph: dict[str, set[str]], target: str) -> set[str]:
    return {m for m, edges in graph.items() if target in edges}


def test_only_the_cli_imports_the_api():
    """The API is a façade on top: nothing below it calls back up (the pipeline gets a RunContext)."""
    assert _importers(_graph(), "segcli.api") == {"segcli.cli"}


def test_the_inferer_sits_below_the_pipeline():
    """The model holder knows no files: it imports neither the pipeline, the batch, nor the outputs, and the
    pipeline's own helpers (outputs, input facts, memory checks) never import the pipeline."""
    graph = _graph()
    assert not graph["segcli.inferer"] & {"segcli.pipeline", "segcli.batch", "segcli.outputs", "segcli.api"}
    assert _importers(graph, "segcli.pipeline") <= {"segcli.api", "segcli.batch"}


def _walk_modules() -> list[str]:
    """The modules ARCHITECTURE.md's walk of ``segcli predict scan.nii.gz`` names, in its order."""
    import re

    text = (PKG.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    walk = text.split("## The path of `segcli predict scan.nii.gz`")[1].split("\n## ")[0]
    return [_module_name(PKG.parent / p) for p in re.findall(r"`(segcli/[\w/]+\.py)`", walk)]


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_architecture_walk_goes_down_the_imports():
    """Each module of the walk exists, is named once, is used by ``segcli predict`` (reached from the CLI),
    and imports none named before it: the walk reads top to bottom."""
    names = _walk_modules()
    graph = _graph()
    assert len(names) >= 20 and names[0] == "segcli.cli"
    assert not [n for n in names if n not in graph], "named in the walk but not a module"
    assert len(set(names)) == len(names), "a module named twice"
    below_cli = _reach(graph, "segcli.cli")
    assert not [n for n in names[1:] if n not in below_cli]
    upward = [f"{later} imports {earlier}" for i, earlier in enumerate(names) for later in names[i + 1:]
              if earlier in _reach(graph, later)]
    assert not upward, "the walk goes up: " + "; ".join(upward)


def _is_cli_signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A typer command's signature: one line per flag, each with its help text."""
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    return any(a.annotation is not None and "typer." in ast.unparse(a.annotation) for a in args)


def _own_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, less those of the functions and classes defined inside it (counted on their own)
    and, for a typer command, less its signature."""
    start = fn.body[0].lineno if _is_cli_signature(fn) else fn.lineno
    n = (fn.end_lineno or fn.lineno) - start + 1
    for node in _direct_children(fn):
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        n -= (node.end_lineno or node.lineno) - first + 1
    return n


def _direct_children(fn: ast.AST) -> list[ast.AST]:
    """Functions and classes defined in ``fn``'s body, not inside another of them."""
    found: list[ast.AST] = []
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(node)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return found


def test_module_and_function_sizes():
    """Every module under 650 lines and every function under 80 of its own, with no list of exceptions: what
    grows past them is split (the signature of a typer command, one line per flag, does not count)."""
    too_long = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG.parent))
        text = path.read_text(encoding="utf-8")
        if (lines := text.count("\n")) >= 650:
            too_long.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (n := _own_lines(node)) >= 80:
                too_long.append(f"{rel}:{node.lineno} {node.name}(): {n} lines")
    assert (PKG / "api.py").read_text(encoding="utf-8").count("\n") < 400
    assert not too_long, "\n".join(too_long)


def test_function_size_rule_counts_what_it_says():
    """The size rule on known sources: nested functions count on their own, a typer signature does not."""
    src = ("def outer(a):\n    x = 1\n    def inner():\n        return 2\n    return x\n\n"
           "def cmd(\n    a: Annotated[int, typer.Option()] = 1,\n    b: Annotated[int, typer.Option()] = 2,\n"
           ") -> None:\n    return None\n")
    fns = {n.name: n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    assert (_own_lines(fns["outer"]), _own_lines(fns["inner"]), _own_lines(fns["cmd"])) == (3, 2, 1)


@pytest.mark.parametrize("fact", ["S // 8", "size // 8", "input_size // 8", '("stts", "refine", "direct"'])
def test_each_default_written_once(fact):
    """The crop padding default and the method lists live only in segcli.params / segcli.methods."""
    hits = [str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if fact in p.read_text(encoding="utf-8")
            and p.name not in ("params.py", "methods.py")]
    assert not hits, f"{fact!r} written outside segcli/params.py and segcli/methods.py: {hits}"
