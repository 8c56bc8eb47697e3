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
  ablating random unit directions on the same harmless prompts (see
  :func:`random_direction_kl`). The paper's absolute 0.1 nats was set on models
  2048-8192 wide; on a 576-wide model the median random direction already moves
  the next token by about 0.1 nats. The null is computed before any candidate
  is scored, from random directions only, so no candidate's score can move it.
* ``fallback="lowest-kl"``: when no candidate passes, take the lowest-KL
  candidate among those that bypass (``bypass < 0``: harmful prompts no longer
  more likely refused than not) and induce (``induce >= induce_min``). It never
  ignores KL, and the result says that the fallback produced the pick.

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
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .chat import check_instructions
from .directions import Directions
from .interventions import ablate, add
from .metrics import LAST_POSITION_ONLY, kl_divergence, refusal_log_odds
from .models import Model

# Induce is scored first for every candidate when fewer than this share of the probes pass it.
_INDUCE_FIRST_BELOW = 0.5
_N_PROBES = 8
FALLBACKS = ("lowest-kl",)
PAPER_RULE = "paper: lowest bypass among candidates with induce >= min, KL <= max, layer < int(0.8 L)"
FALLBACK_RULE = "fallback lowest-kl: lowest KL among candidates with bypass < 0 and induce >= min"


