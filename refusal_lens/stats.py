"""Statistics on candidate directions, returned as pandas DataFrames.

Separability is measured on held-out prompts: build ``Directions`` on the
training split, then pass the validation or test split here. Cohen's d uses the
pooled standard deviation (ddof=1) of the scalar projections onto the unit
direction; its confidence interval is a percentile bootstrap over prompts,
resampling each group with replacement.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .directions import Directions, diff_in_means
from .models import Model
from .streaming import activations, projections


def cohens_d_tensor(a: Float[Tensor, "n_a ..."], b: Float[Tensor, "n_b ..."]) -> Float[Tensor, ...]:
    """Cohen's d of ``a`` vs ``b`` along dim 0: (mean_a - mean_b) / pooled sd (ddof=1), float64."""
    a, b = a.double(), b.double()
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a < 2 or n_b < 2:
        raise ValueError(f"Cohen's d needs at least 2 samples per group, got {n_a} and {n_b}")
    pooled = ((n_a - 1) * a.var(0, correction=1) + (n_b - 1) * b.var(0, correction=1)) / (n_a + n_b - 2)
    return (a.mean(0) - b.mean(0)) / pooled.sqrt()


def _percentile_bootstrap(
    statistic: Callable[..., Tensor],
    a: Float[Tensor, "n_a ..."],
    b: Float[Tensor, "n_b ..."] | None,
    *,
    n_boot: int,
    ci: float,
    seed: int,
    chunk: int = 100,
) -> tuple[Float[Tensor, ...], Float[Tensor, ...]]:
    """Percentile-bootstrap interval ``(low, high)`` of ``statistic(a)`` or ``statistic(a, b)``.

    Rows (prompts) of ``a`` and ``b`` are resampled independently with replacement, ``n_boot`` times;
    indices are drawn ``chunk`` resamples at a time (``a``'s, then ``b``'s), so a seed fixes the interval.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        idx_a = torch.randint(len(a), (size, len(a)), generator=generator)
        if b is None:
            samples += [statistic(a[i]) for i in idx_a]
        else:
            idx_b = torch.randint(len(b), (size, len(b)), generator=generator)
            samples += [statistic(a[i], b[j]) for i, j in zip(idx_a, idx_b)]
    boots = torch.stack(samples)
    tail = (1 - ci) / 2
    return boots.quantile(tail, dim=0), boots.quantile(1 - tail, dim=0)


def bootstrap_cohens_d(
    a: Float[Tensor, "n_a ..."],
    b: Float[Tensor, "n_b ..."],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[Float[Tensor, ...], Float[Tensor, ...]]:
    """Percentile-bootstrap confidence interval ``(low, high)`` of :func:`cohens_d_tensor`."""
    return _percentile_bootstrap(cohens_d_tensor, a, b, n_boot=n_boot, ci=ci, seed=seed)


def bootstrap_mean_ci(
    a: Float[Tensor, "n_a ..."],
    b: Float[Tensor, "n_b ..."] | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[Float[Tensor, ...], Float[Tensor, ...]]:
    """Percentile-bootstrap interval ``(low, high)`` of ``a.mean(0)``, or of ``a.mean(0) - b.mean(0)``."""
    if b is None:
        return _percentile_bootstrap(lambda x: x.mean(0), a, None, n_boot=n_boot, ci=ci, seed=seed)
    return _percentile_bootstrap(lambda x, y: x.mean(0) - y.mean(0), a, b, n_boot=n_boot, ci=ci, seed=seed)


def cohens_d(
    model: Model,
    directions: Directions,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Held-out separability of harmful vs harmless prompts along every candidate.

    Returns one row per (pos, layer): ``d``, ``ci_low``, ``ci_high``, the group means
    of the projections (activation units), ``n_harmful``, ``n_harmless`` and ``valid``
    (False, with NaN statistics, where the candidate has zero norm).
    """
    unit = directions.unit()
    kwargs = dict(positions=directions.positions, layers=directions.layers, hook=directions.hook,
                  batch_size=batch_size)
    proj_harmful = projections(model, harmful, unit, **kwargs)
    proj_harmless = projections(model, harmless, unit, **kwargs)
    d = cohens_d_tensor(proj_harmful, proj_harmless)
    low, high = bootstrap_cohens_d(proj_harmful, proj_harmless, n_boot=n_boot, ci=ci, seed=seed)
    rows = []
    for p, position in enumerate(directions.positions):
        for l, layer in enumerate(directions.layers):
            valid = bool(directions.valid[p, l])
            nan = float("nan")
            rows.append({
                "pos": position, "layer": layer,
                "d": float(d[p, l]) if valid else nan,
                "ci_low": float(low[p, l]) if valid else nan,
                "ci_high": float(high[p, l]) if valid else nan,
                "mean_harmful": float(proj_harmful[:, p, l].mean()) if valid else nan,
                "mean_harmless": float(proj_harmless[:, p, l].mean()) if valid else nan,
                "n_harmful": proj_harmful.shape[0], "n_harmless": proj_harmless.shape[0],
                "valid": valid,
            })
    return pd.DataFrame(rows)


def layer_cosines(directions: Directions, position: int = -1) -> pd.DataFrame:
    """Layer-by-layer cosine matrix of the candidates at one position, indexed by layer number."""
    matrix = directions.cosine_matrix(position).numpy()
    return pd.DataFrame(matrix, index=pd.Index(directions.layers, name="layer"),
                        columns=pd.Index(directions.layers, name="layer"))


