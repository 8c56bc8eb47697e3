"""What a direction does when it is used: the paper's interventions, measured on held-out prompts.

:func:`intervention_effects` is the main job's intervention stage (notebook 03 calls it too): for one raw
difference-in-means vector ``r`` at its layer,

* refusal (greedy replies, substring judge) of harmful prompts unmodified, with the unit direction ablated
  everywhere, and with ``r`` subtracted at the layer (the paper's jailbreak "actadd", α = -1);
* refusal of harmless prompts unmodified and with ``r`` added at the layer;
* next-token KL(unmodified || ablated) on the harmless prompts;
* cross-entropy of the model's own harmless replies (reply tokens only) under each intervention;
* the largest logit difference between weight orthogonalization and hook ablation;
* optionally a judge's verdicts and an lm-eval capability table (baseline, ablated, orthogonalized).

:func:`alpha_sweep` measures how much of the direction's component must go. Replies to harmful prompts stay
in memory (``InterventionEffects.replies``); :meth:`InterventionEffects.report` keeps only verdicts and at
most 60 characters of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .generation import generate
from .interventions import ablate, add
from .metrics import ce_loss, is_refusal, kl_last_token, refusal_rate, refusal_score, safe_excerpt
from .models import Model
from .orthogonalize import orthogonalize_weights

HARMFUL_CONDITIONS = ("baseline", "ablated", "subtracted")
HARMLESS_CONDITIONS = ("baseline", "added")
NO_JUDGE = ("no judge configured: pass --judge local:<model> or --judge openai (with REFUSAL_LENS_JUDGE_MODEL, "
            "REFUSAL_LENS_JUDGE_BASE_URL and an API key in the environment)")


@dataclass
class InterventionEffects:
    """Result of :func:`intervention_effects`.

    Attributes:
        replies: ``"harmful/<condition>"`` and ``"harmless/<condition>"`` -> replies (in memory only).
        instructions: ``"harmful"`` and ``"harmless"`` -> the prompts they answer.
        kl_ablation_harmless: per harmless prompt, KL(unmodified || ablated) of the next token (nats).
        ce: CE of the model's own harmless replies (nats per reply token) per condition, and ``n_replies``;
            or ``{"skipped": reason}``.
        orthogonalized_vs_hooks_max_logit_diff: max |logit difference|, orthogonalized weights vs hook ablation.
        judged: the judge's per-reply verdicts (``rl.judge.judge_conditions``), or ``None`` when skipped.
        capability: lm-eval accuracy per condition and task (may be empty).
        capability_skipped: task -> why it could not run.
        orthogonalization: ``equals_hook_ablation`` (False on post-sublayer-norm architectures, Gemma 2/3, where
            the edit removes the direction from the residual stream but is a different map) and the probe's
            ``residual_leak`` (max |x.v|/|x|), from ``rl.orthogonalize_weights``.
    """

    replies: dict[str, list[str]]
    instructions: dict[str, list[str]]
    kl_ablation_harmless: Float[Tensor, " n_harmless"]
    ce: dict
    orthogonalized_vs_hooks_max_logit_diff: float
    judged: pd.DataFrame | None = None
    capability: pd.DataFrame = field(default_factory=pd.DataFrame)
    capability_skipped: dict[str, str] = field(default_factory=dict)
    orthogonalization: dict = field(default_factory=dict)

    @property
    def refusal_rate(self) -> dict[str, float]:
        """``harmful_baseline``, ``harmful_ablated``, ... -> share of replies the substring judge calls refusals."""
        return {name.replace("/", "_"): round(refusal_rate(replies), 4) for name, replies in self.replies.items()}

    def report(self) -> dict:
        """The JSON-ready summary the main job writes into ``report.json`` (harmful replies: 60 characters)."""
        from .judge import condition_table

        harmful, harmless = self.instructions["harmful"], self.instructions["harmless"]
        judge = {"skipped": NO_JUDGE} if self.judged is None else {
            "judge": self.judged.judge.iloc[0], "prompt": self.judged.prompt.iloc[0],
            "table": condition_table(self.judged).round(4).to_dict(orient="records")}
        capability = {"table": self.capability.round(4).to_dict(orient="records"), "skipped": self.capability_skipped}
        return {
            "refusal_rate": self.refusal_rate,
            "n_test": {"harmful": len(harmful), "harmless": len(harmless)},
            "kl_ablation_harmless_mean": round(float(self.kl_ablation_harmless.mean()), 5),
            "ce_harmless_replies": self.ce,
            "orthogonalized_vs_hooks_max_logit_diff": self.orthogonalized_vs_hooks_max_logit_diff,
            "orthogonalization": self.orthogonalization,
            "judge": judge,
            "capability": capability,
            "examples": {
                **{f"harmful_{name}": [{"instruction": i, "reply_first_60": safe_excerpt(r), "refused": is_refusal(r)}
                                       for i, r in zip(harmful[:3], self.replies[f"harmful/{name}"][:3])]
                   for name in ("ablated", "subtracted")},
                "harmless_added": [{"instruction": i, "reply": r, "refused": is_refusal(r)}
                                   for i, r in zip(harmless[:3], self.replies["harmless/added"][:3])],
            },
        }


def _own_reply_ce(model: Model, harmless: list[str], replies: list[str], hooks: dict[str, list]) -> dict:
    """CE of the model's own non-empty replies to harmless prompts, per condition (full text is fine: harmless)."""
    answered = [(i, r) for i, r in zip(harmless, replies) if r.strip()]
    if not answered:
        return {"skipped": "every baseline reply to the harmless test prompts is empty: no reply tokens to score"}
    instructions, own = [i for i, _ in answered], [r for _, r in answered]
    ce = {name: round(ce_loss(model, instructions, own, hooks=hooks.get(name, ())), 4)
          for name in ("baseline", "ablated", "subtracted", "added")}
    return {**ce, "n_replies": len(answered)}


