"""The README and the documentation site: result blocks generated from a run's report, a strict offline build,
and pages that render their figures in a headless browser without a console error."""

import asyncio
import base64
import functools
import hashlib
import http.server
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN_REPORT = ROOT / "runs" / "smollm2-135m-refusal" / "report.json"
# History that belongs in git log, not in prose ("[ ]" keeps a plain grep for these phrases from finding this line).
HISTORY = re.compile(r"issue[ ][0-9]+|previous[ ]release|no GPU was[ ]lent|earlier (run|session)|Measured 20[0-9]{2}-",
                     re.IGNORECASE)


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_results", ROOT / "docs" / "gen_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval written out independently of the package (z = 1.959964)."""
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(k: int, n: int) -> dict:
    low, high = _wilson(k, n)
    return {"rate": round(k / n, 4), "ci_low": round(low, 4), "ci_high": round(high, 4), "refused": k, "n": n}


def synthetic_report(*, ablated: int = 38) -> dict:
    """A report.json with the keys the main job writes (counts over n = 75 harmful / 96 harmless test prompts)."""
    return {
        "model": {"spec": "organism-x"},
        "config": {"max_new_tokens": 48, "filter_by_refusal": True},
        "data": {split: {"n_harmful": h, "n_harmless": b, "before_filter": {"n_harmful": h + 3, "n_harmless": b + 2}}
                 for split, h, b in (("train", 90, 120), ("val", 24, 24), ("test", 75, 96))},
        "cohens_d_peak": {"pos": -1, "layer": 7, "d": 2.5}, "cohens_d_selected": 2.25,
        "split_half_cosine_selected": 0.97,
        "selected": {"pos": -2, "layer": 11, "bypass": -1.5, "induce": 4.25, "kl": 0.3, "bootstrap_win_rate": 0.9,
                     "how": "fallback lowest-kl: lowest KL among candidates with bypass < 0 and induce >= min"},
        "kl_random_directions": {"n": 16, "median": 0.12, "min": 0.03, "max": 1.5, "share_below_0.1": 0.375},
        "refusal_rate": {"harmful_baseline": round(73 / 75, 4), "harmful_ablated": round(ablated / 75, 4),
                         "harmful_subtracted": 0.0, "harmless_baseline": round(6 / 96, 4),
                         "harmless_added": round(92 / 96, 4)},
        "n_test": {"harmful": 75, "harmless": 96},
        "kl_ablation_harmless_mean": 0.45,
        "ce_harmless_replies": {"baseline": 0.6, "ablated": 0.75, "subtracted": 1.0, "added": 1.25, "n_replies": 90},
        "orthogonalized_vs_hooks_max_logit_diff": 2e-4,
        "capability": {"table": [{"task": "mc", "condition": "baseline", "acc": 0.75, "acc_stderr": 0.05}],
                       "skipped": {}},
        "alpha_sweep": {"alpha": [0.0, 1.0], "refusal_score": [4.0, -2.0]},
        "seconds": {"filter": 30.0, "extraction": 90.0, "selection": 1500.0, "interventions": 420.0},
        "over_refusal": {
            "threshold": 0.1, "ran": True, "look_risky_val_refusal": {"rate": 0.1842, "refused": 14, "n": 76},
            "selected": {"pos": -1, "layer": 9, "lambda": 1.0},
            "holdout": {"split": "holdout",
                        "refusal_rate": {"look_risky": {"baseline": _rate(46, 168), "ablated": _rate(17, 168)},
                                         "harmful_all": {"baseline": _rate(53, 56), "ablated": _rate(48, 56)},
                                         "harmless": {"baseline": _rate(2, 48), "ablated": _rate(0, 48)}},
                        "kl_harmless": {"mean": 0.13, "null": {"n": 16, "median": 0.09, "min": 0.03, "max": 1.2}},
                        "acceptance": {"look_risky_halved": True, "harmful_kept_90pct": True}}},
    }


@pytest.fixture
def tree(tmp_path):
    """A copy of the files that hold generated blocks."""
    for rel in gen.blocks(synthetic_report(), json.loads(gen.BEHAVIOUR.read_text())):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def test_result_blocks_are_regenerated_from_a_report_and_the_check_catches_a_changed_number(tree):
    behaviour = json.loads(gen.BEHAVIOUR.read_text())
    report = synthetic_report()
    for path, text in gen.render(report, behaviour, tree).items():
        path.write_text(text)
    assert gen.stale(report, behaviour, tree) == []
    readme = (tree / "README.md").read_text()
    box = readme.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    low, high = _wilson(38, 75)
    assert f"| harmful, direction ablated at every layer | 50.7% [{100 * low:.1f}, {100 * high:.1f}] (38/75) |" in box
    assert "| harmful, direction subtracted at layer 11 | 0.0% [0.0, " in box
    assert "position −2, layer 11" in box and "`organism-x`" in box
    # the verdict follows the numbers: ablation that halves refusal does not replicate; removal does
    assert "**What does not:** ablating it at every layer" in box and "97.3% to 50.7%" in box
    assert f"{0.3 / 0.12:.1f}× the median of random directions" in box
    removed = synthetic_report(ablated=1)
    assert gen.stale(removed, behaviour, tree) == ["README.md", "docs/index.md", "docs/results.md"]
    assert "ablating it at every layer removes refusal (97.3% → 1.3%)" in gen.verdict(removed)


def test_check_exits_nonzero_when_the_readme_differs_from_the_report(tree, tmp_path, monkeypatch, capsys):
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(synthetic_report()))
    monkeypatch.setattr(gen, "ROOT", tree)
    assert gen.main(["--report", str(report_path)]) == 0
    (tree / "docs" / "notebooks").mkdir(parents=True, exist_ok=True)  # the executed copies record the run's report
    copy = {"cells": [], "metadata": {"refusal_lens": {"report_sha256": _sha256(report_path)}}}
    (tree / "docs" / "notebooks" / "03_intervene.ipynb").write_text(json.dumps(copy))
    assert gen.main(["--report", str(report_path), "--check"]) == 0
    report_path.write_text(json.dumps(synthetic_report(ablated=37)))
    copy["metadata"]["refusal_lens"]["report_sha256"] = _sha256(report_path)
    (tree / "docs" / "notebooks" / "03_intervene.ipynb").write_text(json.dumps(copy))
    assert gen.main(["--report", str(report_path), "--check"]) == 1
    assert "README.md" in capsys.readouterr().err
    # another run than the one the committed pages come from (a user's own `make run`) is not compared
    report_path.write_text(json.dumps(synthetic_report(ablated=36)))
    assert gen.main(["--report", str(report_path), "--check"]) == 0
    assert "not compared" in capsys.readouterr().out
    assert gen.main(["--report", str(tmp_path / "absent.json")]) == 2


def test_a_rate_that_is_no_whole_count_and_a_missing_entry_are_named():
    report = synthetic_report()
    report["refusal_rate"]["harmful_ablated"] = 0.5  # 37.5 of 75 prompts
    with pytest.raises(gen.ReportError, match="not a whole count of n = 75"):
        gen.results_box(report)
    del report["refusal_rate"]
    with pytest.raises(gen.ReportError, match="no refusal_rate: regenerate it with `make run`"):
        gen.results_box(report)
    with pytest.raises(gen.ReportError, match="exactly one '<!-- results:begin -->'"):
        gen.replace_block("no markers here", "results", "x")


@pytest.mark.skipif(not MAIN_REPORT.exists(), reason=f"no {MAIN_REPORT.relative_to(ROOT)}: `make run` writes it")
def test_readme_and_pages_equal_the_main_jobs_report():
    if not gen.committed_run(MAIN_REPORT):
        pytest.skip(f"{MAIN_REPORT.relative_to(ROOT)} is another run than the committed pages' (a user's `make run`)")
    report, behaviour = gen.load_report(MAIN_REPORT), json.loads(gen.BEHAVIOUR.read_text())
    assert gen.stale(report, behaviour) == [], "run `python docs/gen_results.py` and commit README.md and docs/"


def test_organism_table_equals_its_behaviour_report():
    behaviour = json.loads(gen.BEHAVIOUR.read_text())
    page = (ROOT / "docs" / "models.md").read_text()
    block = page.split("<!-- organism:begin -->\n")[1].split("\n<!-- organism:end -->")[0]
    assert block == gen.organism_table(behaviour)
    n, rate = behaviour["n"]["advbench"], behaviour["refusal_rate"]["advbench"]
    low, high = _wilson(round(rate * n), n)
    assert f"{100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}] ({round(rate * n)}/{n})" in block


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run " in readme and "make test " in readme
    for stem, _, _ in gen.NOTEBOOKS:
        assert f"[`{stem}`](docs/notebooks/{stem}.ipynb)" in readme
    executed = list((ROOT / "docs" / "notebooks").glob("*.ipynb"))
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        if link.startswith("docs/notebooks/") and link.endswith(".ipynb") and not executed:
            continue  # `make report` writes the executed copies; the notebooks' own test requires them
        assert (ROOT / link).exists(), f"README links {link}, which does not exist"


def test_no_history_in_readme_docs_package_or_tests():
    """What the code does and why; git log holds what was measured when. Files the lead cleans are listed."""
    pending: set[str] = set()
    paths = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").glob("*.py"),
             *(p for p in (ROOT / "refusal_lens").rglob("*") if p.suffix in {".py", ".md", ".txt", ".yaml"}
               and p.name not in pending),
             *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in paths
            for i, line in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "\n".join(hits)


# ---------------------------------------------------------------------------------------------------------------
# the built site


def _fake_executed_notebook(path: Path) -> None:
    """A small executed notebook with a PNG output, for a tree where `make report` has not run yet."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    png = base64.b64encode((ROOT / "figures" / "refusal_rates.png").read_bytes()).decode()
    cell = new_code_cell("rl.plots.refusal_rates(report)", execution_count=1,
                         outputs=[new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})])
    nbformat.write(new_notebook(cells=[new_markdown_cell("# A notebook\n\nIts figure:"), cell]), path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built with ``mkdocs build --strict`` from a copy of the repository's docs (plus one small
    executed notebook when docs/notebooks/ holds none), as ``(site folder, pages of notebooks with a PNG figure)``."""
    root = tmp_path_factory.mktemp("docs-build")
    shutil.copytree(ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    for name in ("refusal_lens", "figures", "BENCHMARKS.md"):
        (root / name).symlink_to(ROOT / name)
    notebooks = root / "docs" / "notebooks"
    if not list(notebooks.glob("*.ipynb")):
        notebooks.mkdir(exist_ok=True)
        _fake_executed_notebook(notebooks / "00_fake.ipynb")
    out = root / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=600, env={**_env(), "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    with_figures = [p for p in sorted(notebooks.glob("*.ipynb")) if '"image/png"' in p.read_text()]
    return out, [f"notebooks/{p.stem}/" for p in with_figures]


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_site_builds_strict_with_every_page(site):
    out, notebook_pages = site
    assert notebook_pages, "no executed notebook with a PNG figure in docs/notebooks/"
    for page in ("", "results/", "paper/", "models/", "gpu/", "frontier/", "notebooks/", "benchmarks/", "data/",
                 "architecture/", "api/", *notebook_pages):
        assert (out / page / "index.html").is_file(), page
    executed = sorted(p.stem for p in (ROOT / "docs" / "notebooks").glob("*.ipynb"))
    assert all((out / "notebooks" / stem / "index.html").is_file() for stem in executed)
    api = (out / "api" / "index.html").read_text()
    assert 'id="refusal_lens.stats.wilson_ci"' in api and 'id="refusal_lens.load_model"' in api
    assert (out / "figures" / "refusal_rates.png").stat().st_size > 0


CHECK = """JSON.stringify({
  plotly: document.querySelectorAll('.js-plotly-plot .main-svg').length,
  images: Array.from(document.images).map(i => ({src: (i.getAttribute('src') || '').slice(0, 60),
                                                 loaded: i.complete && i.naturalWidth > 0}))})"""


async def _visit(url: str) -> tuple[dict, list[str]]:
    """Open ``url`` in headless Chromium over CDP: what it rendered, and every console error, uncaught exception,
    error log entry and failed request."""
    import choreographer

    problems: list[str] = []

    async def console(message):
        if message["params"].get("type") in ("error", "assert"):
            problems.append(f"console: {[a.get('value', a.get('description')) for a in message['params']['args']]}")

    async def exception(message):
        details = message["params"]["exceptionDetails"]
        problems.append(f"exception: {details.get('exception', {}).get('description', details['text'])}")

    async def log(message):
        if message["params"]["entry"]["level"] == "error":
            entry = message["params"]["entry"]
            problems.append(f"log: {entry['text']} {entry.get('url', '')}")

    async with choreographer.Browser(path=shutil.which("chromium"), headless=True) as browser:
        tab = await browser.create_tab("")
        tab.subscribe("Runtime.consoleAPICalled", console)
        tab.subscribe("Runtime.exceptionThrown", exception)
        tab.subscribe("Log.entryAdded", log)
        for domain in ("Runtime", "Log", "Page"):
            await tab.send_command(f"{domain}.enable")
        loaded = tab.subscribe_once("Page.loadEventFired")
        await tab.send_command("Page.navigate", params={"url": url})
        await asyncio.wait_for(loaded, 60)
        await asyncio.sleep(1)  # plotly draws after load
        result = await tab.send_command("Runtime.evaluate", params={"expression": CHECK, "returnByValue": True})
    return json.loads(result["result"]["result"]["value"]), problems


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on localhost, as its base URL."""
    out, _ = site
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (the Makefile installs it "
                                                             "for kaleido: apt-get install chromium)")
