"""The KL filter's null: what ablating a random unit direction costs, and thresholds read against it.

Ablating *any* direction at every layer and position moves the next-token distribution, and by more
in a narrow model than in a wide one, so an absolute KL limit (the paper's 0.1 nats for refusal, set on
models 2048-8192 wide) means different things at different widths. Both selections therefore accept
``kl_max="null:q"``: the ``q``-quantile of the mean KL of ablating seeded random unit directions on the
same harmless prompts, computed before any candidate is scored so that no candidate's score can move it.

:func:`random_direction_kl` is the null on its own; :func:`null_kl` computes it through a
:class:`~refusal_lens.scorer.Scorer` that already holds the unmodified logits; :func:`summary` is its
JSON form in reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .interventions import ablate
from .models import Model
from .scorer import Scorer

__all__ = ["check_kl_max", "resolve_kl_max", "null_size", "random_directions", "null_kl", "random_direction_kl",
           "share_below", "summary"]

# The null's size when a "null:q" threshold needs it and none was asked for.
DEFAULT_N_NULL = 16


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


def resolve_kl_max(kl_max: float | str, null: Tensor | None) -> tuple[float, str]:
    """The KL limit in nats and how it was set: ``kl_max`` itself, or the ``q`` quantile of ``null`` for
    ``"null:q"``."""
    if isinstance(kl_max, str):
        q = float(kl_max.removeprefix("null:"))
        return float(torch.quantile(null, q)), f"null:{q:g}"
    return float(kl_max), f"{kl_max:g}"


def null_size(kl_max: float | str, n_null: int) -> int:
    """How many random directions to ablate: ``n_null``, or :data:`DEFAULT_N_NULL` when it is 0 and ``kl_max``
    is a ``"null:q"`` threshold (checked by :func:`check_kl_max`)."""
    quantile = check_kl_max(kl_max)  # raises on a malformed threshold, whatever n_null is
    return n_null or (DEFAULT_N_NULL if quantile is not None else 0)


def random_directions(n_directions: int, d_model: int, seed: int) -> Float[Tensor, "n_directions d_model"]:
    """Row ``k`` of ``torch.randn(n_directions, d_model, dtype=float64)`` from a generator seeded with ``seed``,
    normalized: the null's directions (float64, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d_model, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=-1, keepdim=True)


def null_kl(model: Model, scorer: Scorer, n_directions: int, seed: int, *, progress: bool = False
            ) -> Float[Tensor, " n_directions"]:
    """Mean KL over ``scorer``'s prompts of ablating each of :func:`random_directions` (float64 nats)."""
    directions = random_directions(n_directions, model.cfg.d_model, seed)
    return torch.stack([scorer.kl(ablate(model, v).hooks).mean()
                        for v in tqdm(directions, disable=not progress, desc="KL null (random directions)",
                                      unit="direction")])


def random_direction_kl(
    model: Model,
    instructions: Sequence[str],
    *,
    n_directions: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> Float[Tensor, " n_directions"]:
    """Mean last-token KL(unmodified || ablated) over ``instructions`` for random unit directions, float64 nats.

    The null distribution to read a KL filter against (see the module docstring). Directions as
    :func:`random_directions`; ablation as :func:`~refusal_lens.interventions.ablate`, KL as the selections'.
    """
    if n_directions < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions}")
    return null_kl(model, Scorer(model, instructions, batch_size), n_directions, seed)


def share_below(null: Float[Tensor, " n_directions"], kl: float) -> float:
    """Share of the random directions whose KL is below ``kl``: a direction's quantile in the null."""
    return float((null < kl).double().mean())


def summary(null: Float[Tensor, " n_directions"], *, below: float | None = 0.1, kl: float | None = None) -> dict:
    """The null as JSON: ``n``, ``median``, ``min``, ``max`` and ``values`` (nats, 5 digits); with ``below``,
    ``share_below_<below>`` (share of random directions under that many nats, default the paper's 0.1); with
    ``kl`` (a direction's mean KL), ``share_below``: the share of random directions with a lower KL (4 digits)."""
    out = {"n": len(null), "median": round(float(null.median()), 5), "min": round(float(null.min()), 5),
           "max": round(float(null.max()), 5)}
    if below is not None:
        out[f"share_below_{below:g}"] = round(float((null < below).double().mean()), 4)
    out["values"] = [round(float(x), 5) for x in null]
    if kl is not None:
        out["share_below"] = round(share_below(null, kl), 4)
    return out
