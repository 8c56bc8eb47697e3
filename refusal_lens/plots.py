"""Plotly figures for a writeup, one function per figure, all in one style.

Every function takes the DataFrame (or dict) that the corresponding
``refusal_lens`` function returns and gives back a ``plotly.graph_objects.Figure``;
:func:`save` writes it as ``figures/<name>.html`` plus a static PNG. Static export
uses kaleido, which drives a Chrome/Chromium; :func:`save` looks for Debian's
``/usr/bin/chromium`` (installed by ``make``), else kaleido's own search, and when
none can run it writes the HTML only and says so (returned in the paths).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FIGURES = Path("figures")
TEMPLATE = "plotly_white"
FONT = dict(family="Helvetica, Arial, sans-serif", size=13)
COLORS = {"harmful": "#c0392b", "harmless": "#2471a3", "ablated": "#7d3c98", "added": "#d68910",
          "baseline": "#7f8c8d", "top": "#c0392b", "random": "#7f8c8d"}
PALETTE = ["#2471a3", "#c0392b", "#229954", "#d68910", "#7d3c98", "#17a589", "#7f8c8d", "#a04000"]


def _style(fig: go.Figure, title: str, x: str, y: str, *, height: int = 420, width: int = 760,
           legend_below: bool = False) -> go.Figure:
    legend = (dict(orientation="h", yanchor="top", y=-0.2, xanchor="center", x=0.5) if legend_below
              else dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    fig.update_layout(template=TEMPLATE, font=FONT, title=dict(text=title, x=0.02), height=height, width=width,
                      legend=legend, margin=dict(l=70, r=30, t=80, b=110 if legend_below else 60))
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def cohens_d(
    table: pd.DataFrame, *, title: str = "Separability of harmful vs harmless along each candidate"
) -> go.Figure:
    """Per-layer Cohen's d with its bootstrap CI band, one line per position (``rl.stats.cohens_d``)."""
    fig = go.Figure()
    for i, (pos, rows) in enumerate(table[table.valid].groupby("pos")):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=list(rows.layer) + list(rows.layer[::-1]),
                y=list(rows.ci_high) + list(rows.ci_low[::-1]),
                fill="toself",
                fillcolor=_rgba(color, 0.15),
                line=dict(width=0),
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(go.Scatter(x=rows.layer, y=rows.d, mode="lines+markers", name=f"pos {pos}",
                                 line=dict(color=color), marker=dict(size=5)))
    return _style(fig, title, "layer (resid_pre)", "Cohen's d (held-out, 95% CI)")


def cosine_heatmap(matrix: pd.DataFrame, *, title: str = "Cosine between layers' candidate directions") -> go.Figure:
    """Layer x layer cosine matrix (``rl.stats.layer_cosines``)."""
    fig = go.Figure(go.Heatmap(z=matrix.values, x=list(matrix.columns), y=list(matrix.index), zmin=-1, zmax=1,
                               colorscale="RdBu", reversescale=True, colorbar=dict(title="cosine")))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title, "layer", "layer", height=560, width=620)


