"""The architecture map as a test: who may import whom (README "Module map"), and no import cycles
between our modules, counting imports inside functions too (a lazy import hides a cycle from
Python, not from a reader)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "trainers", "shapes", "pipelines", "serve")
# A package may import only these of ours (besides itself): the lower layers know nothing of the upper.
MAY_IMPORT = {"models": set(), "trainers": {"models"}}


def _graph() -> dict[str, set[str]]:
    modules = {f"{p}.{f.stem}" for p in PACKAGES for f in (REPO / p).glob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name in modules:
        package, stem = name.split(".")
        for node in ast.walk(ast.parse((REPO / package / f"{stem}.py").read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
            graph[name] |= {t.split(".")[0] for t in targets if t.split(".")[0] in PACKAGES} - {package}
    return graph


def test_lower_layers_do_not_import_upper_ones():
    graph = _graph()
    for package, allowed in MAY_IMPORT.items():
        for module, targets in graph.items():
            if module.startswith(package + "."):
                used = {t for t in targets if t in PACKAGES}
                assert used <= allowed, f"{module} imports {sorted(used - allowed)}"


def test_no_import_cycles_between_our_modules():
    graph = _graph()
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(t for t in graph.get(module, ()) if "." in t):
            assert seen.get(target) != 1, "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in seen:
                visit(target, path + [target])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
