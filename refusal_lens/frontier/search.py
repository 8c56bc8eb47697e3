"""The refusal/KL frontier: a seeded multi-objective search over weight profiles, its Pareto front and a
point chosen by a rule fixed before the search.

Each trial is one :class:`~refusal_lens.frontier.profile.Profile`, sampled by Optuna's multivariate TPE
(seeded; heretic's sampler) and scored on **val** prompts with the project's metrics: the mean refusal
score of the harmful prompts under the edit (:func:`refusal_lens.refusal_score`, the paper's log-odds)
and the mean last-token KL(unmodified || edited) of the harmless ones
(:func:`refusal_lens.metrics.kl_divergence`, the selection's KL). Both are minimized. The Pareto-optimal
trials (the *front*) are then judged on short greedy replies to the val harmful prompts with the substring
judge (:func:`refusal_lens.metrics.refusal_rate`; only the rate is kept). The :class:`ChoiceRule` (default:
the lowest val KL among front points whose judged val refusal rate is at most 10%) picks one point,
which is then evaluated once on test (:func:`evaluate_profile`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..chat import check_instructions
from ..directions import Directions
from ..generation import generate
from ..metrics import ce_loss, kl_divergence, last_token_logits, refusal_rate, refusal_score
from ..models import Model
from ..scorer import Scorer
from .profile import EDITS, Kernel, Profile, profile_hooks, resolve


@dataclass(frozen=True)
class SearchSpace:
    """What the search samples (heretic's ranges, widened to the whole depth for the kernel's peak).

    Attributes:
        positions: candidate positions to choose among (None: every position of the run).
        layer_range: the direction index's range as fractions of ``n_layers - 1`` (heretic: 0.4-0.9).
        peak_weight: range of each kernel's peak weight; values below 0 are clamped to 0, which puts
            probability on switching a writer off (heretic does this for the MLP only).
        width: range of each kernel's width as fractions of ``n_layers - 1`` (at least 1 layer).
        edits: the edits to choose among (``"project"``, ``"norm-preserving"``).
        orthogonalize: the choices for orthogonalizing the direction against the harmless mean.
        embed: search the embedding's weight in [0, 1] (else fixed at 1, the paper's).
        writers: the writers whose kernels are searched (``"attn"``, ``"mlp"``); the others get weight 0.
    """

    positions: tuple[int, ...] | None = None
    layer_range: tuple[float, float] = (0.25, 0.9)
    peak_weight: tuple[float, float] = (-0.25, 1.5)
    width: tuple[float, float] = (0.0, 0.6)
    edits: tuple[str, ...] = EDITS
    orthogonalize: tuple[bool, ...] = (False, True)
    embed: bool = True
    writers: tuple[str, ...] = ("attn", "mlp")


@dataclass(frozen=True)
class ChoiceRule:
    """How the chosen point is picked from the judged front, fixed before the search.

    ``metric="judge"``: the substring judge's refusal rate of greedy val replies; ``"score"``: the mean val
    refusal score. The chosen point is the front point with the lowest val KL whose ``metric`` is at most
    ``max_refusal``; when none qualifies, nothing is chosen (the front is the result) and
    :attr:`Frontier.closest` names the front point with the lowest ``metric``.
    """

    metric: str = "judge"
    max_refusal: float = 0.10

    def __post_init__(self) -> None:
        if self.metric not in ("judge", "score"):
            raise ValueError(f"ChoiceRule.metric must be 'judge' or 'score', got {self.metric!r}")

    def column(self) -> str:
        return "val_refusal_rate" if self.metric == "judge" else "val_refusal_score"

    def describe(self) -> str:
        what = ("substring-judge refusal rate of greedy val replies" if self.metric == "judge"
                else "mean val refusal score")
        return f"lowest val KL among Pareto-front points whose {what} <= {self.max_refusal:g}"


@dataclass
class Frontier:
    """Result of :func:`refusal_frontier`.

    Attributes:
        trials: one row per trial: ``trial``, the profile's parameters, ``val_refusal_score``,
            ``val_kl`` and ``on_front``.
        front: the Pareto-optimal trials, sorted by KL, with ``val_refusal_rate`` (judged) added.
        profiles: trial number -> :class:`Profile`.
        chosen: the trial number the rule picked, or None.
        closest: when nothing is chosen, the front point with the lowest refusal metric.
        rule, space: the rule and search space used; settings: seed, budget and sizes.
    """

    trials: pd.DataFrame
    front: pd.DataFrame
    profiles: dict[int, Profile]
    chosen: int | None
    closest: int | None
    rule: ChoiceRule
    space: SearchSpace
    settings: dict = field(default_factory=dict)

    @property
    def chosen_profile(self) -> Profile | None:
        return None if self.chosen is None else self.profiles[self.chosen]

    def point(self, trial: int | None = None) -> dict | None:
        """A front point's val numbers as ``frontier.json`` records them (default: the chosen point, else the
        closest): ``{"trial", "by_rule", "profile", "val": {val_refusal_score, val_kl, val_refusal_rate}}``."""
        trial = trial if trial is not None else (self.chosen if self.chosen is not None else self.closest)
        if trial is None:
            return None
        row = self.front[self.front.trial == trial].iloc[0]
        return {"trial": int(trial), "by_rule": trial == self.chosen, "profile": self.profiles[trial].to_dict(),
                "val": {k: float(row[k]) for k in ("val_refusal_score", "val_kl", "val_refusal_rate")}}


def _suggest_kernel(trial, prefix: str, space: SearchSpace, n_layers: int) -> Kernel:
    last = max(n_layers - 1, 1)
    peak_weight = max(0.0, trial.suggest_float(f"{prefix}.peak_weight", *space.peak_weight))
    peak_position = trial.suggest_float(f"{prefix}.peak_position", 0.0, float(last))
    floor_fraction = trial.suggest_float(f"{prefix}.floor_fraction", 0.0, 1.0)
    width = trial.suggest_float(f"{prefix}.width", max(1.0, space.width[0] * last), max(1.0, space.width[1] * last))
    return Kernel(peak_weight, peak_position, floor_fraction * peak_weight, width)


def _suggest(trial, space: SearchSpace, directions: Directions, n_layers: int) -> Profile:
    """One profile from an Optuna trial (floor weights are sampled as fractions of the peak, as heretic)."""
    positions = list(space.positions or directions.positions)
    position = trial.suggest_categorical("position", positions) if len(positions) > 1 else positions[0]
    low, high = _index_range(directions, position, space, n_layers)
    index = trial.suggest_float("direction_index", low, high)
    edit = trial.suggest_categorical("edit", list(space.edits)) if len(space.edits) > 1 else space.edits[0]
    orthogonalize = (trial.suggest_categorical("orthogonalize", list(space.orthogonalize))
                     if len(space.orthogonalize) > 1 else space.orthogonalize[0])
    embed = trial.suggest_float("embed_weight", 0.0, 1.0) if space.embed else 1.0
    off = Kernel.constant(0.0, n_layers)
    attn, mlp = (_suggest_kernel(trial, writer, space, n_layers) if writer in space.writers else off
                 for writer in ("attn", "mlp"))
    return Profile(position, index, attn, mlp, embed, edit, bool(orthogonalize))


def _index_range(directions: Directions, position: int, space: SearchSpace, n_layers: int) -> tuple[float, float]:
    """The direction index's range at ``position``: ``layer_range`` of the depth, within the valid candidates."""
    valid = directions.valid_layers(position)
    if not valid:
        raise ValueError(f"no valid candidate at position {position}")
    last = max(n_layers - 1, 1)
    low = max(space.layer_range[0] * last, min(valid))
    high = min(space.layer_range[1] * last, max(valid))
    return (float(low), float(high)) if low < high else (float(min(valid)), float(max(valid)))


