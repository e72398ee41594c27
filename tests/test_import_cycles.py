"""No import cycle between the modules of our six packages, and imports inside functions only where they pay.

STYLE.md B11, checked on the source with `ast`. An import inside a function still counts for cycles: hiding a cycle
behind a function-level import is still a cycle. Only imports under ``if TYPE_CHECKING:`` are left out (they never
run). The layering test beside this one checks the direction between packages; this one checks the modules inside
them (and, since it builds one graph, between them), and that every function-level import is of a module in
`LAZY_OK` (heavy optional dependencies, or modules that import one).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distill", "students", "teachers", "reinforced_data", "export", "mcd_common")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                return True
    return False


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that one import statement runs, by their dotted names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:  # `from pkg import submodule`
            found.add(sub)
        elif source in modules:  # `from module import name` (a package's __init__ when source is a package)
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports anywhere in its body (function level too, TYPE_CHECKING not)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and not _under_type_checking(node, parents):
                edges |= _imported(node, name, path.name == "__init__.py", modules)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# module (prefix) -> why importing it inside a function is worth it
LAZY_OK = {
    "coremltools": "heavy optional dependency",
    "executorch": "heavy optional dependency",
    "onnx": "heavy optional dependency",
    "onnxruntime": "heavy optional dependency",
    "transformers": "heavy optional dependency",
    "torchao": "executorch's quantisation stack (~0.4 s), only for int8 exports",
    "open_clip": "imports transformers",
    "students": "imports open_clip, hence transformers",
    "export.hf": "imports open_clip and transformers",
    "teachers._open_clip_loader": "imports open_clip, hence transformers",
    "matplotlib": "~0.5 s, and distill.compare / export.bench are imported by every `distill --help`",
    "distill.evaluate": "distill.cli stays light (torch): only the subcommand that runs is imported",
    # TODO(coordinator): distill/zoo.py imports the torch-free `teachers` registry inside functions; drop this entry
    # when it moves to the top (H13 owns zoo.py)
    "teachers": "pending: distill/zoo.py",
}


def _lazy_ok(module: str) -> bool:
    return any(module == ok or module.startswith(ok + ".") for ok in LAZY_OK)


def test_function_level_imports_are_only_of_heavy_modules():
    bad = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _under_type_checking(node, parents):
                continue
            if not any(isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef) for p in _ancestors(node, parents)):
                continue
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if getattr(node, "level", 0):  # relative imports are always of our own (light) modules
                targets = [f"{name}:relative"]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {t}" for t in targets if not _lazy_ok(t)]
    assert not bad, "imports inside functions of light modules (move them to the top):\n" + "\n".join(bad)


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[ast.AST]:
    out = []
    while node in parents:
        node = parents[node]
        out.append(node)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    lines = [" <-> ".join(c) for c in found]
    assert not found, "import cycles (function-level imports count too):\n" + "\n".join(lines)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycle_finder(graph, expected):
    assert cycles(graph) == expected


def test_graph_sees_function_level_imports():
    # the check would be blind if a function-level import were missed: students.hf_text imports transformers
    # inside functions, and distill.cli imports distill.evaluate inside one
    assert "distill.evaluate" in import_graph()["distill.cli"]
