"""MkDocs hooks of the documentation site (mkdocs.yml: `hooks`): pages made from files outside `docs/`, so the
site shows them as they are in the repository and cannot drift from them.

- `index.md`: the repository's README.md (the front page), its `docs/` links made relative to the site;
- `reference.md`: the configuration reference, generated from the config tree (pipeline/config.py);
- `deploy.md`: deploy/README.md (the cluster files' guide).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def front_page() -> str:
    text = (ROOT / "README.md").read_text()
    text = text.replace("](docs/", "](")
    text = text.replace("| Configuration reference |", "| [Configuration reference](reference.md) |")
    return text.replace("(`deploy/README.md`)", "([deploy/README.md](deploy.md))")


def on_files(files: Files, config) -> Files:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pipeline.cli.config_reference import reference_markdown

    for name, content in (("index.md", front_page()), ("reference.md", reference_markdown()),
                          ("deploy.md", (ROOT / "deploy" / "README.md").read_text())):
        files.append(File.generated(config, name, content=content))
    return files