class SelectionError(RuntimeError):
    """No candidate passed the selection rule; the message lists the closest ones and the options.

    ``report``: the run's report as written when the main job stopped here (``None`` outside the main job).
    """

    def __init__(self, message: str, *, report: dict | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Thresholds:
    """The filters a selection ran with, resolved to numbers.

    Attributes:
        kl_max: a candidate passes with mean KL <= this (nats).
        kl_rule: how ``kl_max`` was set: ``"0.1"`` (absolute, as given) or ``"null:0.5"``
            (that quantile of the random-direction KL null).
        induce_min: a candidate passes with mean induce score >= this (nats).
        max_layer: candidates come from layers ``< max_layer`` (``int(max_layer_frac * n_layers)``).
        fallback: ``None`` (the paper: stop when nothing passes) or ``"lowest-kl"``.
    """

    kl_max: float
    kl_rule: str
    induce_min: float
    max_layer: int
    fallback: str | None

    def describe(self) -> str:
        return (f"induce >= {self.induce_min:g}, KL <= {self.kl_max:.4g} ({self.kl_rule}), "
                f"layer < {self.max_layer}")


@dataclass
class Selection:
    """Result of :func:`select_direction`.

    Attributes:
        table: one row per candidate: ``pos``, ``layer``, ``bypass``, ``induce``, ``kl``
            (NaN where not scored), ``scored`` (judged against the filters: induce computed, and KL
            when induce passed or ``full_table``), ``kept`` (passes the filters), ``reason``.
        best: ``(pos, layer)`` chosen by :attr:`rule`, or ``None``.
        rule: which rule produced ``best`` (:data:`PAPER_RULE` or :data:`FALLBACK_RULE`), or ``None``.
        thresholds: the filters, resolved (:class:`Thresholds`).
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
        inducing = scored[scored.induce >= self.thresholds.induce_min].sort_values("kl")
        closest = (inducing if len(inducing) else scored.sort_values("induce", ascending=False)).head(n_closest)
        rows = "; ".join(f"pos {int(r.pos)} layer {int(r.layer)}: bypass {r.bypass:.2f}, induce {r.induce:.2f}, "
                         f"KL {r.kl:.3f}" for r in closest.itertuples())
        fallback = (f" The fallback {self.thresholds.fallback!r} found no candidate with bypass < 0 and "
                    "induce >= min either." if self.thresholds.fallback else "")
        return (
            f"no candidate passed the paper's filters ({self.thresholds.describe()}).{fallback} Closest "
            f"{'by KL among those that induce refusal' if len(inducing) else 'by induce'}: {rows or 'none scored'}. "
            "Options: kl_max='null:0.5' (a KL threshold at the median of random directions' KL, "
            "fixed before scoring; `refusal-lens run --kl-max null:0.5`), fallback='lowest-kl' "
            "(`--fallback lowest-kl`), or a looser kl_max / induce_min; see selection.csv."
        )


class _Scorer:
    """Last-position logits of pre-tokenized prompt batches under a list of hooks.

    ``logits(record_from=l)`` also keeps, per batch, the input of every block from ``l`` on (hidden
    states and the keyword arguments the model passed: mask, position ids, rotary tables), so that
    ``logits_from(layer)`` can run only blocks ``layer..n_layers-1``: the same result as a full pass
    whose hooks change nothing before ``resid_pre`` of ``layer``.
    """

    def __init__(self, model: Model, instructions: Sequence[str], batch_size: int):
        self.model, self.n_prompts = model, len(instructions)
        self.batches = [
            model.chat.tokenize(instructions[s : s + batch_size]) for s in range(0, len(instructions), batch_size)
        ]
        self.block_inputs: list[dict[int, tuple[Tensor, dict]]] = []

    def logits(self, hooks: Iterable = (), *, record_from: int | None = None) -> Float[Tensor, "batch d_vocab"]:
        device = self.model.cfg.device
        recorded: dict[int, tuple[Tensor, dict]] = {}

        def record(layer: int):
            def pre_hook(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
                recorded[layer] = (hidden, {**kept, "use_cache": False})
            return pre_hook

        layers = [] if record_from is None else range(record_from, self.model.cfg.n_layers)
        handles = [self.model.blocks[l].register_forward_pre_hook(record(l), with_kwargs=True) for l in layers]
        rows = []
        try:
            with torch.no_grad(), self.model.hooks(fwd_hooks=[*hooks, LAST_POSITION_ONLY]):
                for batch in self.batches:
                    out = self.model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                    rows.append(out[:, -1].float().cpu())
                    if layers:
                        self.block_inputs.append(dict(recorded))
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(rows)

    def logits_from(self, layer: int, hooks: Iterable = ()) -> Float[Tensor, "batch d_vocab"]:
        """Last-position logits from the recorded input of block ``layer`` on, with ``hooks`` active."""
        model, rows = self.model, []
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            for recorded in self.block_inputs:
                hidden = recorded[layer][0]
                for block in range(layer, model.cfg.n_layers):
                    out = model.blocks[block](hidden, **recorded[block][1])
                    hidden = out[0] if isinstance(out, tuple) else out
                rows.append(model.unembed(model.ln_final(hidden[:, -1:]))[:, -1].float().cpu())
        return torch.cat(rows)


def _replay_reproduces(scorer: _Scorer, layer: int, reference: Tensor) -> bool:
    """Whether running blocks ``layer..`` from recorded inputs gives the full pass's logits (else warn)."""
    try:
        replayed = scorer.logits_from(layer)
        error = float((replayed - reference).abs().max())
    except Exception as exc:  # an architecture whose blocks need more than their recorded inputs
        error, reason = math.inf, f"{type(exc).__name__}: {exc}"
    else:
        reason = f"max |difference| {error:.2e}"
    if error <= 1e-4 * max(1.0, float(reference.abs().max())):
        return True
    warnings.warn(f"replaying blocks from layer {layer} does not reproduce the full forward pass on this model "
                  f"({reason}); induce is scored with full forward passes instead (slower, same result)", stacklevel=3)
    return False


class _CandidateScores:
    """Per-prompt scores of the candidates, each computed on first request and kept."""

    def __init__(self, model: Model, directions: Directions, harmful: _Scorer, harmless: _Scorer,
                 harmless_reference: Tensor, replay: bool):
        self.model, self.directions = model, directions
        self.harmful, self.harmless, self.reference, self.replay = harmful, harmless, harmless_reference, replay
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
        model, tokens = self.model, self.model.chat.refusal_tokens
        if name == "induce":
            layer = self.directions.layers[l]
            addition = add(model, self.directions.vectors[p, l], layer=layer).hooks
            logits = self.harmless.logits_from(layer, addition) if self.replay else self.harmless.logits(addition)
            return refusal_log_odds(logits, tokens)
        ablation = ablate(model, self.unit[p, l]).hooks
        if name == "bypass":
            return refusal_log_odds(self.harmful.logits(ablation), tokens)
        return kl_divergence(self.reference, self.harmless.logits(ablation))


def max_candidate_layer(n_layers: int, max_layer_frac: float = 0.8) -> int:
    """Candidates come from layers ``< int(max_layer_frac * n_layers)``: the paper's ``prune_layer_percentage``
    filter (``layer >= int(n_layer * (1.0 - 0.2))`` is discarded), e.g. 14 of 18 layers, 19 of 24, 25 of 32."""
    return int(max_layer_frac * n_layers)


def _passes(scores: dict[str, float], thresholds: Thresholds) -> bool:
    """The paper's filter (NaN or a missing score fails)."""
    return (all(name in scores and not math.isnan(scores[name]) for name in ("bypass", "induce", "kl"))
            and scores["induce"] >= thresholds.induce_min and scores["kl"] <= thresholds.kl_max)


def _choose(
    bypass: np.ndarray, induce: np.ndarray, kl: np.ndarray, thresholds: Thresholds
) -> tuple[int | None, str | None]:
    """Index of the candidate the rule picks from mean scores (NaN = not scored = failing), and the rule used."""
    with np.errstate(invalid="ignore"):
        complete = np.isfinite(bypass) & np.isfinite(induce) & np.isfinite(kl)
        inducing = complete & (induce >= thresholds.induce_min)
        passing = inducing & (kl <= thresholds.kl_max)
        if passing.any():
            return int(np.argmin(np.where(passing, bypass, np.inf))), PAPER_RULE
        if thresholds.fallback == "lowest-kl":
            eligible = inducing & (bypass < 0)
            if eligible.any():
                return int(np.argmin(np.where(eligible, kl, np.inf))), FALLBACK_RULE
    return None, None


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
        return scores.mean("induce", *c) >= thresholds.induce_min

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
        passed += _passes(scores.known(*c), thresholds)


def _reason(valid: bool, layer: int, known: dict[str, float], thresholds: Thresholds) -> str:
    if not valid:
        return "zero-norm candidate"
    if layer >= thresholds.max_layer:
        return "layer filter"
    induce_fails = "induce" in known and not known["induce"] >= thresholds.induce_min
    if not induce_fails and "kl" not in known:
        return "not a finalist (higher bypass than the winner)"
    problems = [f"induce < {thresholds.induce_min:g}"] if induce_fails else []
    missing = [name for name in ("bypass", "KL") if name.lower() not in known]
    if missing:
        problems.append(f"{' and '.join(missing)} not scored")
    if "kl" in known and not known["kl"] <= thresholds.kl_max:
        problems.append(f"KL > {thresholds.kl_max:.4g}")
    return "; ".join(problems) or "kept"


def _table(scores: _CandidateScores, thresholds: Thresholds) -> pd.DataFrame:
    directions, rows = scores.directions, []
    for p, pos in enumerate(directions.positions):
        for l, layer in enumerate(directions.layers):
            known = scores.known(p, l)
            judged = "induce" in known and ("kl" in known or not known["induce"] >= thresholds.induce_min)
            rows.append({"pos": pos, "layer": layer, "bypass": known.get("bypass", math.nan),
                         "induce": known.get("induce", math.nan), "kl": known.get("kl", math.nan),
                         "scored": judged, "kept": _passes(known, thresholds),
                         "reason": _reason(bool(directions.valid[p, l]), layer, known, thresholds)})
    return pd.DataFrame(rows)


def resolve_kl_max(kl_max: float | str, null_kl: Tensor | None) -> tuple[float, str]:
    """The KL limit in nats and how it was set: ``kl_max`` itself, or the ``q`` quantile of ``null_kl``
    for ``"null:q"``."""
    if isinstance(kl_max, str):
        q = float(kl_max.removeprefix("null:"))
        return float(torch.quantile(null_kl, q)), f"null:{q:g}"
    return float(kl_max), f"{kl_max:g}"


def check_kl_max(kl_max: float | str) -> float | None:
    """The null quantile of a ``"null:q"`` threshold, ``None`` for an absolute one; raises on anything else."""
    if isinstance(kl_max, str):
        try:
            q = float(kl_max.removeprefix("null:")) if kl_max.startswith("null:") else math.nan
        except ValueError:
            q = math.nan
        if not 0 <= q <= 1:
            raise ValueError(f"kl_max={kl_max!r}: give nats (e.g. 0.1) or 'null:q' with q in [0, 1] (e.g. 'null:0.5')")
        return q
    if not kl_max > 0:
        raise ValueError(f"kl_max must be > 0 nats, got {kl_max}")
    return None


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
    if directions.hook != "resid_pre":
        raise ValueError(f"selection ablates and adds at resid_pre; these directions come from {directions.hook!r}")
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose None (the paper's: stop) or one of {FALLBACKS}")
    null_quantile = check_kl_max(kl_max)
    harmful = _Scorer(model, check_instructions(harmful_val, model.chat), batch_size)
    harmless = _Scorer(model, check_instructions(harmless_val, model.chat), batch_size)
    max_layer = max_candidate_layer(model.cfg.n_layers, max_layer_frac)
    candidates = [(p, l) for p in range(len(directions.positions)) for l, layer in enumerate(directions.layers)
                  if directions.valid[p, l] and layer < max_layer]
    if not candidates:
        raise ValueError(f"no valid candidate below layer {max_layer}: check the directions' layers")
    first_layer = min(directions.layers[l] for _, l in candidates)
    reference = harmless.logits(record_from=first_layer)
    # The null comes first, from random directions only: no candidate has been scored yet.
    n_null = n_null or (16 if null_quantile is not None else 0)
    null_kl = _null_kl(model, harmless, reference, n_null, seed) if n_null else None
    thresholds = Thresholds(*resolve_kl_max(kl_max, null_kl), induce_min, max_layer, fallback)
    replay = _replay_reproduces(harmless, first_layer, reference)
    if not replay:
        harmless.block_inputs.clear()
    tokens = model.chat.refusal_tokens
    baseline = {"harmful": float(refusal_log_odds(harmful.logits(), tokens).mean()),
                "harmless": float(refusal_log_odds(reference, tokens).mean())}
    scores = _CandidateScores(model, directions, harmful, harmless, reference, replay)
    show = (len(candidates) >= 8) if progress is None else progress
    _score_lazily(scores, candidates, thresholds, n_finalists=n_finalists, full_table=full_table, show=show)
    index, rule = _choose(*_mean_scores(scores, candidates), thresholds)
    best = None if index is None else (directions.positions[candidates[index][0]],
                                       directions.layers[candidates[index][1]])
    win_rate = _bootstrap_win_rate(scores, candidates, index, thresholds, n_boot, seed) if best and n_boot else None
    return Selection(_table(scores, thresholds), best, rule, thresholds, baseline, win_rate, null_kl, directions)


def _mean_scores(scores: _CandidateScores, candidates: list[tuple[int, int]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean bypass, induce and KL of each candidate (NaN where not scored)."""
    known = [scores.known(*c) for c in candidates]
    return tuple(np.array([k.get(name, math.nan) for k in known]) for name in ("bypass", "induce", "kl"))


def _null_kl(
    model: Model, scorer: _Scorer, reference: Tensor, n_directions: int, seed: int
) -> Float[Tensor, " n_directions"]:
    """Mean KL of ablating each of ``n_directions`` seeded random unit directions (see :func:`random_direction_kl`)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, model.cfg.d_model, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return torch.stack([kl_divergence(reference, scorer.logits(ablate(model, v).hooks)).mean() for v in directions])


def null_summary(null_kl: Float[Tensor, " n_directions"]) -> dict:
    """The random-direction KL null as the report keeps it: ``n``, ``median``, ``min``, ``max``,
    ``share_below_0.1`` (the paper's threshold) and every ``value`` (nats, 5 decimals)."""
    return {"n": len(null_kl), "median": round(float(null_kl.median()), 5), "min": round(float(null_kl.min()), 5),
            "max": round(float(null_kl.max()), 5), "share_below_0.1": round(float((null_kl < 0.1).double().mean()), 4),
            "values": [round(float(x), 5) for x in null_kl]}


def random_direction_kl(
    model: Model,
    instructions: Sequence[str],
    *,
    n_directions: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> Float[Tensor, " n_directions"]:
    """Mean last-token KL(unmodified || ablated) over ``instructions`` for random unit directions, float64 nats.

    The null distribution to read the selection's KL filter against: ablating *any* direction at
    every layer and position moves the next-token distribution (on the 576-wide organism the median
    random direction gives about the paper's 0.1-nat threshold, which was set on models 2048-8192
    wide; a few directions give over 1 nat). Direction ``k`` is row ``k`` of
    ``torch.randn(n_directions, d_model, dtype=float64)`` from a generator seeded with ``seed``,
    normalized; ablation as :func:`~refusal_lens.interventions.ablate`, KL as the selection's.
    """
    instructions = check_instructions(instructions, model.chat)
    if n_directions < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions}")
    scorer = _Scorer(model, instructions, batch_size)
    return _null_kl(model, scorer, scorer.logits(), n_directions, seed)


def _bootstrap_win_rate(scores: _CandidateScores, candidates: list[tuple[int, int]], best: int,
                        thresholds: Thresholds, n_boot: int, seed: int) -> float:
    """Share of val-prompt resamples in which the same rule (same thresholds) picks candidate ``best`` again.

    A score that was not computed for a candidate (it was ruled out more cheaply) counts as failing.
    """
    rng = np.random.default_rng(seed)
    n = {"bypass": scores.harmful.n_prompts, "induce": scores.harmless.n_prompts, "kl": scores.harmless.n_prompts}
    per_prompt = {name: np.stack([scores.per_prompt.get(c, {}).get(name, torch.full((n[name],), math.nan)).numpy()
                                  for c in candidates]) for name in ("bypass", "induce", "kl")}
    wins = 0
    for _ in range(n_boot):
        i = rng.integers(0, n["bypass"], n["bypass"])
        j = rng.integers(0, n["induce"], n["induce"])
        index, _ = _choose(per_prompt["bypass"][:, i].mean(1), per_prompt["induce"][:, j].mean(1),
                           per_prompt["kl"][:, j].mean(1), thresholds)
        wins += index == best
    return wins / n_boot