def batched_vs_sequential(
    table: pd.DataFrame, *, title: str = "Left-padded batches vs one prompt at a time"
) -> go.Figure:
    """Per-layer minimum cosine and max relative difference (``rl.stats.batched_vs_sequential``)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=table.layer, y=table.min_cosine, name="min cosine", mode="lines+markers",
                             line=dict(color=PALETTE[0])), secondary_y=False)
    fig.add_trace(go.Scatter(x=table.layer, y=table.max_rel_diff, name="max relative difference",
                             mode="lines+markers", line=dict(color=PALETTE[1], dash="dot")), secondary_y=True)
    fig.update_yaxes(title_text="max |batched - sequential| / max |sequential|", type="log", secondary_y=True)
    return _style(fig, title, "layer", "min cosine (batched, sequential)")


def selection_scores(table: pd.DataFrame, *, kl_max: float = 0.1,
                     title: str = "Direction selection on validation prompts") -> go.Figure:
    """Bypass, induce and KL against layer, one line per position (``Selection.table``)."""
    scored = table[table.scored] if "scored" in table else table
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "bypass: refusal score, harmful, ablated", "induce: refusal score, harmless, added", "KL, harmless, ablated"))
    for i, (pos, rows) in enumerate(scored.groupby("pos")):
        rows = rows.sort_values("layer")
        color = PALETTE[i % len(PALETTE)]
        for col, column in enumerate(("bypass", "induce", "kl"), start=1):
            fig.add_trace(go.Scatter(x=rows.layer, y=rows[column], mode="lines+markers", name=f"pos {pos}",
                                     legendgroup=str(pos), showlegend=col == 1, line=dict(color=color),
                                     marker=dict(size=4)), row=1, col=col)
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"), row=1, col=2)
    fig.add_hline(y=kl_max, line=dict(color="black", width=1, dash="dot"), row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    _style(fig, title, "", "", height=480, width=1200, legend_below=True)
    for col, label in enumerate(("log-odds", "log-odds", "KL (nats)"), start=1):
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text=label, row=1, col=col)
    return fig


def refusal_rates(rates: dict[str, float], *, title: str = "Refusal rate on held-out prompts") -> go.Figure:
    """Bars: harmful baseline vs ablated, harmless baseline vs added (``report["refusal_rate"]``)."""
    groups = [("harmful", "harmful_baseline", "harmful_ablated", "ablated"),
              ("harmless", "harmless_baseline", "harmless_added", "added")]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[g for g, *_ in groups], y=[100 * rates[b] for _, b, _, _ in groups], name="baseline",
                         marker_color=COLORS["baseline"], text=[f"{100 * rates[b]:.0f}%" for _, b, _, _ in groups]))
    fig.add_trace(go.Bar(x=[g for g, *_ in groups], y=[100 * rates[c] for _, _, c, _ in groups],
                         name="intervention (ablate direction / add direction)", marker_color=COLORS["ablated"],
                         text=[f"{100 * rates[c]:.0f}%" for _, _, c, _ in groups]))
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 105])
    return _style(fig, title, "prompts", "refusal rate (%, substring judge, greedy)", width=620)


def alpha_sweep(table: pd.DataFrame, *, title: str = "Scaling the ablated component") -> go.Figure:
    """Refusal score (and rate, if present) against alpha (columns ``alpha, refusal_score[, refusal_rate]``)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=table.alpha, y=table.refusal_score, name="refusal score (log-odds)",
                             mode="lines+markers", line=dict(color=COLORS["harmful"])), secondary_y=False)
    if "refusal_rate" in table:
        fig.add_trace(go.Scatter(x=table.alpha, y=100 * table.refusal_rate, name="refusal rate (%)",
                                 mode="lines+markers", line=dict(color=PALETTE[0], dash="dot")), secondary_y=True)
        fig.update_yaxes(title_text="refusal rate (%)", secondary_y=True, range=[0, 105])
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"))
    return _style(fig, title, "alpha (r <- r - alpha <r, v> v; 1 = full ablation)", "mean refusal score (log-odds)")


def head_grid(table: pd.DataFrame, *, value: str = "difference", n_heads: int | None = None,
              title: str = "Direct contribution of each head to the refusal direction") -> go.Figure:
    """Layer x head heatmap of a ``head_attribution`` column."""
    n_heads = int(table["head"].max()) + 1 if n_heads is None else n_heads
    grid = table.pivot(index="layer", columns="head", values=value).reindex(columns=range(n_heads))
    limit = float(np.nanmax(np.abs(grid.values)))
    fig = go.Figure(go.Heatmap(z=grid.values, x=list(grid.columns), y=list(grid.index), zmid=0, zmin=-limit,
                               zmax=limit, colorscale="RdBu", reversescale=True,
                               colorbar=dict(title="projection<br>(resid units)")))
    return _style(fig, title, "head", "layer", height=620, width=560)


def suffix_attention(
    heads_table: pd.DataFrame, *, title: str = "Where the top heads look from the last token"
) -> go.Figure:
    """Grouped bars per head: attention share on the instruction and on the suffix, per condition."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("on the instruction", "on the suffix"), shared_yaxes=True)
    labels = [f"L{l}H{h}" for l, h in heads_table[["layer", "head"]].drop_duplicates().itertuples(index=False)]
    for i, (condition, rows) in enumerate(heads_table.groupby("condition", sort=False)):
        color = PALETTE[i % len(PALETTE)]
        for col, column in enumerate(("instruction_share", "suffix_share"), start=1):
            fig.add_trace(go.Bar(x=labels, y=100 * rows[column], name=condition, legendgroup=condition,
                                 showlegend=col == 1, marker_color=color), row=1, col=col)
    fig.update_layout(barmode="group")
    _style(fig, title, "", "attention from the last token (%)", height=480, width=1100, legend_below=True)
    fig.update_xaxes(title_text="head")
    return fig


def base_vs_chat(table: pd.DataFrame, *, title: str = "Chat vs base model directions") -> go.Figure:
    """Per-layer cosine between the chat and base models' directions (``rl.base_vs_chat.direction_cosines``)."""
    fig = go.Figure(go.Scatter(x=table.layer, y=table.cosine, mode="lines+markers", line=dict(color=PALETTE[0]),
                               name="cosine"))
    fig.update_yaxes(range=[-0.05, 1.05])
    return _style(fig, title, "layer (resid_pre)", "cosine(chat direction, base direction)")


