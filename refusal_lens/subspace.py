"""Is refusal one direction or several? Rank-k bases and refusal under rank-k ablation.

Two ways to build an orthonormal basis ``[k, d_model]`` (rows ordered by how much
they explain):

* :func:`stacked_basis`: the per-layer difference-in-means unit directions at one
  position, stacked and reduced by an uncentred SVD (their top right singular
  vectors); the first one is the direction the layers share.
* :func:`pair_difference_basis`: an uncentred PCA of per-pair activation
  differences ``act(harmful_i) - act(harmless_i)`` from matched pairs at one
  (position, layer); the first component is close to the difference in means,
  later ones are what varies from pair to pair.

:func:`refusal_vs_rank` then ablates the first ``k`` basis vectors (``rl.ablate``
takes a basis) and measures refusal, for k = 1 ... K.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .directions import Directions
from .interventions import ablate
from .metrics import refusal_summary
from .models import Model
from .streaming import activations


def _top_right_singular(matrix: Tensor, k: int) -> Float[Tensor, "k d_model"]:
    if not 1 <= k <= min(matrix.shape):
        raise ValueError(f"k must lie in [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix, got {k}")
    _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return vh[:k].float()


def stacked_basis(directions: Directions, k: int, *, position: int = -1,
                  layers: Sequence[int] | None = None) -> Float[Tensor, "k d_model"]:
    """Top-``k`` orthonormal basis of the stacked unit directions at ``position`` over ``layers`` (default: every
    layer with a valid candidate)."""
    valid = directions.valid_layers(position)
    chosen = valid if layers is None else [l for l in layers if l in valid]
    stacked = torch.stack([directions.direction(position, l) for l in chosen])
    return _top_right_singular(stacked, k)


def pair_differences(model: Model, harmful: Sequence[str], harmless: Sequence[str], *, layer: int,
                     position: int = -1) -> Float[Tensor, "pair d_model"]:
    """``act(harmful_i) - act(harmless_i)`` at ``resid_pre[layer]``, ``position``, float64."""
    if len(harmful) != len(harmless):
        raise ValueError(f"matched pairs need lists of equal length, got {len(harmful)} and {len(harmless)}")
    kwargs = dict(positions=[position], layers=[layer])
    return (activations(model, harmful, **kwargs) - activations(model, harmless, **kwargs))[:, 0, 0].double()


def pair_difference_basis(model: Model, harmful: Sequence[str], harmless: Sequence[str], k: int, *, layer: int,
                          position: int = -1) -> Float[Tensor, "k d_model"]:
    """Top-``k`` uncentred principal components of matched-pair activation differences."""
    return _top_right_singular(pair_differences(model, harmful, harmless, layer=layer, position=position), k)


def refusal_vs_rank(model: Model, basis: Float[Tensor, "k d_model"], harmful: Sequence[str], *,
                    ranks: Sequence[int] | None = None, max_new_tokens: int = 32,
                    batch_size: int = 32) -> pd.DataFrame:
    """Refusal on ``harmful`` with the first ``k`` rows of ``basis`` ablated, for each k (0 = no ablation).

    Columns: ``k``, ``refusal_rate`` (substring judge on greedy completions, which
    are not kept) and ``refusal_score`` (mean log-odds at the last position).
    """
    basis = torch.as_tensor(basis)
    ranks = list(range(basis.shape[0] + 1)) if ranks is None else list(ranks)
    if any(not 0 <= k <= basis.shape[0] for k in ranks):
        raise ValueError(f"ranks must lie in [0, {basis.shape[0]}], got {ranks}")
    return pd.DataFrame([{"k": k, **refusal_summary(model, harmful, hooks=ablate(model, basis[:k]).hooks if k else [],
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size)}
                         for k in ranks])
