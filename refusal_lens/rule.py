"""Selection rules: bounds on named scores, the score to minimize, a fallback, and the table they explain.

Both selections are configurations of these pieces. A :class:`Rule` keeps the candidates whose scores
satisfy every :class:`Bound` (a score that was not computed, or is not finite, fails) and picks the one
with the lowest ``minimize`` score (the first on ties). :class:`Thresholds` holds the rule, an optional
fallback rule tried only when nothing passes, the KL limit with how it was set (see
:mod:`refusal_lens.kl_null`) and the layer filter. :func:`rule_table` writes one row per candidate with
``kept`` and a ``reason``; :class:`SelectionError` is raised when a pick is asked of a selection that
has none.

* refusal (:func:`refusal_lens.select_direction`): bounds ``induce >= induce_min`` and ``kl <= kl_max``,
  minimize ``bypass``; fallback ``"lowest-kl"``: ``bypass < 0``, ``induce >= induce_min``, minimize ``kl``.
* false refusal (:func:`refusal_lens.over_refusal.select_false_refusal`): ``false_refusal`` below the
  unablated one, ``harmful_kept >= keep_harmful``, ``kl <= kl_max``, minimize ``false_refusal``; fallback
  ``"lowest-kl"``: ``harmful_kept >= keep_harmful``, ``look_risky_refusing`` at most half the unablated
  share, minimize ``kl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .directions import Directions

__all__ = ["FALLBACKS", "Bound", "Rule", "Thresholds", "SelectionError", "check_fallback", "max_candidate_layer",
           "candidate_sites", "rule_table"]

FALLBACKS = ("lowest-kl",)
_COMPARE = {"<": np.less, "<=": np.less_equal, ">=": np.greater_equal, ">": np.greater}
_NEGATION = {"<": ">=", "<=": ">", ">=": "<", ">": "<="}
_SUFFIX = {"<": "below", "<=": "max", ">=": "min", ">": "above"}
_LABELS = {"kl": "KL"}


class SelectionError(RuntimeError):
    """No candidate passed the selection rule; the message says why and what to try.

    ``report``: the run's report as written when the main job stopped here (``None`` outside the main job).
    """

    def __init__(self, message: str, *, report: dict | None = None):
        super().__init__(message)
        self.report = report


def _label(score: str) -> str:
    return _LABELS.get(score, score)


@dataclass(frozen=True)
class Bound:
    """``score op value``, e.g. ``Bound("kl", "<=", 0.1)``; ``failure`` is what a table says when it fails
    (default: the negated comparison)."""

    score: str
    op: str
    value: float
    failure: str | None = None

    def __post_init__(self):
        if self.op not in _COMPARE:
            raise ValueError(f"op must be one of {sorted(_COMPARE)}, got {self.op!r}")

    def holds(self, values: np.ndarray) -> np.ndarray:
        """Elementwise, NaN fails."""
        with np.errstate(invalid="ignore"):
            return _COMPARE[self.op](np.asarray(values, dtype=float), self.value)

    def describe(self) -> str:
        return f"{_label(self.score)} {self.op} {self.value:.4g}"

    def why_not(self) -> str:
        return self.failure or f"{_label(self.score)} {_NEGATION[self.op]} {self.value:.4g}"

    @property
    def key(self) -> str:
        """The bound's name in JSON summaries, e.g. ``kl_max``, ``induce_min``, ``false_refusal_below``."""
        return f"{self.score}_{_SUFFIX[self.op]}"


