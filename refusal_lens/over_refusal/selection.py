"""Choosing the false-refusal direction's site and ``orthogonalize`` share on validation prompts.

The paper's ``"ablation"`` mode as a configuration of :mod:`refusal_lens.rule`: with a candidate ablated at
every layer, the lowest ``false_refusal`` (mean refusal score of the look-risky prompts) among candidates with
``kl <= kl_max`` and a layer below ``int(0.8 L)``, plus two bounds of ours (``false_refusal`` below the
unablated one, ``harmful_kept >= keep_harmful``) and the optional ``"lowest-kl"`` fallback. Scoring goes
through one :class:`~refusal_lens.scorer.Scorer` per prompt set; the KL null is :mod:`refusal_lens.kl_null`'s.

Order of work: every site gets its false-refusal score (one pass over the look-risky prompts); then, in order
of that score, sites get ``harmful_kept`` and KL until one passes (only sites that could still be picked, by
the rule or the fallback); then the other ``orthogonalize`` shares at the winning site, by the same rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import kl_null, rule
from ..directions import Directions
from ..interventions import ablate
from ..models import Model
from ..rule import Thresholds
from ..scorer import Scorer
from .candidates import PAPER_ORTHOGONALIZE, candidate_vector, check_orthogonalize, refusal_cosines, unit_refusal

__all__ = ["PAPER_KL_MAX", "MAX_LAYER_FRAC", "KEEP_HARMFUL", "PAPER_RULE", "FALLBACK_RULE", "FalseRefusalSelection",
           "select_false_refusal", "false_refusal_thresholds"]

# The paper's constants (mainlp/False-Refusal-Mitigation, configs/cfg.yaml): ablate_kl_threshold and the layer
# filter of select_direction (prune_layer_percentage = 0.2).
PAPER_KL_MAX = 0.2
MAX_LAYER_FRAC = 0.8
# Ours: a candidate must keep this share of the harmful val prompts refused (the acceptance floor on test); fixed
# before the over-refusal set's `holdout` split was written, which judges it.
KEEP_HARMFUL = 0.90
PAPER_RULE = ("paper (ablation mode): lowest false-refusal score among candidates with KL <= max and layer "
              "< int(0.8 L); ours: it lowers the false-refusal score and harmful_kept >= min")
FALLBACK_RULE = ("fallback lowest-kl: lowest KL among candidates with layer < int(0.8 L), harmful_kept >= min "
                 "and at most half the baseline share of look-risky prompts with refusal score > 0")
_COLUMNS = ("pos", "layer", "orthogonalize", "stage", "cosine", "false_refusal", "look_risky_refusing",
            "harmful_score", "harmful_kept", "kl", "kl_null_quantile", "kept", "chosen", "reason")
_UNSCORED = "not scored further (it cannot be the pick)"


@dataclass
class FalseRefusalSelection:
    """Result of :func:`select_false_refusal`.

    Attributes:
        table: one row per scored ``(pos, layer, orthogonalize)``: ``cosine`` (raw candidate vs the refusal
            direction), ``false_refusal`` (mean refusal score of the look-risky val prompts with the
            candidate ablated, nats; lower is better), ``look_risky_refusing`` (share of them with
            score > 0), ``harmful_score`` (mean, harmful val prompts), ``harmful_kept`` (share of harmful
            prompts still > 0 over the share without ablation), ``kl`` (mean KL on harmless val prompts,
            nats; NaN where not needed), ``kl_null_quantile`` (share of random directions with lower
            KL), ``stage`` (``"site"`` or ``"orthogonalize"``), ``kept``, ``chosen``, ``reason``.
        best: ``(pos, layer, orthogonalize)`` of the pick, or ``None``.
        rule: which rule produced ``best`` (:data:`PAPER_RULE` or :data:`FALLBACK_RULE`), or ``None``.
        thresholds: the filters, fixed before scoring (:class:`~refusal_lens.Thresholds`).
        baseline: unablated val scores: ``false_refusal``, ``look_risky_refusing``, ``harmful_score``,
            ``harmful_refusing``.
        null_kl: mean KL of each random unit direction ablated on the harmless val prompts.
        candidates: the raw look-risky minus harmless candidates.
        refusal_direction: the unit refusal direction the candidates were orthogonalized against.
        orthogonalize: the shares tried (the first at every site, the others at the winning site).
    """

    table: pd.DataFrame
    best: tuple[int, int, float] | None
    rule: str | None
    thresholds: Thresholds
    baseline: dict
    null_kl: Float[Tensor, " n_null"] | None
    candidates: Directions
    refusal_direction: Float[Tensor, " d_model"]
    orthogonalize: tuple[float, ...] = (PAPER_ORTHOGONALIZE,)

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        """The chosen false-refusal unit vector (float64, CPU); :class:`SelectionError` when there is none."""
        if self.best is None:
            raise rule.SelectionError("no false-refusal candidate passed the filters; see .table (reason) and "
                                 ".thresholds, or select with fallback='lowest-kl'")
        return candidate_vector(self.candidates, self.refusal_direction, *self.best)

    @property
    def best_row(self) -> pd.Series:
        pos, layer, share = self.best
        table = self.table
        return table[(table.pos == pos) & (table.layer == layer) & (table.orthogonalize == share)].iloc[0]


def false_refusal_thresholds(baseline: dict, *, keep_harmful: float, kl_max: float, kl_rule: str, max_layer: int,
                             fallback: str | None) -> Thresholds:
    """The rule (module docstring) with bounds from the unablated val ``baseline``."""
    keep = rule.Rule("paper", PAPER_RULE, (
        rule.Bound("false_refusal", "<", baseline["false_refusal"], failure="does not lower the false-refusal score"),
        rule.Bound("harmful_kept", ">=", keep_harmful), rule.Bound("kl", "<=", kl_max)), "false_refusal")
    lowest_kl = rule.Rule("lowest-kl", FALLBACK_RULE, (
        rule.Bound("harmful_kept", ">=", keep_harmful),
        rule.Bound("look_risky_refusing", "<=", 0.5 * baseline["look_risky_refusing"])), "kl")
    return Thresholds(keep, lowest_kl if fallback else None, kl_max, kl_rule, max_layer)


@dataclass
class _Entries:
    """The entries scored so far, one per ``(pos, layer, orthogonalize, stage)``, and how to score more lazily."""

    model: Model
    scorers: dict[str, Scorer]
    candidates: Directions
    refusal_unit: Tensor
    cosine: pd.Series
    thresholds: Thresholds
    baseline: dict
    progress: bool | None
    rows: dict = field(default_factory=dict)

    def row(self, pos: int, layer: int, share: float, stage: str) -> dict:
        key = (pos, layer, share, stage)
        if key not in self.rows:
            self.rows[key] = {"pos": pos, "layer": layer, "orthogonalize": share, "stage": stage,
                              "cosine": float(self.cosine[(pos, layer)]),
                              "vector": candidate_vector(self.candidates, self.refusal_unit, pos, layer, share)}
        return self.rows[key]

    def fill(self, entry: dict, name: str) -> None:
        """Score ``name`` (``false_refusal``, ``harmful_kept`` or ``kl``) for ``entry`` unless it already is."""
        if name in entry:
            return
        hooks = ablate(self.model, entry["vector"]).hooks
        if name == "false_refusal":
            values = self.scorers["look_risky"].refusal(hooks)
            entry.update(false_refusal=float(values.mean()), look_risky_refusing=float((values > 0).double().mean()))
        elif name == "harmful_kept":
            values = self.scorers["harmful"].refusal(hooks)
            entry.update(harmful_score=float(values.mean()),
                         harmful_kept=float((values > 0).double().mean()) / self.baseline["harmful_refusing"])
        else:
            entry["kl"] = float(self.scorers["harmless"].kl(hooks).mean())

    def score_stage(self, entries: list[dict], *, everything: bool) -> None:
        """False-refusal scores for all ``entries``; harmful and KL scores in order of false-refusal score until
        one passes (``everything``: for all)."""
        show = (len(entries) >= 8) if self.progress is None else self.progress
        for entry in tqdm(entries, disable=not show, desc="false-refusal scores", unit="candidate"):
            self.fill(entry, "false_refusal")
        found = False
        for entry in sorted(entries, key=lambda e: e["false_refusal"]):
            if not everything and (found or not self.thresholds.could_be_picked(entry)):
                if found:  # the first passing entry in this order is the pick
                    break
                continue
            self.fill(entry, "harmful_kept")
            if everything or self.thresholds.could_be_picked(entry):
                self.fill(entry, "kl")
            found = found or self.thresholds.keep.passes(entry)

    def table(self, null_kl: Tensor | None, best: tuple | None) -> pd.DataFrame:
        rows = []
        for entry in self.rows.values():
            row = {k: v for k, v in entry.items() if k != "vector"}
            if null_kl is not None and "kl" in entry:
                row["kl_null_quantile"] = kl_null.share_below(null_kl, entry["kl"])
            row["chosen"] = best is not None and (entry["pos"], entry["layer"], entry["orthogonalize"]) == best
            rows.append(row)
        return rule.rule_table(rows, self.thresholds, columns=_COLUMNS, unscored=_UNSCORED)


def _checked_shares(orthogonalize: Sequence[float], lambdas: Sequence[float] | None) -> list[float]:
    if lambdas is not None:
        warnings.warn("select_false_refusal(lambdas=...) is deprecated; use orthogonalize=...", DeprecationWarning,
                      stacklevel=3)
        orthogonalize = lambdas
    shares = [check_orthogonalize(share) for share in orthogonalize]
    if not shares:
        raise ValueError("orthogonalize is empty: pass at least one share in [0, 1], e.g. (1.0,)")
    return shares


def _baseline(scorers: dict[str, Scorer]) -> dict:
    """Unablated val scores; raises when the model refuses none of the harmful prompts."""
    look_risky, harmful = scorers["look_risky"].refusal(), scorers["harmful"].refusal()
    baseline = {"false_refusal": float(look_risky.mean()),
                "look_risky_refusing": float((look_risky > 0).double().mean()),
                "harmful_score": float(harmful.mean()), "harmful_refusing": float((harmful > 0).double().mean())}
    if baseline["harmful_refusing"] == 0:
        raise ValueError("the model refuses none of the harmful val prompts (refusal score > 0): there is no true "
                         "refusal to keep; over-refusal selection needs a refusing chat model")
    return baseline


def select_false_refusal(
    model: Model,
    candidates: Directions,
    *,
    refusal_direction: Float[Tensor, " d_model"],
    look_risky: Sequence[str],
    harmful: Sequence[str],
    harmless: Sequence[str],
    orthogonalize: Sequence[float] = (PAPER_ORTHOGONALIZE,),
    keep_harmful: float = KEEP_HARMFUL,
    kl_max: float | str = PAPER_KL_MAX,
    max_layer_frac: float = MAX_LAYER_FRAC,
    fallback: str | None = None,
    n_null: int = 16,
    full_table: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
    lambdas: Sequence[float] | None = None,
) -> FalseRefusalSelection:
    """Choose the false-refusal direction's position, layer and ``orthogonalize`` share on validation prompts.

    Rule (see the module docstring): with the candidate ``unit(w - orthogonalize (w·r̂) r̂)`` ablated at every
    layer, it is kept when its layer is below ``int(max_layer_frac * n_layers)``, it lowers the false-refusal score
    (mean refusal score of ``look_risky``) below the unablated one, its ``harmful_kept >= keep_harmful`` and
    its mean KL on ``harmless`` is ``<= kl_max``; the kept candidate with the lowest false-refusal score
    wins. Sites are scored at ``orthogonalize[0]``; then every share in ``orthogonalize`` at the winning site, by
    the same rule. When nothing is kept: no pick, or with ``fallback="lowest-kl"`` the lowest-KL candidate among
    those below the layer limit with ``harmful_kept >= keep_harmful`` that at least halve the share of
    ``look_risky`` prompts with a refusal score > 0.

    Args:
        candidates: raw look-risky minus harmless differences (``rl.diff_in_means`` on the train split).
        refusal_direction: ``[d_model]``, the refusal direction to preserve (any norm).
        look_risky: the look-risky val instructions whose refusals are to go: those the model falsely
            refuses (:func:`~refusal_lens.over_refusal.false_refusals`), as the paper's pseudo-harmful prompts
            are refused ones.
        harmful, harmless: val instructions (harmful ones with refusals to keep; plain harmless for KL).
        orthogonalize: the shares of the refusal component to remove, each in [0, 1] (``lambdas``: deprecated).
        keep_harmful: the true-refusal filter (share of the harmful prompts' refusals kept, in (0, 1]).
        kl_max: nats (the paper's 0.2), or ``"null:q"``: that quantile of the random-direction null.
        fallback: ``None`` (no pick when nothing passes, as the paper) or ``"lowest-kl"``.
        n_null: random directions for the KL null on ``harmless`` (0: none unless ``kl_max`` needs it).
        full_table: score every site fully (for plots); otherwise harmful and KL only as the pick needs.

    Cost: one forward pass over ``look_risky`` per site, plus passes over ``harmful`` and ``harmless``
    for the sites in order of false-refusal score until one passes (with a fallback and nothing passing:
    every site that could be its pick; every site with ``full_table``), plus ``n_null`` passes over
    ``harmless`` and three passes per extra share.
    """
    rule.check_fallback(fallback)
    if not 0 < keep_harmful <= 1:
        raise ValueError(f"keep_harmful must lie in (0, 1], got {keep_harmful}")
    shares, n_null = _checked_shares(orthogonalize, lambdas), kl_null.null_size(kl_max, n_null)
    r = unit_refusal(refusal_direction, model.cfg.d_model)
    max_layer = rule.max_candidate_layer(model.cfg.n_layers, max_layer_frac)
    sites = [(candidates.positions[p], candidates.layers[l]) for p, l in rule.candidate_sites(candidates, max_layer)]
    scorers = {name: Scorer(model, prompts, batch_size)
               for name, prompts in (("look_risky", look_risky), ("harmful", harmful), ("harmless", harmless))}
    baseline = _baseline(scorers)
    # The null comes first, from random directions only: no candidate has been scored yet.
    null_kl = kl_null.null_kl(model, scorers["harmless"], n_null, seed) if n_null else None
    kl_limit, kl_rule = kl_null.resolve_kl_max(kl_max, null_kl)
    thresholds = false_refusal_thresholds(baseline, keep_harmful=keep_harmful, kl_max=kl_limit, kl_rule=kl_rule,
                                          max_layer=max_layer, fallback=fallback)
    cosine = refusal_cosines(candidates, r).set_index(["pos", "layer"]).cosine
    entries = _Entries(model, scorers, candidates, r, cosine, thresholds, baseline, progress)
    site_entries = [entries.row(pos, layer, shares[0], "site") for pos, layer in sites]
    entries.score_stage(site_entries, everything=full_table)
    index, rule_text = thresholds.choose_row(site_entries)
    best = None
    if index is not None:
        site = site_entries[index]
        share_entries = [site] + [entries.row(site["pos"], site["layer"], s, "orthogonalize") for s in shares[1:]]
        entries.score_stage(share_entries, everything=True)
        index, rule_text = thresholds.choose_row(share_entries)
        chosen = share_entries[index]
        best = (int(chosen["pos"]), int(chosen["layer"]), float(chosen["orthogonalize"]))
    return FalseRefusalSelection(entries.table(null_kl, best), best, rule_text if best else None, thresholds, baseline,
                                 null_kl, candidates, r, tuple(shares))