def refusal_vs_rank(tables: dict[str, pd.DataFrame], *, title: str = "Refusal under rank-k ablation") -> go.Figure:
    """Refusal rate against k, one line per basis (``rl.subspace.refusal_vs_rank`` tables by name)."""
    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        fig.add_trace(go.Scatter(x=table.k, y=100 * table.refusal_rate, mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_yaxes(range=[-2, 102])
    return _style(fig, title, "k (directions ablated)", "harmful refusal rate (%)")


def bars(table: pd.DataFrame, x: str, y: str, *, color: str | None = None, title: str, x_title: str,
         y_title: str) -> go.Figure:
    """A plain bar chart in the house style (e.g. the head-ablation cross-check)."""
    colors = table[color].map(lambda c: COLORS.get(c, PALETTE[0])) if color else PALETTE[0]
    fig = go.Figure(go.Bar(x=table[x], y=table[y], marker_color=colors))
    return _style(fig, title, x_title, y_title)


def trade_off(table: pd.DataFrame, *, harmful_floor: float | None = None,
              title: str = "Fewer false refusals at what cost in true refusals?") -> go.Figure:
    """Look-risky refusal against harmful refusal, one line per method, Wilson 95% CIs as error bars on both
    axes, points labelled with their strength (``rl.over_refusal.trade_off``); ``harmful_floor`` (a rate,
    e.g. 90% of the unmodified one) draws a vertical line. Better methods sit to the right (true refusal kept)
    and low (fewer false refusals)."""
    fig = go.Figure()
    for i, (method, rows) in enumerate(table.groupby("method", sort=False)):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=100 * rows.harmful_rate, y=100 * rows.look_risky_rate, mode="lines+markers+text", name=method,
            text=[f"{s:g}" for s in rows.strength], textposition="top right", textfont=dict(size=10, color=color),
            line=dict(color=color), marker=dict(size=7),
            error_x=dict(type="data", symmetric=False, array=100 * (rows.harmful_high - rows.harmful_rate),
                         arrayminus=100 * (rows.harmful_rate - rows.harmful_low), thickness=1, color=color),
            error_y=dict(type="data", symmetric=False, array=100 * (rows.look_risky_high - rows.look_risky_rate),
                         arrayminus=100 * (rows.look_risky_rate - rows.look_risky_low), thickness=1, color=color)))
    if harmful_floor is not None:
        fig.add_vline(x=100 * harmful_floor, line=dict(color="black", width=1, dash="dot"),
                      annotation_text=f"floor {100 * harmful_floor:.0f}%", annotation_position="bottom left")
    # Zoomed to the points (with their intervals and the floor): they crowd one corner of the full square.
    x_low = min(100 * table.harmful_low.min(), 100 * harmful_floor if harmful_floor is not None else 100)
    fig.update_xaxes(range=[max(-2, x_low - 5), 102])
    fig.update_yaxes(range=[-2, min(102, 100 * table.look_risky_high.max() + 5)])
    return _style(fig, title, "harmful prompts refused (%, 95% Wilson CI)", "look-risky harmless prompts refused (%)",
                  height=520, width=760, legend_below=True)


def _chrome() -> str | None:
    for candidate in (os.environ.get("BROWSER_PATH"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate:
            return candidate
    return None


def save(fig: go.Figure, name: str, folder: str | Path = FIGURES, *, static: bool = True) -> list[Path]:
    """Write ``folder/name.html`` and ``folder/name.png``; returns the paths written.

    The HTML loads ``plotly.min.js`` from the same folder (written once), so it opens offline, and its
    plot element is named after ``name`` (not a random id), so the same figure gives the same bytes.

    Static export needs a Chrome/Chromium; without one a warning names the fix and only HTML is written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html = folder / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory", full_html=True, div_id=f"refusal-lens-{name}")
    written = [html]
    if static:
        chrome = _chrome()
        if chrome:
            os.environ.setdefault("BROWSER_PATH", chrome)
        try:
            png = folder / f"{name}.png"
            fig.write_image(png, scale=2)
            written.append(png)
        except Exception as error:  # kaleido raises several types when no browser can start
            warnings.warn(f"static export of {name!r} failed ({type(error).__name__}: {error}); install Debian's "
                          "`chromium` (apt-get install chromium) or set BROWSER_PATH. Wrote HTML only.", stacklevel=2)
    return written