def batched_vs_sequential(
    model: Model,
    prompts: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
) -> pd.DataFrame:
    """Per layer, how far left-padded batched activations are from one-prompt-at-a-time ones.

    Columns: ``min_cosine`` (over prompts and positions; 1 for two zero vectors), ``max_abs_diff`` and
    ``max_rel_diff`` (max |batched - sequential| / max |sequential|).
    """
    kwargs = dict(positions=positions, layers=layers, hook=hook)
    batched = activations(model, prompts, batch_size=batch_size, **kwargs).double()
    sequential = activations(model, prompts, batch_size=1, **kwargs).double()
    cosine = torch.nn.functional.cosine_similarity(batched, sequential, dim=-1)  # [batch, pos, layer]
    both_zero = (batched.norm(dim=-1) == 0) & (sequential.norm(dim=-1) == 0)
    cosine = torch.where(both_zero, 1.0, cosine)  # identical zero vectors (e.g. a zero-initialized pad embedding) agree
    diff = (batched - sequential).abs()
    layer_numbers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    return pd.DataFrame({
        "layer": layer_numbers,
        "min_cosine": cosine.amin(dim=(0, 1)).numpy(),
        "max_abs_diff": diff.amax(dim=(0, 1, 3)).numpy(),
        "max_rel_diff": (diff.amax(dim=(0, 1, 3)) / sequential.abs().amax(dim=(0, 1, 3))).numpy(),
    })


def split_half_stability(
    model: Model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    paired: bool = False,
    seed: int = 0,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
) -> pd.DataFrame:
    """Cosine between the difference-in-means candidates of two disjoint random halves of the data.

    With ``paired=True`` the two lists are matched pairs (``harmful[i]`` goes with
    ``harmless[i]``) and each pair stays in one half. One row per (pos, layer) with
    ``cosine`` and ``valid`` (False, cosine NaN, where either half's candidate has zero norm).
    """
    harmful, harmless = list(harmful), list(harmless)
    if paired and len(harmful) != len(harmless):
        raise ValueError(f"paired=True needs lists of equal length, got {len(harmful)} and {len(harmless)}")
    rng = random.Random(seed)
    halves = []
    shared_order = rng.sample(range(len(harmful)), len(harmful)) if paired else None
    for prompts in (harmful, harmless):
        if len(prompts) < 4:
            raise ValueError(f"split-half stability needs at least 4 prompts per set, got {len(prompts)}")
        order = shared_order or rng.sample(range(len(prompts)), len(prompts))
        shuffled = [prompts[i] for i in order]
        halves.append((shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]))
    kwargs = dict(positions=positions, layers=layers, hook=hook, batch_size=batch_size)
    first = diff_in_means(model, halves[0][0], halves[1][0], **kwargs)
    second = diff_in_means(model, halves[0][1], halves[1][1], **kwargs)
    cosine = (first.unit() * second.unit()).sum(-1)
    valid = first.valid & second.valid
    rows = [
        {"pos": position, "layer": layer, "cosine": float(cosine[p, l]) if valid[p, l] else float("nan"),
         "valid": bool(valid[p, l])}
        for p, position in enumerate(first.positions)
        for l, layer in enumerate(first.layers)
    ]
    return pd.DataFrame(rows)


def principal_angles(a: Float[Tensor, "k_a d_model"], b: Float[Tensor, "k_b d_model"]) -> Float[Tensor, " k"]:
    """Principal angles (degrees, ascending) between the spans of the rows of ``a`` and of ``b``, float64.

    With orthonormal bases ``Q_a, Q_b`` the cosines of the angles are the singular
    values of ``Q_a Q_b^T`` (Björck & Golub); ``k = min(rank a, rank b)``.
    """
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    a, b = a[None] if a.ndim == 1 else a, b[None] if b.ndim == 1 else b
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"subspaces live in different spaces: width {a.shape[-1]} vs {b.shape[-1]}")
    q_a, q_b = torch.linalg.qr(a.T).Q, torch.linalg.qr(b.T).Q
    cosines = torch.linalg.svdvals(q_a.T @ q_b).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).sort().values


def subspace_rank(vectors: Float[Tensor, "n d_model"], *, variance: float = 0.9) -> dict[str, float]:
    """How many dimensions a set of vectors (e.g. per-layer unit directions) really spans.

    ``effective_rank``: exp of the entropy of the normalized singular values (Roy &
    Vetterli 2007; 1 for parallel vectors, n for orthogonal ones of equal norm).
    ``rank_for_variance``: the fewest singular directions holding ``variance`` of
    the squared norm (uncentred, so a shared direction counts).
    """
    vectors = torch.as_tensor(vectors).double()
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"expected a [n, d_model] matrix, got shape {tuple(vectors.shape)}")
    s = torch.linalg.svdvals(vectors)
    if s.sum() == 0:
        raise ValueError("all vectors are zero")
    p = s / s.sum()
    p = p[p > 0]
    explained = (s**2).cumsum(0) / (s**2).sum()
    return {
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "rank_for_variance": int((explained < variance - 1e-12).sum()) + 1,
        "variance": variance,
    }


def wilson_ci(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for a binomial proportion ``successes / n`` (e.g. a refusal rate).

    ``p = k/n``, ``z`` the normal quantile at ``1 - (1 - confidence)/2``; the interval is
    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` (Wilson 1927). Unlike the normal
    approximation it stays inside [0, 1] and is not degenerate at 0 or n successes.
    """
    from statistics import NormalDist

    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise TypeError(f"successes and n must be whole counts, got {successes!r} and {n!r}")
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1 observations, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n] = [0, {n}], got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)
