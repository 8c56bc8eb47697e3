"""Figures: each plot function draws what its table holds, and save() writes what it says."""


import numpy as np
import pandas as pd
import pytest

from refusal_lens import plots


def cohens_table():
    rows = [{"pos": p, "layer": l, "d": l / 2, "ci_low": l / 2 - 0.1, "ci_high": l / 2 + 0.1, "valid": l > 0}
            for p in (-2, -1) for l in range(4)]
    return pd.DataFrame(rows)


def test_figures_carry_their_data_and_axis_titles():
    fig = plots.cohens_d(cohens_table())
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["pos -2", "pos -1"]
    np.testing.assert_allclose(lines[1].y, [0.5, 1.0, 1.5])  # invalid layer 0 is not drawn
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text

    selection = pd.DataFrame({"pos": [-1, -1, -2], "layer": [1, 2, 1], "bypass": [-1.0, -2.0, 0.5],
                              "induce": [0.5, 1.0, -1.0], "kl": [0.05, 0.2, 1.0], "scored": [True, True, True]})
    fig = plots.selection_scores(selection)
    assert len(fig.data) == 6 and {t.name for t in fig.data} == {"pos -1", "pos -2"}

    rates = {"harmful_baseline": 0.9, "harmful_ablated": 0.1, "harmless_baseline": 0.0, "harmless_added": 0.8}
    fig = plots.refusal_rates(rates)
    np.testing.assert_allclose(fig.data[1].y, [10, 80])

    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "difference": [1.0, -2.0, 0.5, 3.0]})
    fig = plots.head_grid(heads)
    np.testing.assert_allclose(fig.data[0].z, [[1.0, -2.0], [0.5, 3.0]])

    curves = {"a": pd.DataFrame({"k": [0, 1, 2], "refusal_rate": [1.0, 0.2, 0.1]})}
    assert list(plots.refusal_vs_rank(curves).data[0].y) == [100, 20, 10]


def test_save_writes_html_and_png(tmp_path):
    fig = plots.cohens_d(cohens_table())
    written = plots.save(fig, "d", tmp_path, static=False)
    assert written == [tmp_path / "d.html"] and (tmp_path / "plotly.min.js").exists()
    first = written[0].read_bytes()
    plots.save(fig, "d", tmp_path, static=False)
    assert written[0].read_bytes() == first  # a rerun leaves committed figures unchanged
    if not plots._chrome():
        pytest.skip("no Chromium on this machine: static export is covered where `make` could install it")
    written = plots.save(fig, "d", tmp_path)
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
