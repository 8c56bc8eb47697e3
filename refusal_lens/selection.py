"""Choosing the refusal direction among the candidates, as the paper does.

For each candidate r[pos, layer] three scores on validation prompts:

* ``bypass``: mean refusal score (log-odds) on harmful prompts with the unit
  direction ablated everywhere (lower = ablation removes refusal better);
* ``induce``: mean refusal score on harmless prompts with the raw vector added
  at its layer (higher = addition induces refusal);
* ``kl``: mean KL(unmodified || ablated) of the next-token distribution on
  harmless prompts (lower = ablation leaves other behaviour alone).

A candidate is kept when ``induce > induce_min`` (0), ``kl < kl_max`` (0.1) and
``layer < max_layer_frac * n_layers`` (0.8); the kept candidate with the
lowest bypass wins.

Speed: prompts are tokenized once and the unmodified runs happen once; the
layer filter drops candidates before any scoring; only the last position is
unembedded. Since the winner is the lowest-bypass candidate that passes the
filters, bypass is scored for every candidate, and induce and KL only for the
``finalists``, taken in order of bypass until at least ``n_finalists`` are
scored and one passes. This picks exactly what scoring everything would
(``full_table=True`` scores everything, for plots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .activations import check_prompts
from .directions import Directions
from .interventions import ablate, add
from .metrics import LAST_POSITION_ONLY, kl_divergence, refusal_log_odds


@dataclass
class Selection:
    """Result of :func:`select_direction`.

    Attributes:
        table: one row per candidate: ``pos``, ``layer``, ``bypass``, ``induce``, ``kl``
            (NaN where not scored), ``scored`` (induce and KL computed), ``kept``.
        best: ``(pos, layer)`` of the chosen candidate, or ``None`` if none passed.
        baseline: mean refusal score of the harmful and harmless prompts, unmodified.
        win_rate: share of bootstrap resamples of the val prompts in which ``best`` wins
            again (among the scored candidates), or ``None`` when not computed.
    """

    table: pd.DataFrame
    best: tuple[int, int] | None
    baseline: dict[str, float]
    win_rate: float | None
    directions: Directions

    @property
    def direction(self) -> Float[Tensor, "d_model"]:
        """Unit vector of the chosen candidate (float64)."""
        if self.best is None:
            raise ValueError("no candidate passed the filters; inspect .table and relax kl_max or max_layer_frac")
        return self.directions.direction(*self.best)

    @property
    def vector(self) -> Float[Tensor, "d_model"]:
        """Raw difference-in-means vector of the chosen candidate (for activation addition)."""
        return self.directions.direction(*self.best, unit=False)

    def pick(self) -> tuple[tuple[int, int] | None, str]:
        """``best`` if a candidate passed; otherwise, explicitly flagged, the lowest-bypass scored
        candidate that still induces refusal (``induce > 0``); ``(None, reason)`` if there is none."""
        if self.best is not None:
            return self.best, "passed the paper's filters"
        inducing = self.table[self.table.scored & (self.table.induce > 0)].sort_values("bypass")
        if not len(inducing):
            return None, "no candidate passed the filters and none induces refusal"
        return ((int(inducing.iloc[0].pos), int(inducing.iloc[0].layer)),
                "fallback: no candidate passed KL < 0.1; lowest bypass among those with induce > 0")

    @property
    def best_row(self) -> pd.Series:
        pos, layer = self.best
        return self.table[(self.table.pos == pos) & (self.table.layer == layer)].iloc[0]


class _Scorer:
    """Last-position logits of pre-tokenized prompt batches under a list of hooks."""

    def __init__(self, model, instructions: Sequence[str], batch_size: int):
        self.model = model
        self.batches = [model.chat.tokenize(instructions[s : s + batch_size]) for s in range(0, len(instructions), batch_size)]

    def logits(self, hooks: Sequence = ()) -> Float[Tensor, "batch d_vocab"]:
        device = self.model.cfg.device
        rows = []
        with torch.no_grad(), self.model.hooks(fwd_hooks=[*hooks, LAST_POSITION_ONLY]):
            for batch in self.batches:
                out = self.model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                rows.append(out[:, -1].float().cpu())
        return torch.cat(rows)


def select_direction(
    model,
    directions: Directions,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
    induce_min: float = 0.0,
    n_finalists: int = 8,
    full_table: bool = False,
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
) -> Selection:
    """Score the candidates of ``directions`` on validation prompts and pick the refusal direction."""
    if directions.hook != "resid_pre":
        raise ValueError(f"selection ablates and adds at resid_pre; these directions come from {directions.hook!r}")
    harmful_val, harmless_val = check_prompts(harmful_val), check_prompts(harmless_val)
    refusal_tokens = model.chat.refusal_tokens
    harmful, harmless = _Scorer(model, harmful_val, batch_size), _Scorer(model, harmless_val, batch_size)
    harmless_reference = harmless.logits()
    baseline = {
        "harmful": float(refusal_log_odds(harmful.logits(), refusal_tokens).mean()),
        "harmless": float(refusal_log_odds(harmless_reference, refusal_tokens).mean()),
    }
    max_layer = max_layer_frac * model.cfg.n_layers
    unit = directions.unit()
    candidates = [(p, l) for p, pos in enumerate(directions.positions) for l, layer in enumerate(directions.layers)
                  if directions.valid[p, l] and layer < max_layer]
    if not candidates:
        raise ValueError(f"no valid candidate below layer {max_layer:.1f}: check the directions' layers")
    show = (len(candidates) >= 8) if progress is None else progress

    per_prompt: dict[tuple[int, int], dict[str, Tensor]] = {}
    for p, l in tqdm(candidates, disable=not show, desc="bypass scores", unit="candidate"):
        scores = refusal_log_odds(harmful.logits(ablate(model, unit[p, l]).hooks), refusal_tokens)
        per_prompt[(p, l)] = {"bypass": scores}

    def score_rest(p: int, l: int) -> None:
        ablated = harmless.logits(ablate(model, unit[p, l]).hooks)
        added = harmless.logits(add(model, directions.vectors[p, l], layer=directions.layers[l]).hooks)
        per_prompt[(p, l)]["kl"] = kl_divergence(harmless_reference, ablated)
        per_prompt[(p, l)]["induce"] = refusal_log_odds(added, refusal_tokens)

    def passes(scores: dict[str, Tensor]) -> bool:
        return float(scores["induce"].mean()) > induce_min and float(scores["kl"].mean()) < kl_max

    order = sorted(candidates, key=lambda c: float(per_prompt[c]["bypass"].mean()))
    scored, passed = [], 0
    for candidate in tqdm(order, disable=not show, desc="induce/KL scores", unit="candidate"):
        if not full_table and len(scored) >= n_finalists and passed:
            break
        score_rest(*candidate)
        scored.append(candidate)
        passed += passes(per_prompt[candidate])

    rows = []
    for p, pos in enumerate(directions.positions):
        for l, layer in enumerate(directions.layers):
            scores = per_prompt.get((p, l), {})
            mean = {k: float(v.mean()) for k, v in scores.items()}
            rows.append({
                "pos": pos, "layer": layer,
                "bypass": mean.get("bypass", math.nan), "induce": mean.get("induce", math.nan),
                "kl": mean.get("kl", math.nan), "scored": "kl" in scores,
                "kept": "kl" in scores and passes(scores),
                "reason": _reason(directions.valid[p, l], layer, max_layer, scores, kl_max, induce_min),
            })
    table = pd.DataFrame(rows)
    kept = table[table.kept].sort_values("bypass")
    best = (int(kept.iloc[0].pos), int(kept.iloc[0].layer)) if len(kept) else None
    win_rate = _bootstrap_win_rate(per_prompt, scored, directions, best, kl_max, induce_min, n_boot, seed) \
        if best is not None and n_boot else None
    return Selection(table, best, baseline, win_rate, directions)


def _reason(valid, layer, max_layer, scores, kl_max, induce_min) -> str:
    if not valid:
        return "zero-norm candidate"
    if layer >= max_layer:
        return "layer filter"
    if "kl" not in scores:
        return "not a finalist (higher bypass than the winner)"
    problems = []
    if float(scores["induce"].mean()) <= induce_min:
        problems.append("induce <= threshold")
    if float(scores["kl"].mean()) >= kl_max:
        problems.append("kl >= threshold")
    return "; ".join(problems) or "kept"


def _bootstrap_win_rate(per_prompt, scored, directions, best, kl_max, induce_min, n_boot, seed) -> float:
    """Share of val-prompt resamples in which ``best`` is again the lowest-bypass passing finalist."""
    rng = np.random.default_rng(seed)
    n_harmful = len(per_prompt[scored[0]]["bypass"])
    n_harmless = len(per_prompt[scored[0]]["kl"])
    stacked = {k: torch.stack([per_prompt[c][k] for c in scored]).numpy() for k in ("bypass", "induce", "kl")}
    names = [(directions.positions[p], directions.layers[l]) for p, l in scored]
    wins = 0
    for _ in range(n_boot):
        i = rng.integers(0, n_harmful, n_harmful)
        j = rng.integers(0, n_harmless, n_harmless)
        bypass = stacked["bypass"][:, i].mean(1)
        ok = (stacked["induce"][:, j].mean(1) > induce_min) & (stacked["kl"][:, j].mean(1) < kl_max)
        if ok.any() and names[int(np.argmin(np.where(ok, bypass, np.inf)))] == best:
            wins += 1
    return wins / n_boot
