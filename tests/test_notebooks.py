"""Notebooks under parameters other than nbval's defaults: the paths nbval never takes."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_select_notebook_says_why_when_no_candidate_passes(tmp_path):
    """With the paper's rule and nothing passing, notebook 02 reports the closest candidates instead of crashing,
    and records no selection for notebooks 03-07."""
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "02.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "02_select.ipynb"), str(out), cwd=str(NOTEBOOKS), progress_bar=False,
        parameters=dict(MODEL="smollm2-135m-instruct", DEVICE="cpu", RUNS=str(tmp_path), FILTER=False, N_TRAIN=8,
                        N_VAL=4, KL_MAX=1e-9, FALLBACK=None))
    outputs = [o for cell in json.loads(out.read_text())["cells"] for o in cell.get("outputs", [])]
    text = "".join("".join(o["text"]) if isinstance(o.get("text"), list) else o.get("text", "") for o in outputs)
    assert "no candidate passed the paper's filters" in text and "lowest-kl" in text
    assert "a candidate was selected: False" in text
    assert not (tmp_path / "smollm2-135m-instruct" / "selected.json").exists()
