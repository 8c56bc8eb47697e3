"""Plotly figures for a writeup, one function per figure, all in one style.

Long because it holds every figure of the suite: one short function each, sharing one style, is easier to keep
consistent than a module per figure.

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

from .stats import wilson_ci

FIGURES = Path("figures")
TEMPLATE = "plotly_white"
FONT = dict(family="Helvetica, Arial, sans-serif", size=13)
COLORS = {"harmful": "#c0392b", "harmless": "#2471a3", "ablated": "#7d3c98", "added": "#d68910",
          "subtracted": "#229954", "baseline": "#7f8c8d", "top": "#c0392b", "random": "#7f8c8d"}
PALETTE = ["#2471a3", "#c0392b", "#229954", "#d68910", "#7d3c98", "#17a589", "#7f8c8d", "#a04000"]


Direction = tuple[int | None, int]  # (position, layer) of a direction; position None for a given vector
Counts = int | dict[str, int]  # prompts behind a figure: one n, or n per prompt set ({"harmful": 75, ...})


def subtitle(model: str | None = None, direction: Direction | None = None, n: Counts | None = None) -> str:
    """The line under a figure's title: the model, the direction (position, layer) and n, those given.

    >>> subtitle("smollm2-135m-refusal", (-1, 21), {"harmful": 75, "harmless": 96})
    'smollm2-135m-refusal · direction: position -1, layer 21 · n = 75 harmful, 96 harmless'
    """
    parts = [model] if model else []
    if direction is not None:
        pos, layer = direction
        parts.append(f"direction: layer {layer}" if pos is None else f"direction: position {pos}, layer {layer}")
    if isinstance(n, dict):
        parts.append("n = " + ", ".join(f"{count} {name}" for name, count in n.items()))
    elif n is not None:
        parts.append(f"n = {n}")
    return " · ".join(parts)


def _style(fig: go.Figure, title: str, x: str, y: str, *, height: int = 420, width: int = 760,
           legend_below: bool = False, note: str = "") -> go.Figure:
    """House style; ``note`` (see :func:`subtitle`) goes in small type under the title."""
    legend = (dict(orientation="h", yanchor="top", y=-0.2, xanchor="center", x=0.5) if legend_below
              else dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    text = f"{title}<br><span style='font-size:11px;color:#555'>{note}</span>" if note else title
    fig.update_layout(template=TEMPLATE, font=FONT, title=dict(text=text, x=0.02), height=height, width=width,
                      legend=legend, margin=dict(l=70, r=30, t=80 + 16 * (note.count('<br>') + 1) if note else 80,
                                                             b=110 if legend_below else 60))
    fig.update_xaxes(title_text=x)
    fig.update_layout(yaxis_title_text=y)  # the first y axis only: a secondary axis keeps its own title
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def cohens_d(
    table: pd.DataFrame, *, title: str = "Separability of harmful vs harmless along each candidate",
    model: str | None = None, n: Counts | None = None,
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
    return _style(fig, title, "layer (resid_pre)", "Cohen's d (held-out, 95% CI)", note=subtitle(model, None, n))


def cosine_heatmap(matrix: pd.DataFrame, *, title: str = "Cosine between layers' candidate directions",
                   model: str | None = None) -> go.Figure:
    """Layer x layer cosine matrix (``rl.stats.layer_cosines``)."""
    fig = go.Figure(go.Heatmap(z=matrix.values, x=list(matrix.columns), y=list(matrix.index), zmin=-1, zmax=1,
                               colorscale="RdBu", reversescale=True, colorbar=dict(title="cosine")))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title, "layer", "layer", height=560, width=620, note=subtitle(model))


def batched_vs_sequential(
    table: pd.DataFrame, *, title: str = "Left-padded batches vs one prompt at a time", model: str | None = None,
    n: Counts | None = None,
) -> go.Figure:
    """Per-layer minimum cosine and max relative difference (``rl.stats.batched_vs_sequential``)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=table.layer, y=table.min_cosine, name="min cosine", mode="lines+markers",
                             line=dict(color=PALETTE[0])), secondary_y=False)
    fig.add_trace(go.Scatter(x=table.layer, y=table.max_rel_diff, name="max relative difference",
                             mode="lines+markers", line=dict(color=PALETTE[1], dash="dot")), secondary_y=True)
    fig.update_yaxes(title_text="max |batched - sequential| / max |sequential|", type="log", secondary_y=True)
    return _style(fig, title, "layer", "min cosine (batched, sequential)", note=subtitle(model, None, n))


