"""Execute every notebook at full size on the main job's run and write the executed copies (``make report``).

Each notebook ``notebooks/NN_*.ipynb`` runs under papermill with the parameters of :data:`FULL_SIZE` (the sizes
of the main job, ``refusal-lens run``) against a scratch copy of the main job's run folder
(``runs/report/NN_*/<model>/``), so notebooks 03 onwards read the main job's direction and selection, and what
01 and 02 write (their own candidates and pick) never reaches ``runs/<model>/`` or another notebook. The copy
goes to ``docs/notebooks/NN_*.ipynb`` with every Plotly figure as a static PNG (GitHub and the docs site render
it; no plotly.js bundle, so each file stays small) and progress bars reduced to their last state.
``tests/test_notebooks.py`` checks that every copy's code equals its source's. Usage, from the repository root,
after ``make run``::

    python notebooks/execute.py --runs runs --out docs/notebooks [--only 03_intervene] [--figures figures]

With ``--figures figures`` the figures of the notebooks in :data:`FIGURE_NOTEBOOKS` (those the main job does not
draw) are copied into the repository's ``figures/`` as well.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import time
from pathlib import Path

import nbformat
import papermill
import plotly.graph_objects as go

NOTEBOOKS = Path(__file__).resolve().parent
MODEL = "smollm2-135m-refusal"  # the main job's default model, whose run the copies read
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PNG_SCALE = 2  # pixels per layout pixel: sharp on high-density screens; displayed at the layout's width
MAX_BYTES = 2_000_000  # the most an executed copy may weigh (GitHub renders it inline)

# The parameters each notebook runs with in its executed copy: the main job's sizes (RunConfig and
# OverRefusalConfig defaults) where the notebook repeats a step of the main job, and the sizes of the committed
# figures otherwise. A notebook without an entry runs at its own defaults. ``None`` means the whole split.
FULL_SIZE: dict[str, dict] = {
    "00_quickstart": {"N_TRAIN": None, "N_TEST": None, "MAX_NEW_TOKENS": 48},
    "01_extract": {"N_TRAIN": None, "N_EVAL": None, "N_BOOT": 1000},
    "02_select": {"N_VAL": 24, "POSITIONS": None, "N_NULL": 16},
    "03_intervene": {"N_TEST": None, "MAX_NEW_TOKENS": 48, "LONG_NEW_TOKENS": 64, "N_ALPHA": 32,
                     "ALPHAS": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5]},
    "04_heads": {"N_PROMPTS": 96, "GCG_PROMPTS": 4, "GCG_STEPS": 30, "GCG_WIDTH": 32, "GCG_TOKENS": 12,
                 "N_RANDOM": 5, "MAX_NEW_TOKENS": 48},
    "05_base_vs_chat": {"N_TRAIN": 100, "N_TEST": 48, "MAX_NEW_TOKENS": 48},
    "06_subspace": {"K_MAX": 8, "N_TEST": 32, "MAX_NEW_TOKENS": 32},
    "07_over_refusal": {"N_VAL": None, "N_TEST": None, "PICK": None, "N_NULL": 16, "MAX_NEW_TOKENS": 48,
                        "ALPHA_GRID": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0], "FALSE_REFUSAL_ALPHAS": [0.5]},
    # A small search to show the machinery; the notebook ends with the full run's front (`make frontier`).
    "08_frontier": {"N_TRIALS": 12, "N_VAL": 12, "N_TEST": 24, "N_MEAN": 64, "JUDGE_TOKENS": 16,
                    "MAX_NEW_TOKENS": 32, "N_NULL": 8},
}


# Notebooks whose saved figures belong in the committed figures/ (the main job draws the others' figures itself).
FIGURE_NOTEBOOKS = ("04_heads", "05_base_vs_chat", "06_subspace", "07_over_refusal")


def notebooks() -> list[Path]:
    """The numbered notebooks, in order (``NN_*.ipynb``)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _png(figure: dict) -> tuple[str, dict]:
    """A Plotly figure (its JSON) as a base64 PNG and the display size, in layout pixels."""
    fig = go.Figure(data=figure.get("data"), layout=figure.get("layout"))
    width, height = fig.layout.width or 700, fig.layout.height or 450
    image = fig.to_image(format="png", width=width, height=height, scale=PNG_SCALE)
    return base64.b64encode(image).decode("ascii"), {"width": width, "height": height}


