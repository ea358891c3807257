"""The package structure, read from the source with ``ast`` (nothing is imported):

- no import cycle among the modules of quant/, analysis/, reports/ and vitq/;
- no module imports another module's private (underscore) name;
- the layers only import downwards: quant <- analysis <- reports <- vitq.

Every ``import`` statement counts, also those inside functions (a late import hides a
cycle, it does not remove it), except those under ``if TYPE_CHECKING:``: they are read
by type checkers only and never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("quant", "analysis", "reports", "vitq")  # each may import only those before it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def run_time_imports(tree: ast.AST):
    """The Import/ImportFrom nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                todo.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            todo.append(child)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def first_party(name: str) -> bool:
    return name.split(".")[0] in LAYERS


def scan(roots: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> first-party modules it imports, and the private-name imports found.

    ``roots`` maps a top-level package name to its folder (the tests plant packages)."""
    files = {}
    for top, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            parts = [top, *rel]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in run_time_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            else:
                source = resolve(module, is_package, node)
                targets = []
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    # ``from pkg import module`` imports the module, else a name of ``source``
                    targets.append((sub, None) if sub in modules else (source, alias.name))
            for target, name in targets:
                if not target.split(".")[0] in roots:
                    continue
                if target in modules and target != module:
                    graph[module].add(target)
                private_module = any(p.startswith("_") and p != "__init__" for p in target.split("."))
                if name is not None and name.startswith("_") and target != module:
                    private.append(f"{module} imports {name} from {target}")
                elif private_module and target != module:
                    private.append(f"{module} imports the private module {target}")
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(found)


def upward(graph: dict[str, set[str]]) -> list[str]:
    rank = {top: i for i, top in enumerate(LAYERS)}
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if rank[t.split(".")[0]] > rank[m.split(".")[0]])


PROJECT = {top: ROOT / top for top in LAYERS}


def test_no_import_cycle():
    graph, _ = scan(PROJECT)
    assert {"quant.store", "quant.families.base", "reports"} <= set(graph)  # every layer was read
    assert {"quant.config", "analysis.metrics"} <= graph["analysis.planner"]
    assert cycles(graph) == []


def test_no_module_imports_a_private_name_of_another():
    _, private = scan(PROJECT)
    assert private == []


def test_layers_import_only_downwards():
    graph, _ = scan(PROJECT)
    assert upward(graph) == []


# -- the checks themselves, on planted packages ------------------------------------------
def plant(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {top: tmp_path / top for top in {rel.split("/")[0] for rel in files}}


def test_a_late_import_cycle_is_found_and_a_type_checking_one_is_not(tmp_path):
    roots = plant(tmp_path, {
        "quant/__init__.py": "",
        "quant/a.py": "from .b import thing\n",
        "quant/b.py": "def thing():\n    from .a import other\n",  # late: still a cycle
        "quant/c.py": "from typing import TYPE_CHECKING\nfrom .d import x\nif TYPE_CHECKING:\n    from .e import y\n",
        "quant/d.py": "x = 1\n",
        "quant/e.py": "from quant import c\n",  # c -> e only for type checkers
    })
    graph, _ = scan(roots)
    assert graph["quant.c"] == {"quant.d"} and graph["quant.e"] == {"quant.c"}
    assert cycles(graph) == [["quant.a", "quant.b"]]


def test_private_names_and_upward_imports_are_found(tmp_path):
    roots = plant(tmp_path, {
        "quant/__init__.py": "",
        "quant/low.py": "_hidden = 1\nshown = 2\n",
        "quant/_inner.py": "z = 3\n",
        "analysis/__init__.py": "",
        "analysis/mid.py": "from quant.low import _hidden, shown\nfrom quant._inner import z\n",
        "analysis/ok.py": "from quant.low import shown\nimport quant.low\n",
        "quant/bad.py": "from analysis.ok import x\n",
    })
    graph, private = scan(roots)
    assert private == ["analysis.mid imports _hidden from quant.low",
                       "analysis.mid imports the private module quant._inner"]
    assert upward(graph) == ["quant.bad imports analysis.ok"]
    assert graph["analysis.ok"] == {"quant.low"}

