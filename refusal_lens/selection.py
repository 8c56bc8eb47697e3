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
unembedded. Induce starts its forward pass at the intervention layer from the
block inputs recorded during the unmodified harmless run (checked once against
a full pass; where the model's blocks cannot be replayed, full passes are used).
Scores are computed lazily: the winner needs all three, any other candidate
only the cheapest proof that it cannot win, either a failed induce or a bypass
above the winner's. When most candidates induce refusal (measured on a few
probes), bypass is scored for every candidate and induce and KL only for the
``finalists``, taken in order of bypass until at least ``n_finalists`` are
judged and one passes; when few do, induce goes first and only the candidates
that pass it are scored further. Either way the pick is exactly what scoring
everything would give (``full_table=True`` scores all three for every
candidate, for plots).
"""

from __future__ import annotations

import math
import warnings
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

# Induce is scored first for every candidate when fewer than this share of the probes pass it.
_INDUCE_FIRST_BELOW = 0.5
_N_PROBES = 8


@dataclass
class Selection:
    """Result of :func:`select_direction`.

    Attributes:
        table: one row per candidate: ``pos``, ``layer``, ``bypass``, ``induce``, ``kl``
            (NaN where not scored), ``scored`` (judged against the filters: induce computed, and KL
            when induce passed or ``full_table``), ``kept``.
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
    """Last-position logits of pre-tokenized prompt batches under a list of hooks.

    ``logits(record_from=l)`` also keeps, per batch, the input of every block from ``l`` on (hidden
    states and the keyword arguments the model passed: mask, position ids, rotary tables), so that
    ``logits_from(layer)`` can run only blocks ``layer..n_layers-1``: the same result as a full pass
    whose hooks change nothing before ``resid_pre`` of ``layer``.
    """

    def __init__(self, model, instructions: Sequence[str], batch_size: int):
        self.model = model
        self.batches = [model.chat.tokenize(instructions[s : s + batch_size]) for s in range(0, len(instructions), batch_size)]
        self.block_inputs: list[dict[int, tuple[Tensor, dict]]] = []

    def logits(self, hooks: Sequence = (), *, record_from: int | None = None) -> Float[Tensor, "batch d_vocab"]:
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

    def logits_from(self, layer: int, hooks: Sequence = ()) -> Float[Tensor, "batch d_vocab"]:
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
                  f"({reason}); induce is scored with full forward passes instead (slower, same result)")
    return False


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
    """Score the candidates of ``directions`` on validation prompts and pick the refusal direction.

    Memory: for the induce replay, the harmless val prompts' block inputs are kept from the first
    candidate layer on, ``n_harmless x seq x d_model`` values per layer in the model's dtype (e.g.
    Qwen-1.8B, 32 prompts of 64 tokens, 24 layers, bf16: about 200 MB on the model's device).
    """
    if directions.hook != "resid_pre":
        raise ValueError(f"selection ablates and adds at resid_pre; these directions come from {directions.hook!r}")
    harmful_val, harmless_val = check_prompts(harmful_val), check_prompts(harmless_val)
    refusal_tokens = model.chat.refusal_tokens
    harmful, harmless = _Scorer(model, harmful_val, batch_size), _Scorer(model, harmless_val, batch_size)
    max_layer = max_layer_frac * model.cfg.n_layers
    unit = directions.unit()
    candidates = [(p, l) for p, pos in enumerate(directions.positions) for l, layer in enumerate(directions.layers)
                  if directions.valid[p, l] and layer < max_layer]
    if not candidates:
        raise ValueError(f"no valid candidate below layer {max_layer:.1f}: check the directions' layers")
    first_layer = min(directions.layers[l] for _, l in candidates)
    harmless_reference = harmless.logits(record_from=first_layer)
    replay = _replay_reproduces(harmless, first_layer, harmless_reference)
    if not replay:
        harmless.block_inputs.clear()
    baseline = {
        "harmful": float(refusal_log_odds(harmful.logits(), refusal_tokens).mean()),
        "harmless": float(refusal_log_odds(harmless_reference, refusal_tokens).mean()),
    }
    show = (len(candidates) >= 8) if progress is None else progress
    per_prompt: dict[tuple[int, int], dict[str, Tensor]] = {c: {} for c in candidates}

    def score(name: str, p: int, l: int) -> float:
        """Compute one score of candidate (p, l) unless already known; return its mean over prompts."""
        scores = per_prompt[(p, l)]
        if name not in scores:
            if name == "bypass":
                logits = harmful.logits(ablate(model, unit[p, l]).hooks)
            elif name == "induce":
                layer = directions.layers[l]
                addition = add(model, directions.vectors[p, l], layer=layer).hooks
                logits = harmless.logits_from(layer, addition) if replay else harmless.logits(addition)
            else:
                logits = harmless.logits(ablate(model, unit[p, l]).hooks)
            scores[name] = (kl_divergence(harmless_reference, logits) if name == "kl"
                            else refusal_log_odds(logits, refusal_tokens))
        return float(scores[name].mean())

    def judged(scores: dict[str, Tensor]) -> bool:
        return "induce" in scores and ("kl" in scores or float(scores["induce"].mean()) <= induce_min)

    def passes(scores: dict[str, Tensor]) -> bool:  # KL is only ever scored after induce
        return "kl" in scores and float(scores["induce"].mean()) > induce_min and float(scores["kl"].mean()) < kl_max

    # Evaluation order. The winner needs all three scores; any other candidate only needs the cheapest
    # proof that it cannot win: a failed induce (a replay from its layer, ~1 - layer/L of a pass), or a
    # bypass above the winner's (a full pass). Induce on a spread of probes estimates how often induce
    # passes; if rarely, induce goes first for every candidate and only those that pass get bypass.
    probes = [candidates[i] for i in np.linspace(0, len(candidates) - 1, min(_N_PROBES, len(candidates))).astype(int)]
    induce_rate = float(np.mean([score("induce", *c) > induce_min for c in probes]))
    induce_first = full_table or induce_rate < _INDUCE_FIRST_BELOW
    if induce_first:
        for c in tqdm(candidates, disable=not show, desc="induce scores", unit="candidate"):
            score("induce", *c)
    contenders = [c for c in candidates if full_table or not induce_first or score("induce", *c) > induce_min]
    for c in tqdm(contenders, disable=not show, desc="bypass scores", unit="candidate"):
        score("bypass", *c)
    finalists, passed = [], 0
    for c in tqdm(sorted(contenders, key=lambda c: score("bypass", *c)), disable=not show,
                  desc="finalists (induce, KL)", unit="candidate"):
        if not full_table and len(finalists) >= n_finalists and passed:
            break
        if full_table or score("induce", *c) > induce_min:
            score("kl", *c)
        finalists.append(c)
        passed += passes(per_prompt[c])

    rows = []
    for p, pos in enumerate(directions.positions):
        for l, layer in enumerate(directions.layers):
            scores = per_prompt.get((p, l), {})
            mean = {k: float(v.mean()) for k, v in scores.items()}
            rows.append({
                "pos": pos, "layer": layer,
                "bypass": mean.get("bypass", math.nan), "induce": mean.get("induce", math.nan),
                "kl": mean.get("kl", math.nan), "scored": judged(scores), "kept": passes(scores),
                "reason": _reason(directions.valid[p, l], layer, max_layer, scores, kl_max, induce_min),
            })
    table = pd.DataFrame(rows)
    kept = table[table.kept].sort_values("bypass")
    best = (int(kept.iloc[0].pos), int(kept.iloc[0].layer)) if len(kept) else None
    scored = [c for c in candidates if judged(per_prompt[c])]
    win_rate = _bootstrap_win_rate(per_prompt, scored, directions, best, kl_max, induce_min, n_boot, seed,
                                   len(harmful_val)) \
        if best is not None and n_boot else None
    return Selection(table, best, baseline, win_rate, directions)


