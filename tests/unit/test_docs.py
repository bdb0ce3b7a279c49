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


def _build(root: Path, out: Path):
    import subprocess
    import sys

    mkdocs = Path(sys.executable).with_name("mkdocs")
    return subprocess.run([str(mkdocs), "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(out)],
                          capture_output=True, text=True, timeout=300)


def _reference_rows(markdown: str) -> dict[str, tuple[str, str, str]]:
    """{dotted key: (type, default, meaning)} read back from the reference page's tables."""
    rows, section = {}, None
    for line in markdown.splitlines():
        if m := re.match(r"^## `\[\[?([\w.]+)\]\]?`$", line):
            section = m.group(1)
        elif m := re.match(r"^\| `(\w+)` \| (.*) \| `(.*)` \| (.*) \|$", line):
            rows[f"{section}.{m.group(1)}"] = (m.group(2), m.group(3), m.group(4))
    return rows


def test_the_configuration_reference_lists_every_key_with_its_default_and_docstring():
    from pipeline.cli.config_reference import keys, reference_markdown, undocumented
    from pipeline.config import Config, LearnerConfig, ProbeSpec

    assert undocumented() == []  # every key has a docstring under it in pipeline/config.py
    rows = _reference_rows(reference_markdown())
    assert set(rows) == set(keys()) and len(rows) > 100
    # Defaults and types as the config tree has them, for one key of each kind.
    assert rows["learner.lr"][1] == str(LearnerConfig().lr) and rows["learner.lr"][0] == "float"
    assert rows["shaping.kind"][0].count('"') >= 8 and f'"{Config().shaping.kind}"' == rows["shaping.kind"][1]
    assert rows["task.dataset"][0] == "string \\| unset" and rows["task.dataset"][1] == "unset"
    assert rows["scorer.probes.path"][1] == "required" and "path" in ProbeSpec.model_fields
    assert rows["learner.rollout_correction.mode"][2].startswith("Which correction")


def test_the_docs_site_builds_strict_and_a_broken_link_fails_it(tmp_path):
    """`mkdocs build --strict` of the real docs passes and holds the generated pages; a copy with one broken link
    and one missing anchor fails, naming both."""
    built = _build(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "reference.html", "deploy.html", "results.html", "research.html"):
        assert (site / page).is_file(), page
    assert "learner.rollout_correction" in (site / "reference.html").read_text()
    assert 'href="running.html"' in (site / "index.html").read_text()  # the README's docs/ links made relative

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs", ignore=shutil.ignore_patterns("data", "*.parquet", "*.png", "*.json"))
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copy(ROOT / "README.md", copy / "README.md")
    (copy / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "README.md", copy / "deploy" / "README.md")
    page = copy / "docs" / "tests.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md), [lost](running.md#no-such-section)\n")
    broken = _build(copy, tmp_path / "site2")
    assert broken.returncode != 0
    assert "no-such-page.md" in broken.stderr and "no-such-section" in broken.stderr