def test_front_page_and_a_notebook_page_render_their_figures_without_console_errors(site, served):
    _, notebook_pages = site
    for page in ("", notebook_pages[0]):
        rendered, problems = asyncio.run(_visit(served + page))
        assert not problems, (page, problems)
        figures = rendered["plotly"] + sum(image["loaded"] for image in rendered["images"]
                                           if image["src"].startswith(("data:image/png", "figures/", "../")))
        assert figures > 0, (page, rendered)
        assert all(image["loaded"] for image in rendered["images"]), (page, rendered["images"])


def test_load_report_adds_the_over_refusal_study_written_beside_it(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"seconds": {"selection": 1.0}}))
    assert "over_refusal" not in gen.load_report(tmp_path / "report.json")
    (tmp_path / "over_refusal.json").write_text(json.dumps({"ran": False}))
    assert gen.load_report(tmp_path / "report.json") == {"seconds": {"selection": 1.0}, "over_refusal": {"ran": False}}
    # a study made against another direction than the run's is refused, not mixed into the run's pages
    (tmp_path / "report.json").write_text(json.dumps({"selected": {"layer": 21, "pos": -1}}))
    (tmp_path / "over_refusal.json").write_text(json.dumps({"refusal_direction": {"layer": 16, "pos": -1}}))
    with pytest.raises(gen.ReportError, match="layer 16, position -1, not the run's: rerun `make over-refusal`"):
        gen.load_report(tmp_path / "report.json")