def selection_scores(table: pd.DataFrame, *, kl_max: float = 0.1, induce_min: float = 0.0,
                     max_layer: int | None = None, pick: Direction | None = None, rule: str | None = None,
                     title: str = "Direction selection on validation prompts", model: str | None = None,
                     n: Counts | None = None) -> go.Figure:
    """Bypass, induce and KL against layer, one line per position (``Selection.table``).

    Shaded green: where a candidate meets each part of the paper's filter (bypass < 0, induce >= ``induce_min``,
    KL <= ``kl_max``); shaded grey: layers from ``max_layer`` (``rl.selection.max_candidate_layer``) on, which
    are not candidates. ``pick`` (position, layer) is marked with a star in every panel and named with ``rule``
    (the selection's rule, e.g. the lowest-KL fallback) in the legend.
    """
    scored = table[table.scored] if "scored" in table else table
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.07, subplot_titles=(
        "bypass: refusal score, harmful, ablated", "induce: refusal score, harmless, added", "KL, harmless, ablated"))
    for i, (pos, rows) in enumerate(scored.groupby("pos")):
        rows = rows.sort_values("layer")
        color = PALETTE[i % len(PALETTE)]
        for col, column in enumerate(("bypass", "induce", "kl"), start=1):
            fig.add_trace(go.Scatter(x=rows.layer, y=rows[column], mode="lines+markers", name=f"pos {pos}",
                                     legendgroup=str(pos), showlegend=col == 1, line=dict(color=color),
                                     marker=dict(size=4)), row=1, col=col)
    passing = dict(fillcolor=_rgba(PALETTE[2], 0.10), line_width=0, layer="below")
    kl_values = scored.kl[scored.kl > 0]
    kl_floor = min(float(kl_values.min()) if len(kl_values) else kl_max, kl_max) / 10
    fig.add_hrect(y0=-1e3, y1=0, row=1, col=1, **passing)
    fig.add_hrect(y0=induce_min, y1=1e3, row=1, col=2, **passing)
    fig.add_hrect(y0=kl_floor, y1=kl_max, row=1, col=3, **passing)
    for col, y in ((1, 0.0), (2, induce_min), (3, kl_max)):
        fig.add_hline(y=y, line=dict(color="black", width=1, dash="dot"), row=1, col=col)
    fig.add_annotation(x=0, xanchor="left", y=np.log10(kl_max), yanchor="bottom", text=f"KL max {kl_max:.3g}",
                       showarrow=False, font=dict(size=10), row=1, col=3)  # annotations on a log axis: log10
    if max_layer is not None:
        for col in (1, 2, 3):
            fig.add_vrect(x0=max_layer - 0.5, x1=float(table.layer.max()) + 0.5, fillcolor="rgba(0,0,0,0.07)",
                          line_width=0, layer="below", row=1, col=col)
    if pick is not None:
        row = scored[(scored.pos == pick[0]) & (scored.layer == pick[1])]
        if row.empty:
            raise ValueError(f"pick {pick} is not a scored candidate of the table: pass the selection's best")
        label = f"selected: position {pick[0]}, layer {pick[1]}" + (f" ({rule})" if rule else "")
        for col, column in enumerate(("bypass", "induce", "kl"), start=1):
            fig.add_trace(go.Scatter(x=row.layer, y=row[column], mode="markers", name=label, legendgroup="pick",
                                     showlegend=col == 1, marker=dict(symbol="star", size=15, color="black",
                                                                      line=dict(color="white", width=1))),
                          row=1, col=col)
    y_ranges = [(scored.bypass.min(), scored.bypass.max()), (scored.induce.min(), scored.induce.max())]
    for col, (low, high) in enumerate(y_ranges, start=1):
        pad = 0.08 * (high - low) if high > low else 1.0
        fig.update_yaxes(range=[min(low, 0) - pad, max(high, 0) + pad], row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=3)
    if len(kl_values):
        fig.update_yaxes(range=[np.log10(kl_floor), np.log10(max(float(kl_values.max()), kl_max) * 2)], row=1, col=3)
    note = subtitle(model, None, n)
    region = (f"green: meets the paper's filter (bypass < 0, induce >= {induce_min:g}, KL <= {kl_max:.3g})"
              + ("; grey: layers >= int(0.8 L), not candidates" if max_layer is not None else ""))
    _style(fig, title, "", "", height=500, width=1200, legend_below=True,
           note=f"{note} · {region}" if note else region)
    for col, label in enumerate(("log-odds", "log-odds", "KL (nats)"), start=1):
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text=label, row=1, col=col)
    fig.update_layout(margin=dict(t=130))
    return fig


