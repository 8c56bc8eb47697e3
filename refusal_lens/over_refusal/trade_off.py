"""The trade-off between false and true refusal: partial ablation strengths fixed on val, and the comparison.

Three interventions are compared on test: ablating the false-refusal vector with strength α, partial
ablation of the refusal direction with strength α, and both (the vector fully ablated plus the refusal
direction partially). Ablation acts at all 3 sites of every layer, so the refusal direction's share left
shrinks about as ``(1 - α)^(3L)`` and the useful strengths are small; :func:`partial_ablation_scan` measures
them on val and :func:`trade_off_alphas` fixes the test points from that scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from ..chat import check_instructions
from ..interventions import ablate
from ..metrics import refusal_score
from ..models import Model
from .rates import rate

__all__ = ["METHOD_REFUSAL", "METHOD_FALSE_REFUSAL", "METHOD_BOTH", "partial_ablation_scan", "trade_off_alphas",
           "compare_methods", "trade_off_points", "shared_key", "hooks_for", "trade_off_table"]

METHOD_REFUSAL = "refusal direction, partial ablation"
METHOD_FALSE_REFUSAL = "false-refusal vector, ablation"
METHOD_BOTH = "both: false-refusal vector ablated + refusal direction partially"
_BEST_COLUMNS = ("strength", "look_risky_rate", "look_risky_low", "look_risky_high", "look_risky_n", "harmful_rate",
                 "harmful_low", "harmful_high")


def partial_ablation_scan(model: Model, refusal_direction: Float[Tensor, " d_model"], *, look_risky: Sequence[str],
                          harmful: Sequence[str], alphas: Sequence[float], batch_size: int = 32) -> pd.DataFrame:
    """Val scores under partial ablation of the refusal direction, one row per strength α in ``alphas``.

    ``harmful_kept`` (share of ``harmful`` with refusal score > 0, over that share unablated),
    ``look_risky_refusing`` (share of ``look_risky`` with score > 0) and ``false_refusal`` (their mean score).
    """
    look_risky, harmful = check_instructions(look_risky, model.chat), check_instructions(harmful, model.chat)
    base = float((refusal_score(model, harmful, batch_size=batch_size) > 0).double().mean())
    if base == 0:
        raise ValueError("the model refuses none of the harmful prompts (refusal score > 0): nothing to keep")
    rows = []
    for alpha in alphas:
        hooks = ablate(model, refusal_direction, alpha=alpha).hooks
        harm = refusal_score(model, harmful, hooks=hooks, batch_size=batch_size)
        look = refusal_score(model, look_risky, hooks=hooks, batch_size=batch_size)
        rows.append({"alpha": float(alpha), "harmful_kept": float((harm > 0).double().mean()) / base,
                     "look_risky_refusing": float((look > 0).double().mean()), "false_refusal": float(look.mean())})
    return pd.DataFrame(rows)


def trade_off_alphas(scan: pd.DataFrame, *, keep: float = 0.9) -> tuple[list[float], list[float]]:
    """Strengths for the test trade-off, fixed on val (:func:`partial_ablation_scan`).

    With ``a*`` the largest α that keeps ``harmful_kept >= keep`` (else the smallest), the refusal direction's
    points are the α below ``a*``, ``a*`` and the two above; "both" (false-refusal vector plus partial refusal
    ablation) uses the α below and ``a*``.
    """
    grid = sorted(scan.alpha)
    kept = scan.set_index("alpha").harmful_kept
    ok = [i for i, a in enumerate(grid) if kept[a] >= keep]
    i = max(ok) if ok else 0
    return grid[max(i - 1, 0): i + 3], sorted({grid[max(i - 1, 0)], grid[i]})


def trade_off_points(false_refusal_alphas: Sequence[float], refusal_alphas: Sequence[float],
                     both_alphas: Sequence[float]) -> list[tuple[str, float]]:
    """``(method, strength)`` of every point: the vector at 0, 1 and ``false_refusal_alphas``; the refusal direction
    at 0 and ``refusal_alphas``; both at 0 (the vector alone, where that curve starts) and ``both_alphas``."""
    points = [(METHOD_FALSE_REFUSAL, a) for a in sorted({0.0, 1.0, *map(float, false_refusal_alphas)})]
    if refusal_alphas:
        points += [(METHOD_REFUSAL, a) for a in sorted({0.0, *map(float, refusal_alphas)})]
    both = sorted({0.0, *map(float, both_alphas)}) if both_alphas else []
    return points + [(METHOD_BOTH, a) for a in both]


def shared_key(method: str, alpha: float) -> str | tuple[str, float]:
    """Points that are the same intervention share their generations: no hooks, or exactly the vector ablated."""
    if method != METHOD_BOTH and alpha == 0:
        return "baseline"
    if (method, alpha) in ((METHOD_FALSE_REFUSAL, 1.0), (METHOD_BOTH, 0.0)):
        return "ablated"
    return (method, alpha)


def hooks_for(model: Model, vector: Tensor, refusal_direction: Tensor | None, method: str, alpha: float) -> list:
    """The hooks of one trade-off point."""
    if method == METHOD_FALSE_REFUSAL:
        return ablate(model, vector, alpha=alpha).hooks if alpha else []
    partial = ablate(model, refusal_direction, alpha=alpha).hooks if alpha else []
    return partial if method == METHOD_REFUSAL else ablate(model, vector).hooks + partial


def trade_off_table(points: list[tuple[str, float]], verdicts: dict) -> pd.DataFrame:
    """One row per point: look-risky and harmful refusal rates with Wilson 95% intervals."""
    rows = []
    for method, alpha in points:
        row = {"method": method, "strength": alpha}
        for name, column in (("look_risky", "look_risky"), ("harmful_all", "harmful")):
            found = rate(verdicts[shared_key(method, alpha)][name])
            row.update({f"{column}_rate": found["rate"], f"{column}_low": found["ci_low"],
                        f"{column}_high": found["ci_high"], f"{column}_n": found["n"]})
        rows.append(row)
    return pd.DataFrame(rows)


def compare_methods(table: pd.DataFrame, *, harmful_floor: float) -> pd.DataFrame:
    """Per method of a trade-off table (columns ``method``, ``strength``, ``look_risky_rate|low|high|n``,
    ``harmful_rate|low|high``), the point with the lowest look-risky refusal among those whose harmful refusal is
    at least ``harmful_floor`` (e.g. 0.9 x the unmodified rate); NaN when no point is."""
    rows = []
    for method, points in table.groupby("method", sort=False):
        eligible = points[points.harmful_rate >= harmful_floor]
        best = eligible.sort_values(["look_risky_rate", "strength"]).iloc[0] if len(eligible) else None
        rows.append({"method": method, "harmful_floor": harmful_floor,
                     **{c: (best[c] if best is not None and c in best else math.nan) for c in _BEST_COLUMNS}})
    return pd.DataFrame(rows)
