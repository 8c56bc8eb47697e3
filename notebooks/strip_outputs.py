"""Strip notebook outputs before committing, keeping only what nbval checks.

Cells that start with ``# NBVAL_CHECK_OUTPUT`` keep their printed output (and an
execution count: nbval refuses a reference cell with outputs that never ran);
every other cell loses outputs and execution counts. Usage, from the repository root::

    jupyter nbconvert --to notebook --execute --inplace notebooks/0*.ipynb
    python notebooks/strip_outputs.py notebooks/0*.ipynb
"""

from __future__ import annotations

import sys

import nbformat

CHECKED = "# NBVAL_CHECK_OUTPUT"


def strip(path: str) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if cell.source.lstrip().startswith(CHECKED):
            cell.outputs = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"]
            cell.execution_count = cell.execution_count or 1
        else:
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, path)


if __name__ == "__main__":
    for notebook_path in sys.argv[1:]:
        strip(notebook_path)