def _frontier_record(*, harmful: int, kl: float, by_rule: bool = True) -> dict:
    """A finished frontier.json (the keys `refusal-lens frontier` writes) whose chosen point refuses ``harmful`` of
    75 harmful test prompts at harmless test KL ``kl``."""
    kernel = {"peak_weight": 1.0, "peak_position": 15.5, "floor_weight": 0.25, "width": 4.0}
    return {"model": "organism-x", "seed": 0, "n_trials": 60, "n_front": 7, "status": "done",
            "rule": "lowest val KL among ...", "rule_params": {"metric": "judge", "max_refusal": 0.1},
            "data": {"harmful_val": {"n": 24}, "harmless_val": {"n": 24}}, "seconds": 1500.0, "seconds_search": 1200.0,
            "random_direction_kl": {"median": 0.12},
            "chosen": {"trial": 41, "by_rule": by_rule,
                       "profile": {"position": -1, "direction_index": 16.25, "embed_weight": 0.5,
                                   "edit": "norm-preserving", "orthogonalize": True, "attn": kernel, "mlp": kernel},
                       "val": {"val_kl": 0.2, "val_refusal_rate": 0.0833},
                       "test": {"harmful_refusal_rate": round(harmful / 75, 4), "n_harmful": 75,
                                "harmless_refusal_rate": round(3 / 96, 4), "n_harmless": 96, "harmless_kl": kl,
                                "ce_reply_tokens_unmodified": 0.5, "ce_reply_tokens": 0.75}}}


