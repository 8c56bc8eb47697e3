"""The frontier figure: refusal against harmless KL on val, two panels on a shared log KL axis.

Left: every trial and the Pareto front by mean refusal score, every paper candidate (each direction ablated at
full weight everywhere, from the run's ``selection.csv``), the random-direction KL null (band from its
minimum to its maximum, dashed line at its median), the chosen point and heretic's points. Right: the front's
substring-judge refusal rate with the rule's threshold, the chosen point and heretic's points.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..plots import COLORS, FONT, PALETTE, TEMPLATE, _rgba

EDIT_COLORS = {"project": PALETTE[0], "norm-preserving": PALETTE[2]}


def frontier_figure(trials: pd.DataFrame, front: pd.DataFrame, *, candidates: pd.DataFrame | None = None,
                    null_kl=None, chosen: dict | None = None, max_refusal: float = 0.1,
                    heretic: dict | None = None, reference: dict | None = None,
                    title: str = "What removing refusal costs: the refusal/KL frontier") -> go.Figure:
    """The figure described in the module docstring, from ``trials.csv`` / ``front.csv`` tables, the run's
    selection table, the null's KL values, ``frontier.json``'s ``chosen`` and ``reference`` entries (the strongest
    paper candidate, whose judged val rate joins the right panel) and ``heretic.json``."""
    fig = make_subplots(rows=1, cols=2, shared_xaxes=False, horizontal_spacing=0.1,
                        subplot_titles=("mean refusal score, harmful val (log-odds)",
                                        "refusal rate, harmful val (substring judge)"))
    positive = lambda s: np.maximum(np.asarray(s, dtype=float), 1e-4)  # noqa: E731  (log axis)
    fig.add_trace(go.Scatter(x=positive(trials.val_kl), y=trials.val_refusal_score, mode="markers", name="trials",
                             marker=dict(color=_rgba(COLORS["random"], 0.35), size=6),
                             hovertext=[f"trial {t}" for t in trials.trial]), row=1, col=1)
    for edit, rows in front.groupby("edit", sort=False):
        color = EDIT_COLORS.get(edit, PALETTE[3])
        rows = rows.sort_values("val_kl")
        hover = [f"trial {t}, index {d:.2f}, orth {o}" for t, d, o in
                 zip(rows.trial, rows.direction_index, rows.orthogonalize)]
        fig.add_trace(go.Scatter(x=positive(rows.val_kl), y=rows.val_refusal_score, mode="markers+lines",
                                 name=f"front ({edit})", marker=dict(color=color, size=9), line=dict(color=color),
                                 hovertext=hover), row=1, col=1)
        fig.add_trace(go.Scatter(x=positive(rows.val_kl), y=100 * rows.val_refusal_rate, mode="markers+lines",
                                 marker=dict(color=color, size=9), line=dict(color=color), showlegend=False,
                                 hovertext=hover), row=1, col=2)
    if candidates is not None and len(candidates):
        scored = candidates.dropna(subset=["bypass", "kl"])
        fig.add_trace(go.Scatter(x=positive(scored.kl), y=scored.bypass, mode="markers",
                                 name="paper candidates the selection scored (full ablation)",
                                 marker=dict(symbol="diamond", color=COLORS["harmful"], size=7, opacity=0.7),
                                 hovertext=[f"pos {p} layer {l}" for p, l in zip(scored.pos, scored.layer)]),
                      row=1, col=1)
    if null_kl:
        low, high, median = float(np.min(null_kl)), float(np.max(null_kl)), float(np.median(null_kl))
        for col in (1, 2):
            fig.add_vrect(x0=max(low, 1e-4), x1=max(high, 1e-4), fillcolor=COLORS["random"],
                          opacity=0.12, line_width=0, row=1, col=col)
            fig.add_vline(x=max(median, 1e-4), line=dict(color=COLORS["random"], dash="dash"), row=1,
                          col=col)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="random directions: min-max, median",
                                 line=dict(color=COLORS["random"], dash="dash")), row=1, col=1)
    fig.add_hline(y=100 * max_refusal, line=dict(color="black", dash="dot", width=1), row=1, col=2)
    if heretic and heretic.get("points"):
        points = pd.DataFrame(heretic["points"])
        hover = [f"heretic trial {t}" for t in points.trial]
        fig.add_trace(go.Scatter(x=positive(points.val_kl), y=points.val_refusal_score, mode="markers",
                                 name="heretic (project's metrics)", hovertext=hover,
                                 marker=dict(symbol="x", size=11, color=PALETTE[3])), row=1, col=1)
        fig.add_trace(go.Scatter(x=positive(points.val_kl), y=100 * points.val_refusal_rate, mode="markers",
                                 hovertext=hover, showlegend=False,
                                 marker=dict(symbol="x", size=11, color=PALETTE[3])), row=1, col=2)
    if reference:
        val = reference["val"]
        fig.add_trace(go.Scatter(x=positive([val["val_kl"]]), y=[100 * val["val_refusal_rate"]], mode="markers",
                                 name=f"paper candidate ({reference['position']}, {reference['layer']}), judged",
                                 marker=dict(symbol="diamond", size=11, color=COLORS["harmful"],
                                             line=dict(color="black", width=1))), row=1, col=2)
    if chosen:
        val = chosen["val"]
        name = "chosen (rule)" if chosen.get("by_rule") else "closest (rule not met)"
        for col, y in ((1, val["val_refusal_score"]), (2, 100 * val["val_refusal_rate"])):
            fig.add_trace(go.Scatter(x=positive([val["val_kl"]]), y=[y], mode="markers", name=name,
                                     showlegend=col == 1, marker=dict(symbol="star", size=16, color="black")),
                          row=1, col=col)
    shown = [*positive(trials.val_kl), *(positive(candidates.kl.dropna()) if candidates is not None else []),
             *(positive(null_kl) if null_kl else []),
             *(positive([p["val_kl"] for p in heretic["points"]]) if heretic and heretic.get("points") else [])]
    low, high = np.log10(min(shown)), np.log10(max(shown))
    fig.update_xaxes(type="log", title_text="harmless KL, val (nats, log)", range=[low - 0.2, high + 0.2], dtick=1,
                     exponentformat="power")
    fig.update_yaxes(title_text="refusal score", row=1, col=1)
    fig.update_yaxes(title_text="refused (%)", range=[-3, 103], row=1, col=2)
    fig.update_layout(template=TEMPLATE, font=FONT, title=dict(text=title, x=0.02), height=520, width=1200,
                      legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="center", x=0.5),
                      margin=dict(l=70, r=30, t=90, b=130))
    return fig


def profile_figure(table: pd.DataFrame, *, embed_weight: float | None = None,
                   title: str = "Where removal matters: the chosen point's weights over depth") -> go.Figure:
    """Per-layer weights of a profile (``rl.frontier.profile_table``): one line for the attention writers, one
    for the MLP writers; the embedding's weight as a marker at layer -1 when given."""
    fig = go.Figure()
    for writer, color in (("attn", PALETTE[0]), ("mlp", PALETTE[1])):
        fig.add_trace(go.Scatter(x=table.layer, y=table[writer], mode="lines+markers", name=f"{writer} writers",
                                 line=dict(color=color)))
    if embed_weight is not None:
        fig.add_trace(go.Scatter(x=[-1], y=[embed_weight], mode="markers", name="embedding",
                                 marker=dict(symbol="square", size=10, color=PALETTE[4])))
    fig.update_layout(template=TEMPLATE, font=FONT, title=dict(text=title, x=0.02), height=380, width=760,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    fig.update_xaxes(title_text="layer (-1: embedding)")
    fig.update_yaxes(title_text="weight of the edit")
    return fig
