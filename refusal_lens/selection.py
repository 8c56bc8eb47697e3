"""Choosing the refusal direction among the candidates, as the paper does.

For each candidate r[pos, layer] three scores on validation prompts:

* ``bypass``: mean refusal score on harmful prompts with the unit direction
  ablated everywhere (lower = ablation removes refusal better);
* ``induce``: mean refusal score on harmless prompts with the raw vector added
  at its layer (higher = addition induces refusal);
* ``kl``: mean KL(unmodified || ablated) of the next-token distribution on
  harmless prompts (lower = ablation leaves other behaviour alone).

The rule is the paper's (``select_direction.py`` in ``andyrdt/refusal_direction``):
a candidate is kept when ``induce >= induce_min`` (0), ``kl <= kl_max`` (0.1
nats) and its layer is below ``int(max_layer_frac * n_layers)`` (0.8), and the
kept candidate with the lowest bypass wins. When none is kept the paper's code
stops, and so does :meth:`Selection.pick`, with an error that lists the closest
candidates. Two named deviations, both off by default and recorded on the result:

* ``kl_max="null:q"``: the KL threshold is the ``q``-quantile of the KL of
  ablating random unit directions on the same harmless prompts
  (:mod:`refusal_lens.kl_null`; the paper's absolute 0.1 nats was set on models
  2048-8192 wide). The null is computed before any candidate is scored, from
  random directions only, so no candidate's score can move it.
* ``fallback="lowest-kl"``: when no candidate passes, take the lowest-KL
  candidate among those that bypass (``bypass < 0``: harmful prompts no longer
  more likely refused than not) and induce (``induce >= induce_min``). It never
  ignores KL, and the result says that the fallback produced the pick.

The rule, its fallback and the table are :mod:`refusal_lens.rule`'s, the scoring
:mod:`refusal_lens.scorer`'s; this module adds the three scores and the order in
which they are computed.

Speed: prompts are tokenized once and the unmodified runs happen once; the
layer filter drops candidates before any scoring; only the last position is
unembedded. Induce starts its forward pass at the intervention layer from the
block inputs recorded during the unmodified harmless run (checked once against
a full pass; where the model's blocks cannot be replayed, full passes are used).
Scores are computed lazily: the winner needs all three, any other candidate
only the cheapest proof that it cannot win, either a failed induce or a bypass
above the winner's. When most candidates induce refusal (measured on a few
probes), bypass is scored for every candidate and induce and KL only for the
``finalists``, taken in order of bypass until at least ``n_finalists`` are
judged and one passes; when few do, induce goes first and only the candidates
that pass it are scored further. When nothing passes, every candidate that the
fallback could take has been fully scored by then. Either way the pick is
exactly what scoring everything would give (``full_table=True`` scores all
three for every candidate, for plots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from . import kl_null
from .directions import Directions
from .interventions import ablate, add
from .kl_null import check_kl_max, random_direction_kl, resolve_kl_max
from .models import Model
from .rule import (
    Bound,
    Rule,
    SelectionError,
    Thresholds,
    candidate_sites,
    check_fallback,
    max_candidate_layer,
    rule_table,
)
from .scorer import Scorer

__all__ = ["select_direction", "Selection", "SelectionError", "Thresholds", "random_direction_kl",
           "max_candidate_layer", "refusal_thresholds", "check_kl_max", "resolve_kl_max", "PAPER_RULE",
           "FALLBACK_RULE"]

# Induce is scored first for every candidate when fewer than this share of the probes pass it.
_INDUCE_FIRST_BELOW = 0.5
_N_PROBES = 8
PAPER_RULE = "paper: lowest bypass among candidates with induce >= min, KL <= max, layer < int(0.8 L)"
FALLBACK_RULE = "fallback lowest-kl: lowest KL among candidates with bypass < 0 and induce >= min"
_SCORES = ("bypass", "induce", "kl")
_COLUMNS = ("pos", "layer", *_SCORES, "scored", "kept", "reason")
_UNSCORED = "not a finalist (higher bypass than the winner)"


def refusal_thresholds(*, kl_max: float, kl_rule: str, induce_min: float, max_layer: int,
                       fallback: str | None) -> Thresholds:
    """The paper's rule (lowest ``bypass`` with ``induce >= induce_min`` and ``kl <= kl_max``) and, with
    ``fallback="lowest-kl"``, the lowest ``kl`` with ``bypass < 0`` and ``induce >= induce_min``."""
    check_fallback(fallback)
    keep = Rule("paper", PAPER_RULE, (Bound("induce", ">=", induce_min), Bound("kl", "<=", kl_max)), "bypass")
    lowest_kl = Rule("lowest-kl", FALLBACK_RULE, (Bound("bypass", "<", 0.0), Bound("induce", ">=", induce_min)), "kl")
    return Thresholds(keep, lowest_kl if fallback else None, kl_max, kl_rule, max_layer)


@dataclass
class Selection:
    """Result of :func:`select_direction`.

    Attributes:
        table: one row per candidate: ``pos``, ``layer``, ``bypass``, ``induce``, ``kl``
            (NaN where not scored), ``scored`` (judged against the filters: induce computed, and KL
            when induce passed or ``full_table``), ``kept`` (passes the filters), ``reason``.
        best: ``(pos, layer)`` chosen by :attr:`rule`, or ``None``.
        rule: which rule produced ``best`` (:data:`PAPER_RULE` or :data:`FALLBACK_RULE`), or ``None``.
        thresholds: the filters, resolved (:class:`~refusal_lens.rule.Thresholds`).
        baseline: mean refusal score of the harmful and harmless prompts, unmodified.
        win_rate: share of bootstrap resamples of the val prompts in which the same rule picks
            ``best`` again (among the scored candidates; the thresholds stay fixed), or ``None``.
        null_kl: mean KL of each random unit direction ablated on the harmless prompts (the
            threshold's null), when computed.
        directions: the candidates that were scored.
    """

    table: pd.DataFrame
    best: tuple[int, int] | None
    rule: str | None
    thresholds: Thresholds
    baseline: dict[str, float]
    win_rate: float | None
    null_kl: Float[Tensor, " n_directions"] | None
    directions: Directions

    def pick(self) -> tuple[int, int]:
        """``best``, or :class:`SelectionError` naming the closest candidates and the options."""
        if self.best is None:
            raise SelectionError(self.failure_message())
        return self.best

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        """Unit vector of the chosen candidate (float64)."""
        return self.directions.direction(*self.pick())

    @property
    def vector(self) -> Float[Tensor, " d_model"]:
        """Raw difference-in-means vector of the chosen candidate (for activation addition)."""
        return self.directions.vector(*self.pick())

    @property
    def best_row(self) -> pd.Series:
        pos, layer = self.pick()
        return self.table[(self.table.pos == pos) & (self.table.layer == layer)].iloc[0]

    def failure_message(self, n_closest: int = 5) -> str:
        """Why nothing was picked: the thresholds, the closest candidates and what to do."""
        scored = self.table[self.table.scored]
        inducing = scored[scored.induce >= self.thresholds.bound("induce")].sort_values("kl")
        closest = (inducing if len(inducing) else scored.sort_values("induce", ascending=False)).head(n_closest)
        rows = "; ".join(f"pos {int(r.pos)} layer {int(r.layer)}: bypass {r.bypass:.2f}, induce {r.induce:.2f}, "
                         f"KL {r.kl:.3f}" for r in closest.itertuples())
        fallback = self.thresholds.fallback
        fallback = (f" The fallback {fallback.name!r} found no candidate with bypass < 0 and induce >= min either."
                    if fallback else "")
        return (
            f"no candidate passed the paper's filters ({self.thresholds.describe()}).{fallback} Closest "
            f"{'by KL among those that induce refusal' if len(inducing) else 'by induce'}: {rows or 'none scored'}. "
            "Options: kl_max='null:0.5' (a KL threshold at the median of random directions' KL, "
            "fixed before scoring; `refusal-lens run --kl-max null:0.5`), fallback='lowest-kl' "
            "(`--fallback lowest-kl`), or a looser kl_max / induce_min; see selection.csv."
        )


class _CandidateScores:
    """Per-prompt scores of the candidates, each computed on first request and kept."""

    def __init__(self, model: Model, directions: Directions, harmful: Scorer, harmless: Scorer):
        self.model, self.directions, self.harmful, self.harmless = model, directions, harmful, harmless
        self.unit = directions.unit()
        self.per_prompt: dict[tuple[int, int], dict[str, Tensor]] = {}

    def mean(self, name: str, p: int, l: int) -> float:
        """Score ``name`` (bypass, induce or kl) of candidate ``(p, l)`` (tensor indices), mean over prompts."""
        scores = self.per_prompt.setdefault((p, l), {})
        if name not in scores:
            scores[name] = self._compute(name, p, l)
        return float(scores[name].mean())

    def known(self, p: int, l: int) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.per_prompt.get((p, l), {}).items()}

    def _compute(self, name: str, p: int, l: int) -> Float[Tensor, " prompt"]:
        if name == "induce":
            layer = self.directions.layers[l]
            return self.harmless.refusal(add(self.model, self.directions.vectors[p, l], layer=layer).hooks,
                                         from_layer=layer)
        ablation = ablate(self.model, self.unit[p, l]).hooks
        return self.harmful.refusal(ablation) if name == "bypass" else self.harmless.kl(ablation)


def _score_lazily(scores: _CandidateScores, candidates: list[tuple[int, int]], thresholds: Thresholds, *,
                  n_finalists: int, full_table: bool, show: bool) -> None:
    """Compute the scores the pick needs (all of them with ``full_table``), cheapest proof first.

    The winner needs all three scores; any other candidate only needs the cheapest proof that it cannot
    win: a failed induce (a replay from its layer, ~1 - layer/L of a pass), or a bypass above the winner's
    (a full pass). Induce on a spread of probes estimates how often induce passes; if rarely, induce goes
    first for every candidate and only those that pass get bypass. When nothing passes, the loop below
    visits every contender, so each candidate the fallback could take has all three scores.
    """
    def induces(c: tuple[int, int]) -> bool:
        return scores.mean("induce", *c) >= thresholds.bound("induce")

    probes = [candidates[i] for i in np.linspace(0, len(candidates) - 1, min(_N_PROBES, len(candidates))).astype(int)]
    induce_first = full_table or float(np.mean([induces(c) for c in probes])) < _INDUCE_FIRST_BELOW
    if induce_first:
        for c in tqdm(candidates, disable=not show, desc="induce scores", unit="candidate"):
            scores.mean("induce", *c)
    contenders = [c for c in candidates if full_table or not induce_first or induces(c)]
    for c in tqdm(contenders, disable=not show, desc="bypass scores", unit="candidate"):
        scores.mean("bypass", *c)
    judged, passed = 0, 0
    for c in tqdm(sorted(contenders, key=lambda c: scores.mean("bypass", *c)), disable=not show,
                  desc="finalists (induce, KL)", unit="candidate"):
        if not full_table and judged >= n_finalists and passed:
            break
        if full_table or induces(c):
            scores.mean("kl", *c)
        judged += 1
        passed += thresholds.keep.passes(scores.known(*c))


def _table(scores: _CandidateScores, thresholds: Thresholds) -> pd.DataFrame:
    """Every candidate, including the zero-norm ones and those above the layer filter."""
    directions, rows = scores.directions, []
    induce_min = thresholds.bound("induce")
    for p, pos in enumerate(directions.positions):
        for l, layer in enumerate(directions.layers):
            known = scores.known(p, l)
            judged = "induce" in known and ("kl" in known or not known["induce"] >= induce_min)
            row = {"pos": pos, "layer": layer, **known, "scored": judged}
            if not directions.valid[p, l]:
                row["reason"] = "zero-norm candidate"
            elif layer >= thresholds.max_layer:
                row["reason"] = "layer filter"
            rows.append(row)
    return rule_table(rows, thresholds, columns=_COLUMNS, unscored=_UNSCORED)


def select_direction(
    model: Model,
    directions: Directions,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    kl_max: float | str = 0.1,
    max_layer_frac: float = 0.8,
    induce_min: float = 0.0,
    fallback: str | None = None,
    n_null: int = 0,
    n_finalists: int = 8,
    full_table: bool = False,
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
) -> Selection:
    """Score the candidates of ``directions`` on validation prompts and pick the refusal direction.

    Args:
        kl_max: the KL filter: nats (the paper's 0.1), or ``"null:q"`` for the ``q``-quantile of the
            random-direction null (computed first, from ``n_null`` directions, 16 if ``n_null`` is 0).
        max_layer_frac: candidates from layers ``< int(max_layer_frac * n_layers)``, as the paper.
        induce_min: the induce filter (mean refusal score with the vector added >= this).
        fallback: ``None`` (the paper: no pick when nothing passes) or ``"lowest-kl"``.
        n_null: random directions for the KL null (reported in ``null_kl``; 0: none unless ``kl_max`` needs it).
        n_finalists, full_table: how much to score beyond what the pick needs (see the module docstring).
        n_boot, seed: bootstrap resamples of the val prompts for ``win_rate`` (0: skipped).

    Memory: for the induce replay, the harmless val prompts' block inputs are kept from the first
    candidate layer on, ``n_harmless x seq x d_model`` values per layer in the model's dtype (e.g.
    Qwen-1.8B, 32 prompts of 64 tokens, 24 layers, bf16: about 200 MB on the model's device).
    """
    check_fallback(fallback)
    n_null = kl_null.null_size(kl_max, n_null)
    harmful, harmless = Scorer(model, harmful_val, batch_size), Scorer(model, harmless_val, batch_size)
    max_layer = max_candidate_layer(model.cfg.n_layers, max_layer_frac)
    candidates = candidate_sites(directions, max_layer)
    harmless.enable_replay(min(directions.layers[l] for _, l in candidates))
    show = (len(candidates) >= 8) if progress is None else progress
    # The null comes first, from random directions only: no candidate has been scored yet.
    null_kl = kl_null.null_kl(model, harmless, n_null, seed, progress=show) if n_null else None
    kl_limit, kl_rule = resolve_kl_max(kl_max, null_kl)
    thresholds = refusal_thresholds(kl_max=kl_limit, kl_rule=kl_rule, induce_min=induce_min, max_layer=max_layer,
                                    fallback=fallback)
    baseline = {"harmful": float(harmful.refusal().mean()), "harmless": float(harmless.refusal().mean())}
    scores = _CandidateScores(model, directions, harmful, harmless)
    _score_lazily(scores, candidates, thresholds, n_finalists=n_finalists, full_table=full_table, show=show)
    index, rule = thresholds.choose(_mean_scores(scores, candidates))
    best = None if index is None else (directions.positions[candidates[index][0]],
                                       directions.layers[candidates[index][1]])
    win_rate = _bootstrap_win_rate(scores, candidates, index, thresholds, n_boot, seed) if best and n_boot else None
    return Selection(_table(scores, thresholds), best, rule, thresholds, baseline, win_rate, null_kl, directions)


def _mean_scores(scores: _CandidateScores, candidates: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Mean bypass, induce and KL of each candidate (NaN where not scored)."""
    known = [scores.known(*c) for c in candidates]
    return {name: np.array([k.get(name, math.nan) for k in known]) for name in _SCORES}


def _bootstrap_win_rate(scores: _CandidateScores, candidates: list[tuple[int, int]], best: int,
                        thresholds: Thresholds, n_boot: int, seed: int) -> float:
    """Share of val-prompt resamples in which the same rule (same thresholds) picks candidate ``best`` again.

    A score that was not computed for a candidate (it was ruled out more cheaply) counts as failing.
    """
    rng = np.random.default_rng(seed)
    n = {"bypass": scores.harmful.n_prompts, "induce": scores.harmless.n_prompts, "kl": scores.harmless.n_prompts}
    per_prompt = {name: np.stack([scores.per_prompt.get(c, {}).get(name, torch.full((n[name],), math.nan)).numpy()
                                  for c in candidates]) for name in _SCORES}
    wins = 0
    for _ in range(n_boot):
        i = rng.integers(0, n["bypass"], n["bypass"])
        j = rng.integers(0, n["induce"], n["induce"])
        index, _ = thresholds.choose({"bypass": per_prompt["bypass"][:, i].mean(1),
                                      "induce": per_prompt["induce"][:, j].mean(1),
                                      "kl": per_prompt["kl"][:, j].mean(1)})
        wins += index == best
    return wins / n_boot