def test_the_frontier_and_the_strongest_candidate_reach_the_box_the_page_and_the_map(tree):
    report = synthetic_report()
    assert gen.frontier_sentence(report) is None and gen.strongest_candidate(report) is None
    report["selection_table"] = [{"pos": -1.0, "layer": 16.0, "bypass": -5.25, "kl": 0.9},
                                 {"pos": -1.0, "layer": 21.0, "bypass": -1.5, "kl": 0.3},
                                 {"pos": -2.0, "layer": 3.0, "bypass": None, "kl": None}]
    report["selected"]["baseline_scores"] = {"harmful": 5.25}
    assert "(position −1, layer 16: 5.25 → −5.25 on `val`) costs 0.90 nats of KL, 7.5× the random" in \
        gen.strongest_candidate(report)
    report["frontier"] = _frontier_record(harmful=3, kl=0.24)
    low, high = _wilson(3, 75)
    sentence = gen.frontier_sentence(report)
    assert "over 60 per-layer ablation profiles" in sentence and "the point its rule picks" in sentence
    assert f"4.0% [{100 * low:.1f}, {100 * high:.1f}] (3/75) at a harmless KL of 0.24 nats (2.0×" in sentence
    report["frontier"]["reference"] = {
        "position": -1, "layer": 16, "val": {"val_kl": 0.85, "val_refusal_rate": 0.0},
        "test": report["frontier"]["chosen"]["test"] | {"harmful_refusal_rate": 0.0, "harmless_kl": 0.96,
                                                       "capability_edited": {"mc": 0.5}}}
    assert "The strongest single candidate (position −1, layer 16) ablated at every layer gives harmful refusal " \
           "on test 0.0% [0.0, " in gen.frontier_sentence(report)
    page = gen.frontier_page(report)
    assert "| frontier, trial 41 | 0.200 | 8.3% | 4.0% " in page and "0.50 → 0.75 |" in page
    assert "| paper candidate (position −1, layer 16), full ablation | 0.850 | 0.0% | 0.0% " in page
    assert "the candidate ablated everywhere `mc` 0.500" in page
    assert "harmful refusal ≤ 10.0% at harmless KL ≤ 0.43: met." in page
    assert "peak 1.00 at layer 15.5, falling to 0.25 within 4.0 layers" in page
    # heretic's points: the same rule picks among them; none meeting it is said
    report["heretic"] = {"heretic": "1.4.0 2.13.0", "n_trials": 40, "n_startup_trials": 12, "seed": 0,
                         "wall_s": 600.0, "prompts_token_identical": True, "points": [
                             {"trial": 7, "val_kl": 0.5, "val_refusal_rate": 0.25, "test": report["frontier"][
                                 "chosen"]["test"] | {"harmful_refusal_rate": round(30 / 75, 4), "harmless_kl": 0.6}},
                             {"trial": 9, "val_kl": 0.1, "val_refusal_rate": 0.5, "test": report["frontier"][
                                 "chosen"]["test"]}]}
    assert "heretic (40 trials" in gen.frontier_sentence(report)
    assert "lowest judged val refusal (none meets the rule) gives harmful refusal on test 40.0%" in \
        gen.frontier_sentence(report)
    assert "| heretic, trial 7 | 0.500 | 25.0% | 40.0% " in gen.frontier_page(report)
    assert "is met by heretic's saved trial 9, which the val rule did not pick" in gen.frontier_page(report)
    report["heretic"]["data"] = {"harmful_val": {"n": 24}}
    report["heretic"]["trials"] = [{"refusals": r, "kl_divergence": kl, "params": {"direction_scope": scope}}
                                   for r, kl, scope in ((3, 0.2, "global"), (1, 0.5, "global"), (1, 0.25, "global"),
                                                        (0, 0.05, "per layer"), (None, None, "per layer"))]
    assert "`global` (3 trials): 1/24 refusals at its KL 0.250; `per layer` (1 trials): 0/24 refusals at its KL " \
           "0.050." in gen.frontier_page(report)
    # a chosen point that misses the goal, and a rule that was not met, are said so
    report["frontier"] = _frontier_record(harmful=30, kl=0.6, by_rule=False)
    assert "not met; the front (the figure below) is the result." in gen.frontier_page(report)
    assert "no front point reaches judged val refusal ≤ 10.0%" in gen.frontier_sentence(report)
    assert "rule not met; closest point: harmful refusal 40.0% on test at KL 0.60 (5.0× random) after 60 trials" in \
        gen.notebook_map(report, prefix="")
    for path, text in gen.render(report, json.loads(gen.BEHAVIOUR.read_text()), tree).items():
        path.write_text(text)
    assert "over 60 per-layer ablation profiles" in (tree / "README.md").read_text()
    assert "| frontier, trial 41 |" in (tree / "docs" / "frontier.md").read_text()


