"""The package's layout (issue 21): the import graph read from the source files has no cycle, no module
imports another's private name, and the torch-free parts (planning, aggregation, the report) stay
torch-free, at import and when they run."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "ofe"
# What must never import torch: planning (the Snakefile imports it), the config, the files' formats, and
# everything that reads finished results (aggregation, the report).
TORCH_FREE = ("ofe.config", "ofe.io", "ofe.runfolder", "ofe.plan", "ofe.aggregate", "ofe.report", "ofe.track")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if path.name == "__init__.py" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every absolute import of an ofe module in the file, at the top or inside a
    function alike: `import ofe.x` gives ("ofe.x", []), `from ofe.x import a, b` gives ("ofe.x", ["a", "b"])."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "ofe"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(REPO)}:{node.lineno}: a relative import (ofe's are absolute)"
            if (node.module or "").split(".")[0] == "ofe":
                found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the ofe modules it imports. `from ofe.x import y` is an edge to ofe.x.y where y is a
    module of its own, else to ofe.x. The parent packages a dotted import also runs are not edges: their
    __init__ files only document, re-export (ofe.config, ofe.report.plots) or import lazily (ofe.plan)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for module, names, _ in _imports(path):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            targets |= set(subs) if subs and len(subs) == len(names) else {module, *subs}
        graph[name] = {t for t in targets if t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_module_imports_from_this_tree() -> None:
    for name, path in MODULES.items():
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve() == path.resolve(), f"{name} came from {module.__file__}"


def test_every_import_names_an_existing_module() -> None:
    """An import of an old path would fail here, not silently succeed through another checkout."""
    for name, path in MODULES.items():
        for module, _, line in _imports(path):
            assert module in MODULES, f"{path.relative_to(REPO)}:{line}: no module {module} in ofe/"


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert sum(map(len, graph.values())) > len(MODULES)  # the graph was read (some 160 edges)
    assert graph["ofe.aggregate.checkpoints"] >= {"ofe.aggregate.read"}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [f"{path.relative_to(REPO)}:{line}: {module}.{n}"
               for name, path in MODULES.items() for module, names, line in _imports(path)
               for n in names if n.startswith("_") and module != name]
    assert private == []


def test_every_subpackage_documents_what_lives_there() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 10, f"{init.relative_to(REPO)}: no docstring saying what lives there"
    assert not (PACKAGE / "__init__.py").exists()  # ofe itself stays a namespace package


def _run(code: str, *args: str) -> dict:
    """`code` in a fresh interpreter from the repository root; it prints one JSON line last."""
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_torch_free_modules_import_without_torch() -> None:
    names = [n for n in MODULES if n.startswith(TORCH_FREE)]
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    assert len(names) > 30
    assert _run(code) == []


def test_aggregating_and_building_a_report_import_no_torch(tmp_path) -> None:
    """The report of the report tests' synthetic results, and an aggregation of a planned run that never
    ran, in a process of their own: torch is never imported."""
    code = """
import json, sys
from pathlib import Path

from ofe.aggregate.runs import aggregate
from ofe.report.page import build_report
from tests.unit.report.test_report import _metrics_frame, _quant_frame, _runs_frame, _write_results

root = Path(sys.argv[1])
runs = _runs_frame()
_write_results(root / "results", runs, _metrics_frame(runs), _quant_frame(runs))
page = build_report(root / "results", root / "reports" / "index.html", png=False)
plan = {"runs": [{"run_id": "tiny/never", "grid": {"seed": 0}, "studies": ["s"], "config": None}],
        "grid_columns": ["seed"], "studies": [], "config": {}, "checkpoints": []}
frames = aggregate(plan, root / "empty")
print(json.dumps({"page": page.exists(), "runs": list(frames["runs"].status),
                  "loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    got = _run(code, str(tmp_path))
    assert got == {"page": True, "runs": ["missing"], "loaded": []}
