"""The docs cite only tests that exist: every `test_*.py` named in the README or docs/ is a file under tests/, and
every `test_*.py::test_name` a test function in it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITE = re.compile(r"\b(test_\w+\.py)(?:::(test_\w+))?")


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] + (
        [ROOT / "CONTRIBUTING.md"] if (ROOT / "CONTRIBUTING.md").exists() else [])


def test_every_cited_test_file_and_function_exists():
    files = {p.name: p for p in (ROOT / "tests").rglob("test_*.py")}
    cited, missing = 0, []
    for doc in _docs():
        for line_no, line in enumerate(doc.read_text().splitlines(), 1):
            for name, func in CITE.findall(line):
                cited += 1
                where = f"{doc.relative_to(ROOT)}:{line_no}"
                if name not in files:
                    missing.append(f"{where}: {name} (no such file under tests/)")
                elif func and not re.search(rf"^def {func}\(", files[name].read_text(), re.M):
                    missing.append(f"{where}: {name}::{func} (no such test in it)")
    assert cited >= 5  # the README's fault table alone cites more
    assert not missing, "\n".join(missing)