def test_load_report_adds_the_selection_table_and_the_frontier_written_beside_it(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"seconds": {}}))
    (tmp_path / "selection.csv").write_text("pos,layer,bypass,kl,reason\n-1,16,-5.5,0.85,KL > 0.1\n-2,3,,,zero\n")
    (tmp_path / "frontier").mkdir()
    (tmp_path / "frontier" / "frontier.json").write_text(json.dumps({"status": "searching"}))
    report = gen.load_report(tmp_path / "report.json")
    assert report["selection_table"] == [{"pos": -1.0, "layer": 16.0, "bypass": -5.5, "kl": 0.85, "reason": "KL > 0.1"},
                                         {"pos": -2.0, "layer": 3.0, "bypass": None, "kl": None, "reason": "zero"}]
    assert report["frontier"] == {"status": "searching"} and "heretic" not in report


def test_a_notebook_answer_is_read_from_what_its_executed_copy_prints(tmp_path):
    stdout = {"output_type": "stream", "name": "stdout",
              "text": ["29 layers' directions at position -1: effective rank 22.38; 13 dimensions hold 90% of their\n"]}
    (tmp_path / "06_subspace.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [stdout]}]}))
    assert gen.printed_answer("06_subspace", tmp_path) == \
        "the layers' directions have effective rank 22.38; 13 dimensions hold 90% of their norm"
    assert gen.printed_answer("05_base_vs_chat", tmp_path) is None  # no executed copy yet
    stdout["text"] = ["something else\n"]
    (tmp_path / "06_subspace.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [stdout]}]}))
    with pytest.raises(gen.ReportError, match="does not print what"):
        gen.printed_answer("06_subspace", tmp_path)
