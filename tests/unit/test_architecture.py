"""The package's floors (pipeline/__init__.py): every import in pipeline/ goes to its own floor or one below, the
two floor-2 packages stay apart, and no module imports itself back through others (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOORS = {"config": 0, "cores": 0, "faults": 0, "progress": 0, "data": 1, "worlds": 2, "transport": 2, "loop": 3, "analysis": 4,
          "cli": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """probe-rl modules `path` imports, at any depth (a `from pkg import mod` counts as the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def _place(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "init"


def test_imports_go_down_the_floors_and_never_round_in_a_circle():
    modules = _modules()
    graph = {m: _imports(p, set(modules)) - {m, "pipeline"} for m, p in modules.items()}
    assert len(modules) > 30 and sum(map(len, graph.values())) > 40  # the walk sees the package
    wrong = []
    for m, deps in graph.items():
        if m == "pipeline":
            continue
        for d in deps:
            a, b = _place(m), _place(d)
            if FLOORS[b] > FLOORS[a] or (FLOORS[b] == FLOORS[a] and a != b and FLOORS[a] > 0):
                wrong.append(f"{m} (floor {FLOORS[a]}) imports {d} (floor {FLOORS[b]})")
    assert not wrong, "\n".join(wrong)
    # no circle: a depth-first walk finds no module on its own path
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_every_subpackage_says_its_job_and_what_it_may_import():
    for pkg in (p for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
        assert doc and f"Floor {FLOORS[pkg.name]}" in doc, pkg.name
    assert set(FLOORS) == {p.stem if p.suffix else p.name for p in (ROOT / "pipeline").iterdir()
                           if p.name not in ("__init__.py", "__pycache__", "configs")}  # configs/: the shipped TOML files, package data
