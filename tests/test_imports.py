"""The import graph: layers that only point down, no circles, and a screening path without torch.

Layers, top to bottom: screenline.cli and deployments → flows → tasks → models → screenline.files. A module may
import from its own layer and the ones below; none imports upward, and no chain of imports comes back to where it
started. Imports inside functions count (they are still dependencies); annotations under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("screenline", "deployments", "flows", "tasks", "models")
LAYER = {"screenline.cli": 4, "deployments": 4, "flows": 3, "tasks": 2, "models": 1, "screenline.files": 0}


def _layer(module: str) -> int:
    return LAYER.get(module, LAYER.get(module.split(".")[0], 4))


def _runtime_imports(path: Path) -> set[str]:
    """First-party modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES and _module_path(n))
    return found


def _module_path(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"}
    return {name: _runtime_imports(path) - {name} for name, path in modules.items()}


def test_no_module_imports_from_a_layer_above_it():
    upward = sorted(f"{m} imports {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m))
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = _graph()
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                circles.append(" → ".join(path[path.index(dep):] + [node, dep]) if dep in path else f"{node} → {dep}")
            elif dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert circles == []


def test_the_graph_sees_imports_inside_functions():
    """The checks above would pass on nothing if lazy imports were missed: tasks/optimize.py imports models.export
    inside a function."""
    assert "models.export" in _graph()["tasks.optimize"]


def test_screening_modules_do_not_import_torch():
    code = (
        "import sys; import flows.ingest, flows.screen, flows.audit, flows.nightly, tasks.ingest, tasks.metrics, "
        "tasks.audit, tasks.report, models.engine, models.registry, deployments.serve, "
        "tasks.dataset, screenline.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
