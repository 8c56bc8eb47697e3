"""Figures: each plot function draws what its table holds, and save() writes what it says."""


import math

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
    bars = {t.name.split()[0]: t for t in fig.data if t.type == "bar"}
    np.testing.assert_allclose(bars["baseline"].y, [90, 0])
    np.testing.assert_allclose(bars["ablated"].y, [10])

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


def wilson_reference(k: int, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval written out, with z typed in (not computed by the code under test)."""
    z = 1.959963984540054
    p = k / n
    centre = (2 * k + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(n * p * (1 - p) + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def test_refusal_rates_show_every_intervention_with_its_wilson_interval():
    rates = {"harmful_baseline": round(73 / 75, 4), "harmful_ablated": round(38 / 75, 4), "harmful_subtracted": 0.0,
             "harmless_baseline": round(6 / 96, 4), "harmless_added": round(92 / 96, 4)}
    n = {"harmful": 75, "harmless": 96}
    fig = plots.refusal_rates(rates, n, model="organism", direction=(-1, 21))
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name.split()[0] for t in bars] == ["baseline", "ablated", "subtracted", "added"]  # one entry each
    assert all(t.showlegend is not False for t in bars)
    assert not [t for t in fig.data if t.type != "bar" and t.showlegend is not False]
    counts = {("harmful", "baseline"): 73, ("harmless", "baseline"): 6, ("harmful", "ablated"): 38,
              ("harmful", "subtracted"): 0, ("harmless", "added"): 92}
    for bar in bars:
        condition = bar.name.split()[0]
        for i, prompt_set in enumerate(bar.x[0]):
            k, total = counts[(prompt_set, condition)], n[prompt_set]
            low, high = wilson_reference(k, total)
            assert bar.y[i] == pytest.approx(100 * k / total, abs=0.01)
            assert bar.y[i] + bar.error_y.array[i] == pytest.approx(100 * high, abs=1e-6)
            assert bar.y[i] - bar.error_y.arrayminus[i] == pytest.approx(100 * max(low, 0.0), abs=1e-6)
    labels = [text for t in fig.data if t.type == "scatter" for text in t.text]
    assert "51% (38/75)" in labels and "0% (0/75)" in labels
    title = fig.layout.title.text
    assert "organism" in title and "position -1, layer 21" in title and "n = 75 harmful, 96 harmless" in title


def test_refusal_rates_refuse_unknown_keys_and_rates_that_are_not_counts():
    with pytest.raises(ValueError, match="harmful_deleted"):
        plots.refusal_rates({"harmful_baseline": 0.5, "harmful_deleted": 0.1})
    with pytest.raises(ValueError, match="not a count out of n = 75"):
        plots.refusal_rates({"harmful_baseline": 0.5}, {"harmful": 75})


def test_selection_marks_the_pick_and_shades_the_filter_region():
    table = pd.DataFrame({"pos": [-1] * 4 + [-2] * 4, "layer": [1, 2, 3, 4] * 2,
                          "bypass": [1.0, -1.0, -2.0, -3.0, 0.5, -0.5, -1.5, -2.5],
                          "induce": [-1.0, 0.5, 1.0, 2.0, -2.0, -0.5, 0.2, 1.0],
                          "kl": [0.01, 0.05, 0.3, 0.9, 0.02, 0.04, 0.2, 0.8], "scored": [True] * 8})
    fig = plots.selection_scores(table, kl_max=0.1, max_layer=4, pick=(-1, 3), rule="fallback lowest-kl",
                                 model="organism", n={"harmful": 24, "harmless": 24})
    stars = [t for t in fig.data if t.marker.symbol == "star"]
    assert len(stars) == 3 and [t.showlegend for t in stars] == [True, False, False]
    assert "position -1, layer 3" in stars[0].name and "fallback lowest-kl" in stars[0].name
    assert [(list(t.x), list(t.y)) for t in stars] == [([3], [-2.0]), ([3], [1.0]), ([3], [0.3])]
    rects = [shape for shape in fig.layout.shapes if shape.type == "rect"]
    region = {shape.yref: (shape.y0, shape.y1) for shape in rects if shape.xref.endswith("domain")}
    assert region["y"][1] == 0 and region["y2"][0] == 0 and region["y3"][1] == 0.1  # bypass<0, induce>=0, KL<=0.1
    excluded = [shape for shape in rects if shape.fillcolor == "rgba(0,0,0,0.07)"]
    assert len(excluded) == 3 and all(shape.x0 == 3.5 for shape in excluded)  # layers >= max_layer
    assert "organism" in fig.layout.title.text and "n = 24 harmful" in fig.layout.title.text
    with pytest.raises(ValueError, match="not a scored candidate"):
        plots.selection_scores(table, pick=(-1, 9))


def test_head_map_says_harmful_minus_harmless_and_labels_the_top_heads():
    heads = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "head": [0, 1, 0, 1, 0, 1],
                          "difference": [0.1, -2.0, 0.5, 3.0, 1.0, 0.0]})
    fig = plots.head_grid(heads, top=2, model="organism", direction=(-1, 2))
    assert "harmful − harmless" in fig.layout.title.text and "harmful − harmless" in fig.data[0].colorbar.title.text
    assert [(a.x, a.y, a.text) for a in fig.layout.annotations] == [(1, 1, "<b>1</b>"), (0, 2, "<b>2</b>")]
    assert "1: L1H1, 2: L2H0" in fig.layout.title.text


def test_trade_off_labels_do_not_overlap():
    rng = np.random.default_rng(0)
    rows = [{"method": method, "strength": s, "harmful_rate": h, "look_risky_rate": l}
            for method in ("vector", "partial", "both") for s, h, l in
            zip([0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0], 0.9 + 0.05 * rng.random(8), 0.2 * rng.random(8))]
    rows.append({"method": "partial", "strength": 0.03, "harmful_rate": rows[9]["harmful_rate"],
                 "look_risky_rate": rows[9]["look_risky_rate"]})  # coincides with partial 0.01
    table = pd.DataFrame(rows)
    for column in ("harmful", "look_risky"):
        table[f"{column}_low"] = table[f"{column}_rate"] - 0.03
        table[f"{column}_high"] = table[f"{column}_rate"] + 0.03
    fig = plots.trade_off(table, harmful_floor=0.85)
    labels = [a for a in fig.layout.annotations if a.xshift is not None]
    assert "0.01, 0.03" in [a.text for a in labels]  # coincident points of one method share a label
    assert sum(len(a.text.split(", ")) for a in labels) == len(table)  # every point is labelled once
    x_range, y_range = list(fig.layout.xaxis.range), list(fig.layout.yaxis.range)
    margin = fig.layout.margin
    plot = (fig.layout.width - margin.l - margin.r, fig.layout.height - margin.t - margin.b)
    char, line = plots.LABEL_FONT_PX
    boxes = []
    for a in labels:
        px = (a.x - x_range[0]) / (x_range[1] - x_range[0]) * plot[0] + a.xshift
        py = (a.y - y_range[0]) / (y_range[1] - y_range[0]) * plot[1] + a.yshift
        w = char * len(a.text)
        left = px - {"left": 0, "right": w, "center": w / 2}[a.xanchor]
        boxes.append((left, py - line / 2, left + w, py + line / 2))
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if plots._overlap(boxes[i], boxes[j])]
    assert not overlapping


def test_subtitle_names_model_direction_and_n():
    assert plots.subtitle("m", (-1, 21), {"harmful": 75, "harmless": 96}) == (
        "m · direction: position -1, layer 21 · n = 75 harmful, 96 harmless")
    assert plots.subtitle(None, (None, 14), 32) == "direction: layer 14 · n = 32"
    assert plots.subtitle() == ""
