"""Execute every notebook on the main job's run and write a browsable HTML page per notebook (``make report``).

Notebooks 03-07 read the main job's selection from a copy of ``runs/`` (so the pages show the README's direction);
00-02 build their own at their default sizes in a scratch folder (02 would otherwise overwrite the main job's
``selected.json``). Figures stay interactive: each page loads the one ``figures/plotly.min.js`` of the repository
instead of carrying its own copy. Usage, from the repository root, after ``make run``::

    python notebooks/render_html.py --runs runs --out docs/notebooks
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import nbformat
import papermill
import plotly.graph_objects as go
from nbconvert import HTMLExporter

NOTEBOOKS = Path(__file__).resolve().parent
PLOTLY_MIME = "application/vnd.plotly.v1+json"
OWN_SELECTION = ("00_", "01_", "02_")  # these build their own direction; the others read the main job's


def _plotly_as_html(notebook: nbformat.NotebookNode) -> None:
    """Give every Plotly output an HTML form that draws it with a page-wide Plotly (no inline copy of plotly.js)."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            figure = output.get("data", {}).get(PLOTLY_MIME)
            if figure is not None:
                fig = go.Figure(data=figure.get("data"), layout=figure.get("layout"))
                output["data"]["text/html"] = fig.to_html(include_plotlyjs=False, full_html=False)
                del output["data"][PLOTLY_MIME]


def render(runs: Path, out: Path, plotly_js: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="refusal-lens-report-"))
    shutil.copytree(runs, scratch / "main", dirs_exist_ok=True)
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"
    written = []
    for path in sorted(NOTEBOOKS.glob("0*.ipynb")):
        runs_for = scratch / ("own" if path.name.startswith(OWN_SELECTION) else "main")
        executed = scratch / path.name
        papermill.execute_notebook(str(path), str(executed), cwd=str(NOTEBOOKS), progress_bar=False,
                                   parameters={"RUNS": str(runs_for)})
        notebook = nbformat.read(executed, as_version=4)
        _plotly_as_html(notebook)
        body, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
        page = out / f"{path.stem}.html"
        page.write_text(body.replace("</head>", f'<script src="{plotly_js}"></script>\n</head>', 1))
        written.append(page)
        print(f"wrote {page}")
    shutil.rmtree(scratch)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="the main job's runs folder (make run writes runs/)")
    parser.add_argument("--out", default="docs/notebooks")
    parser.add_argument("--plotly-js", default="../../figures/plotly.min.js",
                        help="plotly.min.js as the pages find it (default: the repository's figures/ copy)")
    arguments = parser.parse_args()
    render(Path(arguments.runs), Path(arguments.out), arguments.plotly_js)