def pareto_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """True where no other point is <= on both objectives and < on one (both minimized)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    dominated = ((a[None, :] <= a[:, None]) & (b[None, :] <= b[:, None])
                 & ((a[None, :] < a[:, None]) | (b[None, :] < b[:, None]))).any(axis=1)
    return ~dominated


class ValScorer:
    """Val metrics of any set of hooks: mean harmful refusal score and mean harmless KL, through the selection's
    :class:`~refusal_lens.scorer.Scorer` (prompts tokenized once, the harmless reference logits computed once)."""

    def __init__(self, model: Model, harmful: Sequence[str], harmless: Sequence[str], batch_size: int = 32):
        self.model, self.batch_size = model, batch_size
        self.harmful = check_instructions(harmful, model.chat)
        self.harmless = check_instructions(harmless, model.chat)
        self._harmful = Scorer(model, self.harmful, batch_size)
        self._harmless = Scorer(model, self.harmless, batch_size)

    def __call__(self, hooks: list) -> tuple[float, float]:
        return float(self._harmful.refusal(hooks).mean()), float(self._harmless.kl(hooks).mean())

    def judge(self, hooks: list, max_new_tokens: int) -> float:
        """Substring-judge refusal rate of greedy replies to the harmful prompts (replies are not kept)."""
        replies = generate(self.model, self.harmful, max_new_tokens=max_new_tokens, hooks=hooks,
                           batch_size=self.batch_size, progress=False)
        return refusal_rate(replies)


def _flat(profile: Profile) -> dict:
    record = {"position": profile.position, "direction_index": profile.direction_index, "edit": profile.edit,
              "orthogonalize": profile.orthogonalize, "embed_weight": profile.embed_weight}
    for writer in ("attn", "mlp"):
        record.update({f"{writer}.{k}": v for k, v in asdict(getattr(profile, writer)).items()})
    return record


def refusal_frontier(
    model: Model,
    directions: Directions,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    n_trials: int = 60,
    seed: int = 0,
    n_startup_trials: int | None = None,
    space: SearchSpace = SearchSpace(),
    rule: ChoiceRule = ChoiceRule(),
    harmless_means: Tensor | None = None,
    judge_tokens: int = 24,
    batch_size: int = 32,
    progress: bool = True,
) -> Frontier:
    """Search weight profiles for the least KL at which refusal goes, on val prompts; see the module docstring.

    ``directions``: the run's candidates (``RunFolder.directions()``). ``harmless_means``: mean activations
    of harmless train prompts aligned with ``directions`` (needed when ``space.orthogonalize`` allows True).
    ``n_startup_trials`` random trials precede TPE (default: a third of the budget, at least 1).
    Same seed, prompts and model: same trials.
    """
    import optuna

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if True in space.orthogonalize and harmless_means is None:
        raise ValueError("the search space allows orthogonalize=True but no harmless_means were given: pass "
                         "rl.mean_activations(model, harmless_train) or SearchSpace(orthogonalize=(False,))")
    n_layers = model.cfg.n_layers
    scorer = ValScorer(model, harmful_val, harmless_val, batch_size)
    startup = max(1, n_trials // 3) if n_startup_trials is None else n_startup_trials
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    profiles: dict[int, Profile] = {}
    rows = []
    for _ in tqdm(range(n_trials), desc="frontier trials", unit="trial", disable=not progress):
        trial = study.ask()
        profile = _suggest(trial, space, directions, n_layers)
        hooks = profile_hooks(model, resolve(directions, profile, n_layers, harmless_means))
        score, kl = scorer(hooks)
        study.tell(trial, (score, kl))
        profiles[trial.number] = profile
        rows.append({"trial": trial.number, **_flat(profile), "val_refusal_score": score, "val_kl": kl})
    trials = pd.DataFrame(rows)
    trials["on_front"] = pareto_mask(trials.val_refusal_score.to_numpy(), trials.val_kl.to_numpy())
    front = trials[trials.on_front].sort_values("val_kl").reset_index(drop=True)
    rates = []
    for number in tqdm(front.trial, desc="judging the front", unit="point", disable=not progress):
        hooks = profile_hooks(model, resolve(directions, profiles[int(number)], n_layers, harmless_means))
        rates.append(scorer.judge(hooks, judge_tokens))
    front["val_refusal_rate"] = rates
    chosen, closest = choose(front, rule)
    settings = {"n_trials": n_trials, "seed": seed, "n_startup_trials": startup, "judge_tokens": judge_tokens,
                "n_val_harmful": len(scorer.harmful), "n_val_harmless": len(scorer.harmless),
                "sampler": "optuna TPESampler(multivariate=True)", "optuna": optuna.__version__}
    return Frontier(trials, front, profiles, chosen, closest, rule, space, settings)


def choose(front: pd.DataFrame, rule: ChoiceRule) -> tuple[int | None, int | None]:
    """``(chosen trial, closest trial)``: the rule's pick (or None) and, when it picks nothing, the front
    point with the lowest refusal metric (ties: lowest KL)."""
    if not len(front):
        return None, None
    column = rule.column()
    ok = front[front[column] <= rule.max_refusal]
    if len(ok):
        return int(ok.sort_values(["val_kl", column]).trial.iloc[0]), None
    return None, int(front.sort_values([column, "val_kl"]).trial.iloc[0])


def evaluate_profile(
    model: Model,
    directions: Directions,
    profile: Profile,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    harmless_means: Tensor | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    capability: bool = False,
    baseline_replies: Sequence[str] | None = None,
) -> dict:
    """A profile's effects on held-out prompts: substring-judge refusal rates of greedy replies on both sides,
    the mean harmful refusal score, the mean harmless KL, the CE of the unmodified model's own replies to
    the harmless prompts under the edit (``ce_reply_tokens``, with ``ce_reply_tokens_unmodified``), and with
    ``capability`` the ``refusal_lens_mc`` accuracy (lm-eval). No reply text is returned."""
    hooks = profile_hooks(model, resolve(directions, profile, model.cfg.n_layers, harmless_means))
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    harmful, harmless = list(harmful), list(harmless)
    result = {"n_harmful": len(harmful), "n_harmless": len(harmless), "max_new_tokens": max_new_tokens,
              "harmful_refusal_rate": refusal_rate(generate(model, harmful, hooks=hooks, **gen)),
              "harmless_refusal_rate": refusal_rate(generate(model, harmless, hooks=hooks, **gen)),
              "harmful_refusal_score": float(refusal_score(model, harmful, hooks=hooks, batch_size=batch_size).mean()),
              "harmless_kl": float(kl_divergence(last_token_logits(model, harmless, batch_size=batch_size),
                                                 last_token_logits(model, harmless, hooks=hooks,
                                                                   batch_size=batch_size)).mean())}
    own = list(baseline_replies) if baseline_replies is not None else generate(model, harmless, **gen)
    answered = [(i, r) for i, r in zip(harmless, own) if r.strip()]
    if answered:
        instructions, replies = [i for i, _ in answered], [r for _, r in answered]
        result["ce_reply_tokens_unmodified"] = ce_loss(model, instructions, replies)
        result["ce_reply_tokens"] = ce_loss(model, instructions, replies, hooks=hooks)
        result["ce_n_replies"] = len(answered)
    if capability:
        from .. import evals

        for name, condition in (("unmodified", ()), ("edited", hooks)):
            scores = evals.evaluate(model, (evals.LOCAL_TASK,), hooks=condition, batch_size=batch_size)
            result[f"capability_{name}"] = {task: s.get("acc") for task, s in scores.items()}
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}


def profile_table(profile: Profile, n_layers: int) -> pd.DataFrame:
    """Per-layer weights of a profile: ``layer``, ``attn``, ``mlp`` (the embedding's weight is separate)."""
    return pd.DataFrame({"layer": np.arange(n_layers), "attn": profile.attn.weights(n_layers),
                         "mlp": profile.mlp.weights(n_layers)})


def candidate_profiles(directions: Directions, n_layers: int, positions: Sequence[int] | None = None
                       ) -> dict[tuple[int, int], Profile]:
    """The paper's candidates as profiles: each valid ``(position, layer)`` ablated at weight 1 everywhere."""
    return {(p, l): Profile.full(p, l, n_layers) for p in (positions or directions.positions)
            for l in directions.valid_layers(p)}


def ablation_equivalence(model: Model, directions: Directions, profile: Profile, prompts: Sequence[str],
                         harmless_means: Tensor | None = None) -> float:
    """Max |logit difference| between the hooks and :func:`~refusal_lens.frontier.profile.apply_profile`'s
    edited copy on ``prompts`` (the weight edit is the hooks' map)."""
    from .profile import apply_profile

    resolved = resolve(directions, profile, model.cfg.n_layers, harmless_means)
    edited = apply_profile(model, resolved)
    batch = model.chat.tokenize(list(prompts)).to(model.cfg.device)
    with torch.no_grad():
        with model.hooks(fwd_hooks=profile_hooks(model, resolved)):
            hooked = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        weights = edited(batch["input_ids"], attention_mask=batch["attention_mask"])
    return float((weights - hooked).abs().max())