# Conditions of ``report["refusal_rate"]`` (rl.intervention_effects), in the figure's order, with their legend.
INTERVENTIONS = {
    "baseline": "baseline (no intervention)",
    "ablated": "ablated (direction removed at every layer)",
    "subtracted": "subtracted (vector subtracted at its layer)",
    "added": "added (vector added at its layer)",
}


def refusal_rates(rates: dict[str, float], n: dict[str, int] | None = None, *,
                  title: str = "Refusal rate on held-out prompts", model: str | None = None,
                  direction: Direction | None = None) -> go.Figure:
    """One bar per prompt set and intervention (``report["refusal_rate"]``: ``harmful_baseline``,
    ``harmful_ablated``, ``harmful_subtracted``, ``harmless_baseline``, ``harmless_added``), one legend entry per
    intervention; with ``n`` (prompts per set, ``report["n_test"]``) each bar carries its Wilson 95% interval
    and its count.
    """
    known = [f"{s}_{c}" for s in ("harmful", "harmless") for c in INTERVENTIONS]
    unknown = sorted(set(rates) - set(known))
    if unknown:
        raise ValueError(f"unknown refusal-rate keys {unknown}: expected harmful_<condition> or harmless_<condition> "
                         f"with a condition in {list(INTERVENTIONS)}")
    fig = go.Figure()
    for condition, label in INTERVENTIONS.items():
        sets = [s for s in ("harmful", "harmless") if f"{s}_{condition}" in rates]
        if not sets:
            continue
        values = [rates[f"{s}_{condition}"] for s in sets]
        x = [sets, [condition] * len(sets)]  # a two-level axis: prompt set, then intervention
        labels, tops, error = [f"{v:.0%}" for v in values], [100 * v for v in values], None
        if n is not None:
            counts = [_count(v, n[s], f"{s}_{condition}") for v, s in zip(values, sets)]
            intervals = [wilson_ci(k, n[s]) for k, s in zip(counts, sets)]
            labels = [f"{v:.0%} ({k}/{n[s]})" for v, k, s in zip(values, counts, sets)]
            tops = [100 * high for _, high in intervals]
            error = dict(type="data", symmetric=False, array=[100 * (hi - v) for (_, hi), v in zip(intervals, values)],
                         arrayminus=[100 * (v - lo) for (lo, _), v in zip(intervals, values)], color="#333",
                         thickness=1.2, width=6)
        fig.add_trace(go.Bar(x=x, y=[100 * v for v in values], name=label, legendgroup=condition,
                             marker_color=COLORS[condition], error_y=error))
        fig.add_trace(go.Scatter(x=x, y=[t + 2 for t in tops], text=labels, mode="text", textposition="top center",
                                 textfont=dict(size=11, color="#333"), legendgroup=condition, showlegend=False,
                                 hoverinfo="skip"))  # the rate above its interval: a 0% bar still shows it
    fig.update_layout(barmode="relative", bargap=0.25)
    fig.update_yaxes(range=[0, 118 if n is not None else 110], tickvals=[0, 20, 40, 60, 80, 100])
    how = "greedy replies, substring judge" + ("; bars: Wilson 95% intervals" if n is not None else "")
    note = subtitle(model, direction, n)
    return _style(fig, title, "", "refusal rate (%)", width=720, height=500, legend_below=True,
                  note=f"{note}<br>{how}" if note else how)


