"""Notebooks under parameters other than nbval's defaults, and their executed copies in docs/notebooks/."""

import base64
import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COPIES = ROOT / "docs" / "notebooks"
INJECTED = "injected-parameters"  # papermill's tag on the cell it adds after the parameters cell


def _execute_script():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _execute_script()
SOURCES = execute.notebooks()


def _code(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells
            if cell.cell_type == "code" and INJECTED not in cell.metadata.get("tags", [])]


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


def test_every_notebook_has_full_size_parameters_that_it_declares():
    """execute.FULL_SIZE names only notebooks that exist and parameters their parameters cell defines."""
    stems = {path.stem: path for path in SOURCES}
    unknown = set(execute.FULL_SIZE) - set(stems)
    assert not unknown, f"FULL_SIZE names notebooks that do not exist: {unknown}"
    for stem, parameters in execute.FULL_SIZE.items():
        notebook = nbformat.read(stems[stem], as_version=4)
        cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        declared = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line.split("#")[0]}
        assert set(parameters) <= declared, f"{stem}: {set(parameters) - declared} not in its parameters cell"


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_executed_copy_runs_the_source_code_at_full_size(source):
    """docs/notebooks/NN_*.ipynb is the source notebook executed by `make report`: the same code (papermill's
    injected parameters aside), run with execute.FULL_SIZE on the main job's run, every cell executed, figures as
    PNGs, at most 2 MB."""
    if not any(COPIES.glob("*.ipynb")):
        pytest.skip("docs/notebooks/ holds no executed copies yet: `make report` (after `make run`) writes them; "
                    "once one is committed, every notebook needs its copy")
    copy = COPIES / source.name
    assert copy.exists(), (f"{copy.relative_to(ROOT)} is missing: run `make report` (after `make run`) to execute "
                           "the notebooks into docs/notebooks/ and commit them")
    executed = nbformat.read(copy, as_version=4)
    assert _code(executed) == _code(nbformat.read(source, as_version=4)), (
        f"{source.relative_to(ROOT)} changed since {copy.relative_to(ROOT)} was executed: run `make report` and "
        "commit docs/notebooks/")
    parameters = dict(executed.metadata["papermill"]["parameters"])
    assert parameters.pop("RUNS").startswith("../runs/report/"), "not executed on a copy of the main job's run"
    assert parameters == execute.FULL_SIZE.get(source.stem, {}), f"{copy.name} is not at full size: run make report"
    assert executed.metadata["refusal_lens"]["run"].startswith("runs/")
    code = [c for c in executed.cells if c.cell_type == "code" and INJECTED not in c.metadata.get("tags", [])]
    assert all(c.execution_count is not None for c in code), "a cell did not run: run make report"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{copy.name} holds an error output"
    assert not [o for o in outputs if execute.PLOTLY_MIME in o.get("data", {})], "Plotly JSON left in the copy"
    for output in (o for o in outputs if "image/png" in o.get("data", {})):
        assert base64.b64decode(output.data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    for cell in (c for c in code if c.source.strip().splitlines()[-1].strip() == "fig"):  # cells that show a figure
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{copy.name}: a figure has no PNG"
    assert copy.stat().st_size <= execute.MAX_BYTES


def test_no_executed_copy_without_its_notebook():
    orphans = {p.name for p in COPIES.glob("*.ipynb")} - {p.name for p in SOURCES}
    assert not orphans, f"docs/notebooks/ holds copies of notebooks that no longer exist: {sorted(orphans)}"


def test_execute_runs_a_notebook_on_a_copy_of_the_main_run_and_leaves_the_run_alone(tmp_path):
    """execute() gives the notebook a scratch copy of runs/<model>/ as RUNS, records its parameters and the run's
    report hash, and leaves the main run's files as they were (a notebook that writes there writes to the copy)."""
    runs, out, folder = tmp_path / "runs", tmp_path / "out", tmp_path / "notebooks"
    (runs / "m").mkdir(parents=True)
    (runs / "m" / "report.json").write_text('{"refusal_rate": {}}')
    (runs / "m" / "selected.json").write_text('{"pos": -1, "layer": 3}')
    folder.mkdir()
    kernel = nbformat.read(SOURCES[0], as_version=4).metadata["kernelspec"]
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": kernel}, cells=[
        nbformat.v4.new_code_cell('RUNS = "nowhere"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import json, pathlib\n"
                                  "selected = pathlib.Path(RUNS) / 'm' / 'selected.json'\n"
                                  "print(json.loads(selected.read_text())['layer'])\n"
                                  "selected.write_text('{\"pos\": -1, \"layer\": 9}')  # as notebook 02 does")])
    nbformat.write(notebook, folder / "99_probe.ipynb")
    copy = execute.execute(folder / "99_probe.ipynb", runs, out, model="m")
    executed = nbformat.read(copy, as_version=4)
    assert executed.cells[-1].outputs[0].text == "3\n"  # it read the main run's selection, through the copy
    assert json.loads((runs / "m" / "selected.json").read_text())["layer"] == 3  # the main run is untouched
    assert executed.metadata["papermill"]["parameters"]["RUNS"] == "../runs/report/99_probe"
    assert executed.metadata["refusal_lens"]["report_sha256"] == execute._sha256(runs / "m" / "report.json")
    assert _code(executed) == _code(notebook)
    assert not (runs / "report" / "99_probe").exists()  # the scratch copy is gone


def test_static_copy_has_png_figures_and_last_progress_state():
    """make_static turns a Plotly output into a PNG of the figure's size and keeps a progress bar's last state."""
    from refusal_lens import plots

    if not plots._chrome():
        pytest.skip("no Chromium on this machine: static export is covered where `make` could install it")
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout=dict(width=400, height=300))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("fig", outputs=[
        nbformat.v4.new_output("display_data", data={execute.PLOTLY_MIME: json.loads(fig.to_json()),
                                                     "text/plain": "Figure()"}),
        nbformat.v4.new_output("stream", name="stderr", text="bar:  10%\rbar:  50%\rbar: 100%\nbar: 100%\n\ndone\n")])])
    execute.make_static(notebook)
    display, stream = notebook.cells[0].outputs
    assert execute.PLOTLY_MIME not in display.data and display.metadata["image/png"] == {"width": 400, "height": 300}
    png = base64.b64decode(display.data["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 400 * execute.PNG_SCALE  # the PNG header's width
    assert stream.text == "bar: 100%\ndone\n"
