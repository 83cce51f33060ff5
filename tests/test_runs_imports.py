"""The package's import graph: no module of ``crossmodal/`` imports a top-level script, and the
imports between its modules (at module level and inside functions alike) have no cycle, so the
modules stand on floors and no import runs back up. Imports are ``import`` / ``from ... import``
statements and calls of ``importlib.import_module`` / ``__import__`` with a constant name."""

import ast
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "crossmodal"


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """Module name -> the package modules it imports at module level, and with ``lazy`` also
    inside functions."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        tree = ast.parse(path.read_text())
        for node in (ast.walk(tree) if lazy else _module_level(tree)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]  # "from . import x"
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("crossmodal"):
                rest = (node.module or "").split(".")[1:]
                names = rest[:1] or [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("crossmodal.")]
            elif isinstance(node, ast.Call) and _dynamic_import(node) is not None:
                names = [_dynamic_import(node)]
            else:
                continue
            deps |= {n.split(".")[0] for n in names if n and n.split(".")[0] in modules}
        graph[path.stem] = deps - {path.stem}
    return graph


def _dynamic_import(call: ast.Call) -> str | None:
    """The package module a call ``importlib.import_module("crossmodal.x")`` (or ``(".x", "crossmodal")``,
    ``import_module`` imported bare) or ``__import__("crossmodal.x")`` loads; None for any other call."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return None
    target = first.value
    if target.startswith("crossmodal."):
        return target.split(".")[1]
    if target.startswith(".") and name == "import_module":
        return target.lstrip(".").split(".")[0] or None
    return None


def _module_level(tree):
    """The statements run when the module is imported (not those inside functions or classes' methods)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


#: Imports inside a function that run back up, each with its reason (none today: cli.split_name checks
#: a split's syntax with splits.parse_split, a leaf, so cli no longer climbs to coco).
KNOWN_LAZY_CLIMBS: set[tuple[str, str]] = set()


def test_the_package_has_no_import_cycle():
    graph = import_graph(lazy=False)
    assert {"runs", "encoders", "searcher", "serve", "train", "checkpoints"} <= set(graph)
    assert graph["serve"] >= {"searcher", "runs"} and "ensemble" in graph["runs"]  # the graph is read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    everything = import_graph(lazy=True)  # imports inside functions climb back up only where listed
    assert "train" in everything["runs"] and "train" not in graph["runs"]
    for a, b in KNOWN_LAZY_CLIMBS:
        everything[a].discard(b)
    assert find_cycle(everything) is None, " -> ".join(find_cycle(everything))


def test_a_dynamic_import_counts_as_an_import(tmp_path, monkeypatch):
    """A module-level ``importlib.import_module`` / ``__import__`` cycle is a cycle too."""
    pkg = tmp_path / "crossmodal"
    pkg.mkdir()
    (pkg / "a.py").write_text("import importlib\nB = importlib.import_module('crossmodal.b')\n")
    (pkg / "b.py").write_text("from importlib import import_module\nC = import_module('.c', 'crossmodal')\n")
    (pkg / "c.py").write_text("A = __import__('crossmodal.a')\nX = __import__('json')\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph = import_graph(lazy=False)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_package_module_imports_a_top_level_script():
    scripts = {p.stem for p in ROOT.glob("*.py")}
    assert {"retrieve_img2text", "make_database_img"} <= scripts
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not scripts & {n.split(".")[0] for n in names}, (path.name, names)


def test_run_loading_lives_in_runs_only():
    """The server's modules hold no run-loading checks: they open runs through crossmodal.runs."""
    for name in ("serve", "searcher"):
        text = (PACKAGE / f"{name}.py").read_text()
        for private in ("load_checkpoint", "check_features_fit", "load_embeddings", "load_index", "read_meta",
                        "build_image_encoder", "text_encoder_from_sidecar"):
            assert private not in text, (name, private)