def random_direction_kl(
    model,
    instructions: Sequence[str],
    *,
    n_directions: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> Float[Tensor, "n_directions"]:
    """Mean last-token KL(unmodified || ablated) over ``instructions`` for random unit directions, float64 nats.

    The null distribution to read the selection's KL filter against: ablating *any* direction at
    every layer and position moves the next-token distribution (on the 576-wide organism the median
    random direction gives about the paper's 0.1-nat threshold, which was set on models 2048-8192
    wide; a few directions give over 1 nat). Direction ``k`` is row ``k`` of
    ``torch.randn(n_directions, d_model, dtype=float64)`` from a generator seeded with ``seed``,
    normalized; ablation as :func:`~refusal_lens.interventions.ablate` (the selection's KL).
    """
    instructions = check_prompts(instructions)
    if n_directions < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions}")
    scorer = _Scorer(model, instructions, batch_size)
    reference = scorer.logits()
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, model.cfg.d_model, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    return torch.stack([kl_divergence(reference, scorer.logits(ablate(model, v).hooks)).mean() for v in directions])


def _reason(valid, layer, max_layer, scores, kl_max, induce_min) -> str:
    if not valid:
        return "zero-norm candidate"
    if layer >= max_layer:
        return "layer filter"
    induce_fails = "induce" in scores and float(scores["induce"].mean()) <= induce_min
    if not induce_fails and "kl" not in scores:
        return "not a finalist (higher bypass than the winner)"
    problems = ["induce <= threshold"] if induce_fails else []
    missing = [name for name in ("bypass", "KL") if name.lower() not in scores]
    if missing:
        problems.append(f"{' and '.join(missing)} not scored")
    if "kl" in scores and float(scores["kl"].mean()) >= kl_max:
        problems.append("kl >= threshold")
    return "; ".join(problems) or "kept"


def _bootstrap_win_rate(per_prompt, scored, directions, best, kl_max, induce_min, n_boot, seed,
                        n_harmful: int) -> float:
    """Share of val-prompt resamples in which ``best`` is again the lowest-bypass passing finalist.

    A candidate whose KL or bypass was not scored (its induce failed on all the val prompts) counts as failing.
    """
    rng = np.random.default_rng(seed)
    n_harmless = len(per_prompt[scored[0]]["induce"])
    missing = {"bypass": torch.full((n_harmful,), math.nan, dtype=torch.float64),
               "kl": torch.full((n_harmless,), math.nan, dtype=torch.float64)}
    stacked = {k: torch.stack([per_prompt[c].get(k, missing.get(k)) for c in scored]).numpy()
               for k in ("bypass", "induce", "kl")}
    names = [(directions.positions[p], directions.layers[l]) for p, l in scored]
    wins = 0
    for _ in range(n_boot):
        i = rng.integers(0, n_harmful, n_harmful)
        j = rng.integers(0, n_harmless, n_harmless)
        bypass = stacked["bypass"][:, i].mean(1)
        ok = (stacked["induce"][:, j].mean(1) > induce_min) & (stacked["kl"][:, j].mean(1) < kl_max)  # NaN: False
        if ok.any() and names[int(np.argmin(np.where(ok, bypass, np.inf)))] == best:
            wins += 1
    return wins / n_boot