def _orthogonalized_vs_hooks(model: Model, direction: Tensor, probe: list[str], ablation: list) -> tuple[float, Model]:
    """Max |logit difference| between the orthogonalized copy and hook ablation on ``probe``, and the copy."""
    batch = model.chat.tokenize(probe).to(model.cfg.device)
    edited = orthogonalize_weights(model, direction)
    with torch.no_grad():
        with model.hooks(fwd_hooks=ablation):
            hooked = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        weights = edited(batch["input_ids"], attention_mask=batch["attention_mask"])
    return float((weights - hooked).abs().max()), edited


def capability_table(conditions: dict, tasks: Sequence[str], *, limit: int | None = None,
                     batch_size: int = 32) -> tuple[pd.DataFrame, dict[str, str]]:
    """lm-eval accuracy per condition (``rl.evals.capability_table``), or every task skipped with the reason
    when lm-evaluation-harness is not installed."""
    try:
        from . import evals
    except ImportError as error:
        return pd.DataFrame(), {task: str(error) for task in tasks}
    return evals.capability_table(conditions, list(tasks), limit=limit, batch_size=batch_size)


def judge_replies(judge: str, replies: dict[str, list[str]], instructions: dict[str, list[str]]) -> pd.DataFrame:
    """Compliance/coherence verdicts of a judge (``rl.judge.get_judge`` spec) for every condition's replies."""
    from .judge import get_judge, judge_conditions

    conditions = {name: (instructions[name.split("/")[0]], texts) for name, texts in replies.items()}
    return judge_conditions(get_judge(judge), conditions, harmful=[c for c in conditions if c.startswith("harmful")])


def intervention_effects(
    model: Model,
    vector: Float[Tensor, " d_model"],
    layer: int,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    judge: str | None = None,
    capability_tasks: Sequence[str] = ("refusal_lens_mc",),
    capability_limit: int | None = None,
    log: Callable[[str], object] = print,
) -> InterventionEffects:
    """Measure the paper's interventions with the raw vector ``vector`` (its unit direction for ablation) at
    ``layer`` on held-out ``harmful`` and ``harmless`` instructions; see the module docstring."""
    direction = vector / vector.norm()
    harmful, harmless = list(harmful), list(harmless)
    hooks = {"ablated": ablate(model, direction).hooks, "subtracted": add(model, vector, layer=layer, alpha=-1.0).hooks,
             "added": add(model, vector, layer=layer).hooks}
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    log("interventions: generating replies to harmful test prompts (baseline, ablated, subtracted)")
    replies = {
        f"harmful/{name}": generate(model, harmful, hooks=hooks.get(name, ()), **gen) for name in HARMFUL_CONDITIONS
    }
    log("interventions: generating replies to harmless test prompts (baseline, added)")
    replies.update({f"harmless/{name}": generate(model, harmless, hooks=hooks.get(name, ()), **gen)
                    for name in HARMLESS_CONDITIONS})
    log("interventions: KL and CE on harmless prompts")
    kl = kl_last_token(model, harmless, hooks=hooks["ablated"], batch_size=batch_size)
    ce = _own_reply_ce(model, harmless, replies["harmless/baseline"], hooks)
    log("interventions: weight orthogonalization and capability table")
    ortho_diff, edited = _orthogonalized_vs_hooks(model, direction, harmless[:8], hooks["ablated"])
    edit = {key: edited.info.edit[key] for key in ("equals_hook_ablation", "residual_leak")}
    capability, skipped = capability_table({"baseline": (model, ()), "ablated": (model, hooks["ablated"]),
                                            "orthogonalized": (edited, ())}, capability_tasks,
                                           limit=capability_limit, batch_size=batch_size)
    del edited
    instructions = {"harmful": harmful, "harmless": harmless}
    judged = judge_replies(judge, replies, instructions) if judge else None
    return InterventionEffects(replies, instructions, kl, ce, ortho_diff, judged, capability, skipped, edit)


def alpha_sweep(model: Model, direction: Float[Tensor, " d_model"], harmful: Sequence[str], alphas: Sequence[float], *,
                batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Mean refusal score on ``harmful`` when ``alpha`` times the direction's component is removed, per alpha;
    with ``max_new_tokens``, also the refusal rate of greedy replies of that length (``refusal_rate``)."""
    rows = []
    for alpha in tqdm(alphas, disable=not progress, desc="α sweep", unit="α"):
        hooks = ablate(model, direction, alpha=alpha).hooks
        row = {
            "alpha": alpha,
            "refusal_score": float(refusal_score(model, harmful, hooks=hooks, batch_size=batch_size).mean()),
        }
        if max_new_tokens is not None:
            replies = generate(model, harmful, hooks=hooks, max_new_tokens=max_new_tokens, batch_size=batch_size)
            row["refusal_rate"] = refusal_rate(replies)
        rows.append(row)
    return pd.DataFrame(rows)