def _last_state(text: str) -> str:
    """A stream as a terminal shows it at the end: each line after its last carriage return (tqdm bars)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def make_static(notebook: nbformat.NotebookNode) -> None:
    """Plotly outputs become PNG images; widget outputs keep their text; streams keep their last state."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data:
                png, size = _png(data.pop(PLOTLY_MIME))
                data.pop("text/html", None)
                data["image/png"] = png
                output.setdefault("metadata", {})["image/png"] = size
            data.pop(WIDGET_MIME, None)
            if output.get("output_type") == "stream":
                text = _last_state(output["text"])
                if output.get("name") == "stderr":  # progress bars: no blank lines, a final state shown once
                    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
                    text = "".join(line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1])
                output["text"] = text
        cell.get("metadata", {}).pop("execution", None)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def execute(path: Path, runs: Path, out: Path, model: str = MODEL, figures: Path | None = None, *,
            full_size: bool = True) -> Path:
    """Run one notebook at full size on a scratch copy of ``runs/<model>`` and write its static copy to ``out``;
    ``figures``: a folder to copy the figures it saved into (HTML and PNG), for :data:`FIGURE_NOTEBOOKS`;
    ``full_size=False``: at the notebook's own (CI) sizes, a quick check of the machinery."""
    runs = runs.resolve()
    main = runs / model
    scratch = runs / "report" / path.stem
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(main, scratch / model, ignore=shutil.ignore_patterns("figures"))
    parameters = {"RUNS": os.path.relpath(scratch, path.parent), **(FULL_SIZE.get(path.stem, {}) if full_size else {})}
    executed = scratch / path.name
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"  # the kernel inherits it: figures arrive as JSON
    papermill.execute_notebook(str(path), str(executed), cwd=str(path.parent), parameters=parameters,
                               progress_bar=True)  # on failure the partial copy stays in the scratch folder
    notebook = nbformat.read(executed, as_version=4)
    make_static(notebook)
    notebook.metadata["papermill"].update(input_path=f"notebooks/{path.name}", output_path=f"{out}/{path.name}")
    notebook.metadata["refusal_lens"] = {"run": f"runs/{model}", "report_sha256": _sha256(main / "report.json")}
    out.mkdir(parents=True, exist_ok=True)
    target = out / path.name
    nbformat.write(notebook, target)
    saved = scratch / model / "figures"
    if figures is not None and path.stem in FIGURE_NOTEBOOKS and saved.exists():
        figures.mkdir(parents=True, exist_ok=True)
        for figure in saved.iterdir():
            shutil.copy2(figure, figures / figure.name)
    shutil.rmtree(scratch)
    size = target.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(f"{target} is {size:,} bytes, over the {MAX_BYTES:,} an executed copy may weigh: lower "
                           "PNG_SCALE or the number of figures it shows")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="the main job's runs folder (make run writes runs/)")
    parser.add_argument("--out", default="docs/notebooks")
    parser.add_argument("--model", default=MODEL, help="the model whose main-job run the notebooks read")
    parser.add_argument("--only", nargs="*", default=None, help="notebook names (e.g. 03_intervene); default: all")
    parser.add_argument("--ci-size", action="store_true",
                        help="run at the notebooks' own small sizes: a quick check, not copies to commit")
    parser.add_argument("--figures", default=None, type=Path,
                        help="copy the figures of notebooks 04-07 here (the repository's figures/)")
    arguments = parser.parse_args()
    runs, out = Path(arguments.runs).resolve(), Path(arguments.out)
    if not (runs / arguments.model / "report.json").exists():
        raise SystemExit(f"{runs / arguments.model / 'report.json'} does not exist: run `make run` first (the "
                         "executed notebooks read the main job's run)")
    out.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in notebooks() if arguments.only is None or p.stem in arguments.only]
    if arguments.only and len(chosen) != len(arguments.only):
        raise SystemExit(f"unknown notebook in {arguments.only}; the notebooks are {[p.stem for p in notebooks()]}")
    for path in chosen:
        started = time.perf_counter()
        target = execute(path, runs, out, arguments.model, arguments.figures, full_size=not arguments.ci_size)
        print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - started:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
