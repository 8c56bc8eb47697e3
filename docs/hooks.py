"""MkDocs hooks: the committed figures and the executed notebooks become part of the site.

- ``figures/*.png`` (the repository's committed figures) are served at ``figures/`` so that pages link them
  with the same relative path the README uses.
- Every executed notebook in ``docs/notebooks/`` gets a place in the navigation under "Notebooks", in file
  order, and ``<!-- notebook-list -->`` on a page becomes a list of links to them.
- ``<!-- module-table -->`` becomes a table of the package's modules, each with the first line of its docstring.
- A link to ``notebooks/<name>.ipynb`` whose executed copy is not there (``make report`` writes them) points to
  the notebooks page instead, and the build logs which ones are missing.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.refusal_lens")
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_LINK = re.compile(r"\]\(notebooks/([0-9A-Za-z_]+)\.ipynb\)")


def _notebooks(docs_dir: Path) -> list[Path]:
    return sorted((docs_dir / "notebooks").glob("*.ipynb"))


def on_config(config):
    """Put each executed notebook into the nav under the "Notebooks" entry."""
    pages = [f"notebooks/{path.name}" for path in _notebooks(Path(config["docs_dir"]))]
    for i, entry in enumerate(config["nav"]):
        if isinstance(entry, dict) and entry.get("Notebooks") == "notebooks.md":
            config["nav"][i] = {"Notebooks": ["notebooks.md", *pages]}
    return config


def on_files(files, config):
    """Serve the committed figures at ``figures/<name>.png``."""
    for path in sorted((ROOT / "figures").glob("*.png")):
        files.append(File(f"figures/{path.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def module_table() -> str:
    """Each module (or subpackage) of ``refusal_lens`` with the first line of its docstring."""
    package = ROOT / "refusal_lens"
    paths = [p for p in sorted(package.glob("*.py")) if not p.name.startswith("_")]
    paths += sorted(p / "__init__.py" for p in package.iterdir() if (p / "__init__.py").is_file())
    rows = ["| module | what it is |", "| --- | --- |"]
    for path in sorted(paths, key=lambda p: p.parent.name if p.name == "__init__.py" else p.stem):
        name = path.parent.name if path.name == "__init__.py" else path.stem
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().split("\n\n")[0]
        rows.append(f"| `{name}` | {' '.join(doc.split())} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    """Fill ``<!-- module-table -->`` and ``<!-- notebook-list -->``; send links to notebooks not yet executed to
    the notebooks page."""
    docs_dir = Path(config["docs_dir"])
    present = {path.stem for path in _notebooks(docs_dir)}
    depth = page.file.src_uri.count("/")
    up = "../" * depth
    if "<!-- module-table -->" in markdown:
        markdown = markdown.replace("<!-- module-table -->", module_table())
    if "<!-- notebook-list -->" in markdown:
        items = [f"- [{stem}]({up}notebooks/{stem}.ipynb)" for stem in sorted(present)]
        markdown = markdown.replace("<!-- notebook-list -->", "\n".join(items) or
                                    "*No executed notebook yet: `make report` writes them.*")

    def link(match: re.Match) -> str:
        if match.group(1) in present:
            return match.group(0)
        log.info("%s links notebooks/%s.ipynb, not executed yet: linking the notebooks page",
                 page.file.src_uri, match.group(1))
        return f"]({up}notebooks.md)"

    return NOTEBOOK_LINK.sub(link, markdown) if depth == 0 else markdown
