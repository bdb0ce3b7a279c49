"""The code passes the project's ruff configuration (pyproject.toml: [tool.ruff])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def unannotated(source: str) -> list[str]:
    """Public functions and methods (and every __init__) of `source` with a parameter or return left unannotated."""
    import ast

    found = []

    def visit(nodes, prefix: str = "") -> None:
        for n in nodes:
            if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):
                visit(n.body, f"{prefix}{n.name}.")
            elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and (not n.name.startswith("_")
                                                                              or n.name == "__init__"):
                args = n.args.posonlyargs + n.args.args + n.args.kwonlyargs
                if prefix and args and args[0].arg in ("self", "cls"):
                    args = args[1:]
                bare = [a.arg for a in args if a.annotation is None]
                bare += [f"*{v.arg}" for v in (n.args.vararg, n.args.kwarg) if v is not None and v.annotation is None]
                if n.returns is None and n.name != "__init__":
                    bare.append("return")
                if bare:
                    found.append(f"{prefix}{n.name} (line {n.lineno}): {', '.join(bare)}")

    visit(ast.parse(source).body)
    return found


def test_every_public_function_is_type_hinted():
    missing = [f"{path.relative_to(ROOT)}: {what}" for pkg in ("pipeline", "actors", "learner", "probes")
               for path in sorted((ROOT / pkg).rglob("*.py")) for what in unannotated(path.read_text())]
    assert not missing, "add type hints:\n" + "\n".join(missing)
    assert unannotated("def f(a, b: int = 1):\n    pass\nclass C:\n    def m(self, x: int) -> int:\n        return x\n"
                       ) == ["f (line 1): a, return"]
