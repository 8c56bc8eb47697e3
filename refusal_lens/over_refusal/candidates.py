"""False-refusal candidates: look-risky minus harmless means, partially orthogonalized against refusal.

``orthogonalize`` is the share of a candidate's component along the unit refusal direction ``r̂`` that is
removed, ``w - orthogonalize (w·r̂) r̂`` (the paper's ``ortho_lambda``, λ): 1 = orthogonal to the refusal
direction, 0 = the plain difference in means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..chat import check_instructions
from ..directions import Directions, InvalidDirectionError, diff_in_means, unit_direction
from ..metrics import refusal_score
from ..models import Model
from ..streaming import mean_activations
from .prompts import over_refusal_prompts

__all__ = ["PAPER_ORTHOGONALIZE", "remove_component", "false_refusal_direction", "candidate_vector",
           "refusal_cosines", "false_refusal_candidates", "unit_refusal", "check_orthogonalize"]

# The paper's setting (mainlp/False-Refusal-Mitigation, configs/cfg.yaml: ortho_lambda).
PAPER_ORTHOGONALIZE = 1.0
_ZERO_RTOL = 1e-8


def unit_refusal(refusal_direction: Tensor, d_model: int) -> Float[Tensor, " d_model"]:
    """The refusal direction as a float64 unit vector on CPU (:func:`refusal_lens.unit_direction`)."""
    return unit_direction(refusal_direction, d_model, name="refusal_direction")


def check_orthogonalize(orthogonalize: float) -> float:
    """``orthogonalize`` as a float, or a ``ValueError`` unless it is a number in [0, 1]."""
    if isinstance(orthogonalize, bool) or not isinstance(orthogonalize, (int, float)) or not 0 <= orthogonalize <= 1:
        raise ValueError(
            f"orthogonalize must be a number in [0, 1] (the share of the refusal component removed: 1 = "
            f"orthogonal to the refusal direction, 0 = the plain difference in means), got {orthogonalize!r}"
        )
    return float(orthogonalize)


def remove_component(vector: Float[Tensor, "... d_model"], refusal_unit: Float[Tensor, " d_model"],
                     orthogonalize: float) -> Float[Tensor, "... d_model"]:
    """``v - orthogonalize (v·r̂) r̂`` for each row ``v`` (float64; ``r̂`` must be unit norm; not normalized)."""
    vector = vector.to(torch.float64)
    return vector - orthogonalize * (vector @ refusal_unit)[..., None] * refusal_unit


def _normalized(raw: Tensor, refusal_unit: Tensor, orthogonalize: float, where: str) -> Tensor:
    """``raw`` with its refusal component (times ``orthogonalize``) removed, normalized; clear errors for zero."""
    if raw.norm() <= 0:
        raise InvalidDirectionError(
            f"the look-risky and harmless means coincide {where} (e.g. resid_pre of layer 0, where every "
            "prompt ends with the same template token); pick a later layer"
        )
    removed = remove_component(raw, refusal_unit, orthogonalize)
    if removed.norm() <= _ZERO_RTOL * raw.norm():
        raise InvalidDirectionError(
            f"the look-risky minus harmless difference {where} lies along the refusal direction, so removing "
            f"{orthogonalize:g} of that component leaves nothing; use orthogonalize < 1 or another layer or position"
        )
    return removed / removed.norm()


def false_refusal_direction(
    model: Model,
    look_risky: Sequence[str],
    harmless: Sequence[str],
    *,
    refusal_direction: Float[Tensor, " d_model"],
    layer: int,
    position: int = -1,
    orthogonalize: float = PAPER_ORTHOGONALIZE,
    batch_size: int = 16,
) -> Float[Tensor, " d_model"]:
    """The false-refusal direction at one site: a float64 unit vector ``[d_model]`` on CPU.

    ``w = mean(look_risky) - mean(harmless)`` of ``resid_pre[layer]`` at ``position`` (a negative offset
    from the prompt end), both means over raw instructions in the model's chat format, then
    ``w - orthogonalize (w·r̂) r̂`` with ``orthogonalize`` in [0, 1] and ``r̂`` the unit refusal direction
    (1: orthogonal to ``r``; 0: the plain difference in means), normalized.

    Raises ``ValueError`` for ``orthogonalize`` outside [0, 1] or a prompt in both lists, and
    ``InvalidDirectionError`` for a refusal direction of the wrong width (or zero / NaN) and for a zero vector:
    equal means at the site, or a difference that lies along ``r`` when ``orthogonalize = 1``.
    """
    orthogonalize = check_orthogonalize(orthogonalize)
    r = unit_refusal(refusal_direction, model.cfg.d_model)
    look_risky, harmless = check_instructions(look_risky, model.chat), check_instructions(harmless, model.chat)
    overlap = set(look_risky) & set(harmless)
    if overlap:
        raise ValueError(f"{len(overlap)} prompt(s) are in both sets, e.g. {next(iter(overlap))[:60]!r}")
    kwargs = dict(positions=[position], layers=[layer], batch_size=batch_size)
    raw = (mean_activations(model, look_risky, **kwargs) - mean_activations(model, harmless, **kwargs))[0, 0]
    return _normalized(raw, r, orthogonalize, f"at layer {layer}, position {position}")


def candidate_vector(candidates: Directions, refusal_direction: Float[Tensor, " d_model"], position: int, layer: int,
                     orthogonalize: float) -> Float[Tensor, " d_model"]:
    """One candidate, partially orthogonalized and normalized, as :func:`false_refusal_direction` computes it."""
    orthogonalize = check_orthogonalize(orthogonalize)
    r = unit_refusal(refusal_direction, candidates.d_model)
    return _normalized(candidates.vector(position, layer), r, orthogonalize,
                       f"at layer {layer}, position {position}")


def refusal_cosines(candidates: Directions, refusal_direction: Float[Tensor, " d_model"]) -> pd.DataFrame:
    """Cosine of each raw candidate (e.g. look-risky minus harmless) with the refusal direction.

    One row per ``(pos, layer)``: ``cosine`` (NaN where the candidate has zero norm) and ``norm``
    (the candidate's length, activation units).
    """
    r = unit_refusal(refusal_direction, candidates.d_model)
    cosine = candidates.unit() @ r
    norm = candidates.vectors.norm(dim=-1)
    return pd.DataFrame([
        {"pos": pos, "layer": layer, "cosine": float(cosine[p, l]) if candidates.valid[p, l] else math.nan,
         "norm": float(norm[p, l])}
        for p, pos in enumerate(candidates.positions) for l, layer in enumerate(candidates.layers)])


def false_refusal_candidates(model: Model, *, n: int | None = None, filter_train: bool = True,
                             positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
                             batch_size: int = 32) -> Directions:
    """Raw false-refusal candidates from the train split: look-risky minus plain harmless means at ``resid_pre``.

    The first ``n`` look-risky and plain harmless train prompts (``None``: all); with ``filter_train`` (the
    paper's ``filter_or`` / ``filter_train``) only the look-risky prompts the model refuses and the harmless
    ones it answers, by the sign of the refusal score. ``positions`` default to every end-of-instruction
    position, ``layers`` to all. The counts before and after the filter are in ``metadata``.
    """
    train = over_refusal_prompts("train")
    look_risky, harmless = train.look_risky_texts[:n], list(train.harmless)[:n]
    before = {"n_look_risky_before_filter": len(look_risky), "n_harmless_before_filter": len(harmless)}
    if filter_train:
        look_risky = _filtered(model, look_risky, refused=True, batch_size=batch_size)
        harmless = _filtered(model, harmless, refused=False, batch_size=batch_size)
    if len(look_risky) < 2 or len(harmless) < 2:
        raise ValueError(f"too few train prompts after the refusal filter ({len(look_risky)} look-risky refused, "
                         f"{len(harmless)} harmless answered): pass filter_train=False or a larger n")
    candidates = diff_in_means(model, look_risky, harmless, positions=positions, layers=layers, batch_size=batch_size)
    candidates.metadata.update(before, filter_train=filter_train,
                               set="over-refusal[train] vs refusal-pairs general[train]")
    return candidates


def _filtered(model: Model, prompts: Sequence[str], *, refused: bool, batch_size: int) -> list[str]:
    scores = refusal_score(model, list(prompts), batch_size=batch_size)
    return [p for p, s in zip(prompts, scores) if (s > 0) == refused]
