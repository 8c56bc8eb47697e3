"""The main job's over-refusal step: measure false refusal on val and, above a threshold, select and test a
false-refusal vector."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import InitVar, dataclass

from jaxtyping import Float
from torch import Tensor

from ..models import Model
from ..options import comma_separated, option
from .candidates import PAPER_ORTHOGONALIZE, false_refusal_candidates, unit_refusal
from .evaluation import evaluate_on_test
from .prompts import OverRefusalPrompts, over_refusal_prompts
from .rates import false_refusals, records, rounded
from .selection import KEEP_HARMFUL, FalseRefusalSelection, select_false_refusal

__all__ = ["OVER_REFUSAL_THRESHOLD", "OverRefusalConfig", "over_refusal_stage"]

# The main job runs the step's selection when the look-risky val refusal rate exceeds this.
OVER_REFUSAL_THRESHOLD = 0.1


def _kl_max_text(text: str) -> float | str:
    return text if text.startswith("null:") else float(text)


def _none_or_text(text: str) -> str | None:
    return None if text.lower() == "none" else text


@dataclass(frozen=True)
class OverRefusalConfig:
    """Settings of :func:`over_refusal_stage`; each field is also a ``refusal-lens over-refusal`` option.

    ``threshold``: the look-risky val refusal rate above which the stage selects and tests a vector.
    ``n_train``/``n_val``/``n_test``: prompts per set (``None``: whole split). Selection
    (:func:`~refusal_lens.over_refusal.select_false_refusal`) at ``positions`` (``None``: every end-of-instruction
    position) and ``layers`` (``None``: all), ``orthogonalize`` (the shares tried; ``lambdas``: deprecated),
    ``keep_harmful``, ``kl_max``, ``fallback``; ``holdout`` also evaluates the pick on the ``holdout`` split, the
    prompts written after the rule was fixed; ``filter_train`` keeps the look-risky train prompts the model refuses
    and the harmless ones it answers. The defaults are the pre-registered study's rule: last position,
    ``orthogonalize`` 1, KL at the null's median, the lowest-KL fallback.
    """

    threshold: float = option(OVER_REFUSAL_THRESHOLD,
                              "look-risky val refusal rate above which a false-refusal vector is selected and tested")
    n_train: int | None = option(None, "train prompts per set (none: the whole split)")
    n_val: int | None = option(None, "val prompts per set (none: the whole split)")
    n_test: int | None = option(None, "test prompts per set (none: the whole split)")
    positions: tuple[int, ...] | None = option((-1,), "end-of-instruction positions (--positions=-1,-2)",
                                               parse=comma_separated(int), metavar="P,...")
    layers: tuple[int, ...] | None = option(None, "layers of the candidates (none: all)", parse=comma_separated(int),
                                            metavar="L,...")
    orthogonalize: tuple[float, ...] = option(
        (PAPER_ORTHOGONALIZE,), "shares of the refusal component removed from the candidate, tried at the chosen site",
        parse=comma_separated(float), metavar="S,...")
    keep_harmful: float = option(KEEP_HARMFUL, "share of the harmful val refusals a candidate must keep")
    kl_max: float | str = option("null:0.5", "KL filter in nats, or null:Q for that quantile of random directions' KL",
                                 parse=_kl_max_text)
    fallback: str | None = option("lowest-kl", "when nothing passes: lowest-kl, or none to stop as the paper",
                                  parse=_none_or_text)
    filter_train: bool = option(True, "keep the look-risky train prompts the model refuses and the harmless ones "
                                "it answers")
    n_null: int = option(16, "random directions for the KL null")
    max_new_tokens: int = option(48, "reply length for refusal verdicts")
    seed: int = option(0, "seed of the KL null")
    holdout: bool = option(True, "also evaluate on the held-out split written after the rule was fixed")
    batch_size: int = option(64, "prompts per forward pass (generation is most of the cost)")
    lambdas: InitVar[tuple[float, ...] | None] = None

    def __post_init__(self, lambdas: tuple[float, ...] | None) -> None:
        if lambdas is not None:
            warnings.warn("OverRefusalConfig(lambdas=...) is deprecated; use orthogonalize=...", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(self, "orthogonalize", tuple(lambdas))


def over_refusal_stage(
    model: Model,
    refusal_direction: Float[Tensor, " d_model"],
    *,
    layer: int,
    position: int | None,
    config: OverRefusalConfig = OverRefusalConfig(),
    log: Callable[[str], object] = print,
) -> tuple[dict, Tensor | None, dict]:
    """Measure over-refusal and, when it exceeds ``config.threshold``, select and test a false-refusal vector.

    1. The unmodified model's look-risky refusal rate on the ``over-refusal`` val split (greedy
       generation, substring judge). At or below the threshold: stop (``report["ran"]`` is False). The
       refused ones are the false refusals that selection scores.
    2. Candidates from the train split (:func:`~refusal_lens.over_refusal.false_refusal_candidates`).
    3. :func:`~refusal_lens.over_refusal.select_false_refusal` on val (look-risky: the refused ones).
    4. Test, once, with the chosen vector: :func:`~refusal_lens.over_refusal.evaluate_on_test` (unmodified vs
       ablated; no trade-off sweep) on ``test`` and, with ``config.holdout``, on ``holdout``
       (``report["holdout"]``).

    ``refusal_direction`` is ``[d_model]``, the selected refusal direction (any norm); ``layer`` and
    ``position`` say where it came from (recorded in the report and metadata).

    Returns ``(report, vector, metadata)``: a JSON-ready dict for ``report.json``; the chosen false-refusal unit
    vector (float64, CPU), or ``None`` when the stage stopped or nothing was selected; metadata describing it.
    """
    if not 0 <= config.threshold < 1:
        raise ValueError(f"threshold must be a refusal rate in [0, 1), got {config.threshold}")
    r = unit_refusal(refusal_direction, model.cfg.d_model)
    val = over_refusal_prompts("val")
    refused, gate = false_refusals(model, val.look_risky_texts[: config.n_val], max_new_tokens=config.max_new_tokens,
                                   batch_size=config.batch_size)
    report: dict = {"threshold": config.threshold, "refusal_direction": {"layer": layer, "pos": position},
                    "look_risky_val_refusal": rounded(gate), "ran": gate["rate"] > config.threshold}
    log(f"over-refusal: look-risky val refusal {gate['rate']:.1%} (threshold {config.threshold:.0%})")
    if not report["ran"]:
        return report, None, {}
    selection = _stage_selection(model, r, refused, val, config, report)
    if selection.best is None:
        report["selection_failed"] = "no false-refusal candidate passed the filters; see selection.table"
        return report, None, {}
    pos, fr_layer, share = selection.best
    vector = selection.direction
    report["selected"] = {"pos": pos, "layer": fr_layer, "orthogonalize": share,
                          "cosine_with_refusal_direction": round(float(vector @ r), 6)}
    log(f"over-refusal: selected pos {pos}, layer {fr_layer}, orthogonalize {share:g} ({selection.rule})")
    for split in ("test", "holdout") if config.holdout else ("test",):
        report[split] = evaluate_on_test(model, vector, refusal_direction=r, n_test=config.n_test,
                                         max_new_tokens=config.max_new_tokens, n_null=config.n_null, seed=config.seed,
                                         batch_size=config.batch_size, split=split)
    metadata = {"pos": pos, "layer": fr_layer, "orthogonalize": share, "hook": "resid_pre", "model": model.info.spec,
                "refusal_direction": {"layer": layer, "pos": position}, "rule": selection.rule}
    return report, vector, metadata


def _stage_selection(model: Model, r: Tensor, refused: list[str], val: OverRefusalPrompts, config: OverRefusalConfig,
                     report: dict) -> FalseRefusalSelection:
    """Candidates on train and the selection on val, both recorded in ``report``."""
    candidates = false_refusal_candidates(model, n=config.n_train, filter_train=config.filter_train,
                                          positions=config.positions, layers=config.layers,
                                          batch_size=config.batch_size)
    prompts = {**val.for_selection(config.n_val), "look_risky": refused}
    selection = select_false_refusal(
        model, candidates, refusal_direction=r, **prompts, orthogonalize=config.orthogonalize,
        keep_harmful=config.keep_harmful, kl_max=config.kl_max, fallback=config.fallback, n_null=config.n_null,
        seed=config.seed, batch_size=config.batch_size)
    meta = candidates.metadata  # diff_in_means names the first side "harmful": here the look-risky prompts
    report["train"] = {"n_look_risky": meta["n_harmful"], "n_harmless": meta["n_harmless"],
                       **{k: meta[k] for k in ("n_look_risky_before_filter", "n_harmless_before_filter",
                                               "filter_train")}}
    null_kl = None if selection.null_kl is None else [round(float(x), 5) for x in selection.null_kl]
    thresholds = {**selection.thresholds.summary(), "orthogonalize": list(selection.orthogonalize)}
    report["selection"] = {"thresholds": thresholds,
                           "baseline": rounded(selection.baseline), "rule": selection.rule,
                           "table": records(selection.table), "null_kl": null_kl}
    return selection