def _count(rate: float, n: int, name: str) -> int:
    """The number of refusals behind ``rate`` of ``n`` (rates are stored rounded to 4 decimals)."""
    count = round(rate * n)
    if abs(rate * n - count) > max(0.5e-4 * n, 1e-9) + 1e-9 or not 0 <= count <= n:
        raise ValueError(f"{name} = {rate} is not a count out of n = {n}: pass the n the rate was measured on")
    return count


def alpha_sweep(table: pd.DataFrame, *, title: str = "Scaling the ablated component", model: str | None = None,
                direction: Direction | None = None, n: Counts | None = None) -> go.Figure:
    """Refusal score (and rate, if present) against alpha (columns ``alpha, refusal_score[, refusal_rate]``)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=table.alpha, y=table.refusal_score, name="refusal score (log-odds)",
                             mode="lines+markers", line=dict(color=COLORS["harmful"])), secondary_y=False)
    if "refusal_rate" in table:
        fig.add_trace(go.Scatter(x=table.alpha, y=100 * table.refusal_rate, name="refusal rate (%)",
                                 mode="lines+markers", line=dict(color=PALETTE[0], dash="dot")), secondary_y=True)
        fig.update_yaxes(title_text="refusal rate (%)", secondary_y=True, range=[0, 105], tickmode="array",
                         tickvals=[0, 20, 40, 60, 80, 100], showgrid=False)
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"))
    return _style(fig, title, "alpha (r <- r - alpha <r, v> v; 1 = full ablation)", "mean refusal score (log-odds)",
                  note=subtitle(model, direction, n))


def head_grid(table: pd.DataFrame, *, value: str = "difference", n_heads: int | None = None, top: int = 5,
              title: str | None = None, model: str | None = None, direction: Direction | None = None,
              n: Counts | None = None) -> go.Figure:
    """Layer x head heatmap of a ``head_attribution`` column (``difference``: harmful − harmless mean projection
    of each head's output on the unit direction, resid units); the ``top`` heads by that value are labelled."""
    n_heads = int(table["head"].max()) + 1 if n_heads is None else n_heads
    grid = table.pivot(index="layer", columns="head", values=value).reindex(columns=range(n_heads))
    limit = float(np.nanmax(np.abs(grid.values)))
    what = {"difference": "harmful − harmless", "harmful": "harmful", "harmless": "harmless"}.get(value, value)
    title = title or f"Direct contribution of each head to the direction: {what}"
    fig = go.Figure(go.Heatmap(z=grid.values, x=list(grid.columns), y=list(grid.index), zmid=0, zmin=-limit,
                               zmax=limit, colorscale="RdBu", reversescale=True,
                               colorbar=dict(title=f"{what}<br>projection<br>(resid units)")))
    leaders = table.sort_values(value, ascending=False).head(top)
    for rank, row in enumerate(leaders.itertuples(), start=1):
        fig.add_annotation(x=row.head, y=row.layer, text=f"<b>{rank}</b>", showarrow=False,
                           font=dict(size=10, color="white" if abs(getattr(row, value)) > 0.5 * limit else "black"))
    labels = ", ".join(f"{rank}: L{int(r.layer)}H{int(r.head)}" for rank, r in enumerate(leaders.itertuples(), 1))
    note = subtitle(model, direction, n)
    _style(fig, title, "head", "layer", height=680, width=600, note=f"{note}<br>top {top}: {labels}" if note else
           f"top {top}: {labels}")
    fig.update_layout(margin=dict(t=110))
    return fig


def suffix_attention(
    heads_table: pd.DataFrame, *, title: str = "Where the top heads look from the last token",
    model: str | None = None, direction: Direction | None = None, n: Counts | None = None,
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
    _style(fig, title, "", "attention from the last token (%)", height=500, width=1100, legend_below=True,
           note=subtitle(model, direction, n))
    fig.update_xaxes(title_text="head")
    fig.update_layout(margin=dict(t=120))  # the panel titles sit below the subtitle
    return fig


def base_vs_chat(table: pd.DataFrame, *, title: str = "Chat vs base model directions", model: str | None = None,
                 n: Counts | None = None) -> go.Figure:
    """Per-layer cosine between the chat and base models' directions (``rl.base_vs_chat.direction_cosines``)."""
    fig = go.Figure(go.Scatter(x=table.layer, y=table.cosine, mode="lines+markers", line=dict(color=PALETTE[0]),
                               name="cosine"))
    fig.update_yaxes(range=[-0.05, 1.05])
    return _style(fig, title, "layer (resid_pre)", "cosine(chat direction, base direction)",
                  note=subtitle(model, None, n))


def refusal_vs_rank(tables: dict[str, pd.DataFrame], *, title: str = "Refusal under rank-k ablation",
                    model: str | None = None, direction: Direction | None = None, n: Counts | None = None) -> go.Figure:
    """Refusal rate against k, one line per basis (``rl.subspace.refusal_vs_rank`` tables by name)."""
    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        fig.add_trace(go.Scatter(x=table.k, y=100 * table.refusal_rate, mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_yaxes(range=[-2, 102])
    return _style(fig, title, "k (directions ablated)", "harmful refusal rate (%)", note=subtitle(model, direction, n))


def bars(table: pd.DataFrame, x: str, y: str, *, color: str | None = None, title: str, x_title: str,
         y_title: str, model: str | None = None, direction: Direction | None = None,
         n: Counts | None = None) -> go.Figure:
    """A plain bar chart in the house style (e.g. the head-ablation cross-check)."""
    colors = table[color].map(lambda c: COLORS.get(c, PALETTE[0])) if color else PALETTE[0]
    fig = go.Figure(go.Bar(x=table[x], y=table[y], marker_color=colors))
    return _style(fig, title, x_title, y_title, note=subtitle(model, direction, n))


def trade_off(table: pd.DataFrame, *, harmful_floor: float | None = None,
              title: str = "Fewer false refusals at what cost in true refusals?", model: str | None = None,
              direction: Direction | None = None, n: Counts | None = None) -> go.Figure:
    """Look-risky refusal against harmful refusal, one line per method, Wilson 95% CIs as error bars on both
    axes, points labelled with their strength (``rl.over_refusal.trade_off``; ``n`` defaults to its
    ``look_risky_n`` and ``harmful_n``); ``harmful_floor`` (a rate,
    e.g. 90% of the unmodified one) draws a vertical line. Better methods sit to the right (true refusal kept)
    and low (fewer false refusals). Labels are placed so that none overlaps another or a point at the figure's
    size; points of one method that coincide share one label ("0.05, 0.1")."""
    if n is None and {"look_risky_n", "harmful_n"} <= set(table):
        n = {"look-risky": int(table.look_risky_n.max()), "harmful": int(table.harmful_n.max())}
    fig = go.Figure()
    x_low = min(100 * table.harmful_low.min(), 100 * harmful_floor if harmful_floor is not None else 100)
    x_range = [max(-2, x_low - 5), 102]
    y_range = [-2, min(102, 100 * table.look_risky_high.max() + 5)]
    width, height, margin = 760, 560, dict(l=70, r=30, t=90, b=120)
    points = []
    for i, (method, rows) in enumerate(table.groupby("method", sort=False)):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=100 * rows.harmful_rate, y=100 * rows.look_risky_rate, mode="lines+markers", name=method,
            line=dict(color=color), marker=dict(size=7), customdata=rows.strength,
            hovertemplate="strength %{customdata}<br>harmful %{x:.1f}%<br>look-risky %{y:.1f}%",
            error_x=dict(type="data", symmetric=False, array=100 * (rows.harmful_high - rows.harmful_rate),
                         arrayminus=100 * (rows.harmful_rate - rows.harmful_low), thickness=1, color=color),
            error_y=dict(type="data", symmetric=False, array=100 * (rows.look_risky_high - rows.look_risky_rate),
                         arrayminus=100 * (rows.look_risky_rate - rows.look_risky_low), thickness=1, color=color)))
        points += [(100 * r.harmful_rate, 100 * r.look_risky_rate, f"{r.strength:g}", color, method)
                   for r in rows.itertuples()]
    plot = (width - margin["l"] - margin["r"], height - margin["t"] - margin["b"])
    for x, y, text, color, xshift, yshift, xanchor in _label_positions(points, x_range, y_range, plot):
        fig.add_annotation(x=x, y=y, text=text, showarrow=False, xshift=xshift, yshift=yshift, xanchor=xanchor,
                           yanchor="middle", font=dict(size=10, color=color), bgcolor="rgba(255,255,255,0.85)",
                           borderpad=0)
    if harmful_floor is not None:
        fig.add_vline(x=100 * harmful_floor, line=dict(color="black", width=1, dash="dot"),
                      annotation_text=f"floor {100 * harmful_floor:.0f}%", annotation_position="bottom left")
    # Zoomed to the points (with their intervals and the floor): they crowd one corner of the full square.
    fig.update_xaxes(range=x_range)
    fig.update_yaxes(range=y_range)
    _style(fig, title, "harmful prompts refused (%, 95% Wilson CI)", "look-risky harmless prompts refused (%)",
           height=height, width=width, legend_below=True, note=subtitle(model, direction, n))
    fig.update_layout(margin=margin)
    return fig


LABEL_FONT_PX = (6.0, 12.0)  # width of one character and height of a line, 10 px Helvetica


def _label_positions(points: list[tuple[float, float, str, str, str]], x_range: list[float], y_range: list[float],
                     plot: tuple[float, float]) -> list[tuple[float, float, str, str, float, float, str]]:
    """Place a text label by each point ``(x, y, text, color, group)`` so that no two labels overlap and no
    label covers a point, in a plot area of ``plot`` pixels showing ``x_range`` x ``y_range``.

    Points of one group within 4 px of each other share one label (texts joined by ", "). Each label tries
    offsets right, left, above and below its point, then further out; the first free spot wins. Returns
    ``(x, y, text, color, xshift, yshift, xanchor)`` per label (shifts in pixels).
    """
    def pixels(x: float, y: float) -> tuple[float, float]:
        return (float((x - x_range[0]) / (x_range[1] - x_range[0]) * plot[0]),
                float((y - y_range[0]) / (y_range[1] - y_range[0]) * plot[1]))

    groups: list[list] = []  # [x, y, texts, color, group, px, py]
    for x, y, text, color, group in points:
        px, py = pixels(x, y)
        near = next((g for g in groups if g[4] == group and abs(g[5] - px) < 4 and abs(g[6] - py) < 4), None)
        if near is None:
            groups.append([x, y, [text], color, group, px, py])
        elif text not in near[2]:
            near[2].append(text)
    marks = [(g[5] - 4, g[6] - 4, g[5] + 4, g[6] + 4) for g in groups]
    boxes: list[tuple[float, float, float, float]] = []
    placed = []
    char, line = LABEL_FONT_PX
    for x, y, texts, color, _, px, py in groups:
        text = ", ".join(texts)
        w, h = char * len(text), line
        for distance in (6, 14, 24, 36):
            options = [(distance, 0, "left"), (-distance, 0, "right"), (0, distance + 2, "center"),
                       (0, -distance - 2, "center"), (distance, distance, "left"), (distance, -distance, "left"),
                       (-distance, distance, "right"), (-distance, -distance, "right")]
            fits = None
            for dx, dy, anchor in options:
                left = px + dx - {"left": 0, "right": w, "center": w / 2}[anchor]
                box = (left, py + dy - h / 2, left + w, py + dy + h / 2)
                if not any(_overlap(box, other) for other in boxes + marks):
                    fits = (dx, dy, anchor, box)
                    break
            if fits:
                break
        dx, dy, anchor, box = fits or (6, 0, "left", (px + 6, py - h / 2, px + 6 + w, py + h / 2))
        boxes.append(box)
        placed.append((x, y, text, color, dx, dy, anchor))
    return placed


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


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