@dataclass(frozen=True)
class Rule:
    """Keep the candidates that satisfy every bound (with all of :attr:`required` finite); pick the lowest
    ``minimize`` among them.

    Attributes:
        name: short name (``"paper"``, ``"lowest-kl"``).
        text: the sentence a selection records as the rule that produced its pick.
    """

    name: str
    text: str
    bounds: tuple[Bound, ...]
    minimize: str

    @property
    def required(self) -> tuple[str, ...]:
        """The scores a candidate needs to be judged: ``minimize`` first, then the bounds' (no repeats)."""
        return tuple(dict.fromkeys([self.minimize, *(b.score for b in self.bounds)]))

    def mask(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Which rows of ``columns`` (score name -> values, one per candidate; NaN = not scored) pass."""
        keep = np.ones(len(next(iter(columns.values()))), dtype=bool)
        for name in self.required:
            keep &= np.isfinite(np.asarray(columns[name], dtype=float))
        for bound in self.bounds:
            keep &= bound.holds(columns[bound.score])
        return keep

    def choose(self, columns: Mapping[str, np.ndarray]) -> int | None:
        """Index of the passing row with the lowest ``minimize`` score (the first on ties), or ``None``."""
        keep = self.mask(columns)
        if not keep.any():
            return None
        return int(np.argmin(np.where(keep, np.asarray(columns[self.minimize], dtype=float), np.inf)))

    def passes(self, scores: Mapping[str, float]) -> bool:
        """One candidate's scores (a missing or NaN score fails)."""
        return bool(self.mask({name: np.array([_get(scores, name)]) for name in self.required})[0])

    def could_pass(self, scores: Mapping[str, float]) -> bool:
        """Whether every bound on a score already computed holds (the others may still)."""
        return all(bool(b.holds(np.array([_get(scores, b.score)]))[0]) for b in self.bounds if _known(scores, b.score))


def _get(scores: Mapping[str, float], name: str) -> float:
    value = scores.get(name, math.nan)
    return math.nan if value is None else float(value)


def _known(scores: Mapping[str, float], name: str) -> bool:
    return not math.isnan(_get(scores, name))


@dataclass(frozen=True)
class Thresholds:
    """The filters a selection ran with, resolved to numbers before any candidate was scored.

    Attributes:
        keep: the rule (:class:`Rule`).
        fallback: the rule tried when nothing passes ``keep``, or ``None`` (stop, as the papers).
        kl_max: the KL limit in nats (also one of ``keep``'s bounds).
        kl_rule: how ``kl_max`` was set: ``"0.1"`` (absolute, as given) or ``"null:0.5"`` (that quantile of
            the random-direction null).
        max_layer: candidates come from layers ``< max_layer`` (:func:`max_candidate_layer`).
    """

    keep: Rule
    fallback: Rule | None
    kl_max: float
    kl_rule: str
    max_layer: int

    def bound(self, score: str) -> float:
        """The value of ``keep``'s bound on ``score``."""
        return next(b.value for b in self.keep.bounds if b.score == score)

    def describe(self) -> str:
        bounds = [b.describe() + (f" ({self.kl_rule})" if b.score == "kl" else "") for b in self.keep.bounds]
        return ", ".join([*bounds, f"layer < {self.max_layer}"])

    def choose(self, columns: Mapping[str, np.ndarray]) -> tuple[int | None, str | None]:
        """The row ``keep`` picks, else the fallback's, and the text of the rule that picked it."""
        for rule in (self.keep, self.fallback):
            index = None if rule is None else rule.choose(columns)
            if index is not None:
                return index, rule.text
        return None, None

    def choose_row(self, rows: Sequence[Mapping[str, float]]) -> tuple[int | None, str | None]:
        """:meth:`choose` over rows of scores (a missing score is not scored)."""
        names = {*self.keep.required, *(self.fallback.required if self.fallback else ())}
        return self.choose({name: np.array([_get(row, name) for row in rows]) for name in names})

    def could_be_picked(self, scores: Mapping[str, float]) -> bool:
        """Whether the scores computed so far leave the candidate a chance under ``keep`` or the fallback."""
        return self.keep.could_pass(scores) or (self.fallback is not None and self.fallback.could_pass(scores))

    def reason(self, scores: Mapping[str, float], *, unscored: str) -> str:
        """Why a candidate is not kept (``"kept"`` when it is): the bounds it fails and the scores it lacks;
        ``unscored`` when it fails none it was scored on (it was left unscored because it could not win)."""
        problems = [b.why_not() for b in self.keep.bounds
                    if _known(scores, b.score) and not b.holds(np.array([_get(scores, b.score)]))[0]]
        missing = [_label(name) for name in self.keep.required if not _known(scores, name)]
        if missing and not problems:
            return unscored
        if missing:
            problems.append(f"{' and '.join(missing)} not scored")
        return "; ".join(problems) or "kept"

    def summary(self) -> dict:
        """JSON: ``kl_max``, ``kl_rule``, ``max_layer``, each bound of ``keep`` by its :attr:`Bound.key`,
        ``fallback`` (its name or ``None``) and the fallback's bounds as ``fallback_<key>``."""
        out = {b.key: b.value for b in self.keep.bounds}
        out.update(kl_max=self.kl_max, kl_rule=self.kl_rule, max_layer=self.max_layer,
                   fallback=None if self.fallback is None else self.fallback.name)
        if self.fallback is not None:
            out.update({f"fallback_{b.key}": b.value for b in self.fallback.bounds})
        return out


def check_fallback(fallback: str | None) -> None:
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose None (stop, as the paper) or one of {FALLBACKS}")


def max_candidate_layer(n_layers: int, max_layer_frac: float = 0.8) -> int:
    """Candidates come from layers ``< int(max_layer_frac * n_layers)``: the paper's ``prune_layer_percentage``
    filter (``layer >= int(n_layer * (1.0 - 0.2))`` is discarded), e.g. 14 of 18 layers, 19 of 24, 25 of 32."""
    return int(max_layer_frac * n_layers)


def candidate_sites(directions: Directions, max_layer: int) -> list[tuple[int, int]]:
    """Tensor indices ``(p, l)`` of the valid candidates below ``max_layer``, position-major; raises when the
    candidates do not come from ``resid_pre`` (where the selections intervene) or none is left."""
    if directions.hook != "resid_pre":
        raise ValueError(f"selection ablates and adds at resid_pre; these candidates come from {directions.hook!r}")
    sites = [(p, l) for p in range(len(directions.positions)) for l, layer in enumerate(directions.layers)
             if directions.valid[p, l] and layer < max_layer]
    if not sites:
        raise ValueError(f"no valid candidate below layer {max_layer}: check the candidates' layers")
    return sites


def rule_table(rows: Sequence[Mapping], thresholds: Thresholds, *, columns: Sequence[str],
               unscored: str) -> pd.DataFrame:
    """One row per candidate: the columns given in ``rows`` (NaN where a score is missing), ``kept`` (passes
    ``thresholds.keep``) and ``reason`` (:meth:`Thresholds.reason`; a ``reason`` already in a row, e.g.
    ``"layer filter"``, is kept)."""
    records = []
    for row in rows:
        record = dict(row)
        record["kept"] = thresholds.keep.passes(row)
        record.setdefault("reason", thresholds.reason(row, unscored=unscored))
        records.append(record)
    return pd.DataFrame(records).reindex(columns=list(columns))
