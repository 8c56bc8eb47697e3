"""Subspace statistics against NumPy, base-vs-chat comparison, and the suffix search on a tiny model."""

import jaxtyping
import numpy as np
import pytest
import torch

import refusal_lens as rl
from refusal_lens import base_vs_chat, subspace, suffix
from refusal_lens.stats import principal_angles, subspace_rank

from .conftest import PROMPTS


def numpy_principal_angles(a, b):
    """Principal angles by the textbook route: orthonormalize with NumPy's QR, cosines from its SVD."""
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)
    return np.sort(np.degrees(np.arccos(cosines)))


def test_principal_angles_match_numpy_and_known_cases():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=(4, 20))
    np.testing.assert_allclose(principal_angles(torch.tensor(a), torch.tensor(b)).numpy(), numpy_principal_angles(a, b),
                               atol=1e-8)
    e = np.eye(5)
    # span{e0, e1} vs span{e1, e2}: one shared axis (0 degrees), one orthogonal (90 degrees).
    np.testing.assert_allclose(principal_angles(torch.tensor(e[[0, 1]]), torch.tensor(e[[1, 2]])).numpy(), [0, 90],
                               atol=1e-6)
    # A 30-degree rotation in the (e0, e1) plane.
    rotated = np.cos(np.pi / 6) * e[0] + np.sin(np.pi / 6) * e[1]
    np.testing.assert_allclose(principal_angles(torch.tensor(e[[0]]), torch.tensor(rotated[None])).numpy(), [30],
                               atol=1e-6)
    # the function's own check (users) or, under the test suite's shape checking, jaxtyping's: either names it
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="different spaces|d_model"):
        principal_angles(torch.zeros(1, 3), torch.zeros(1, 4))


def test_subspace_rank_matches_numpy_and_extremes():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6, 30)) * np.array([10, 5, 1, 0.5, 0.1, 0.1])[:, None]
    s = np.linalg.svd(vectors, compute_uv=False)
    p = s / s.sum()
    expected = np.exp(-(p * np.log(p)).sum())
    explained = np.cumsum(s**2) / (s**2).sum()
    result = subspace_rank(torch.tensor(vectors), variance=0.9)
    assert result["effective_rank"] == pytest.approx(expected, rel=1e-10)
    assert result["rank_for_variance"] == int(np.searchsorted(explained, 0.9) + 1)
    parallel = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    assert subspace_rank(parallel)["effective_rank"] == pytest.approx(1.0)
    assert subspace_rank(torch.eye(4))["effective_rank"] == pytest.approx(4.0)


def test_stacked_basis_finds_the_shared_direction():
    """Five layers share e0 plus small layer-specific parts: the first basis vector is e0."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.zeros(16, dtype=torch.float64)
    shared[0] = 1.0
    vectors = (shared + 0.03 * torch.randn(5, 16, generator=generator, dtype=torch.float64))[None]  # [pos, layer, d]
    directions = rl.Directions(
        vectors=vectors, positions=[-1], layers=list(range(5)), hook="resid_pre", model="synthetic"
    )
    basis = subspace.stacked_basis(directions, 3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    assert abs(float(basis[0, 0])) > 0.99
    with pytest.raises(ValueError, match="k must lie"):
        subspace.stacked_basis(directions, 6)


def test_pair_difference_basis_is_numpy_pca(tiny_model):
    harmful, harmless = PROMPTS, ["Tell me a joke.", "What is two plus two?", "Name a colour."]
    pairs = subspace.pair_differences(tiny_model, harmful, harmless, layer=1)
    reference = np.linalg.svd(pairs.numpy(), full_matrices=False)[2][:2]  # uncentred principal axes
    pca = subspace.pair_difference_basis(tiny_model, harmful, harmless, 2, layer=1)
    torch.testing.assert_close(pca @ pca.T, torch.eye(2), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.abs((pca.double().numpy() * reference).sum(-1)), [1, 1], atol=1e-5)
    with pytest.raises(ValueError, match="equal length"):
        subspace.pair_differences(tiny_model, harmful, harmless[:2], layer=1)


def test_refusal_vs_rank_rows_and_zero_rank_is_baseline(tiny_model):
    basis = torch.eye(64)[:2]
    table = subspace.refusal_vs_rank(tiny_model, basis, PROMPTS, max_new_tokens=2)
    assert table.k.tolist() == [0, 1, 2]
    assert table.refusal_score[0] == pytest.approx(float(rl.refusal_score(tiny_model, PROMPTS).mean()))
    assert table.refusal_score[1] != table.refusal_score[0]


def test_direction_cosines_and_twin_checks(tiny_model):
    harmful, harmless = PROMPTS, ["Tell me a joke.", "What is two plus two?", "Name a colour."]
    chat = rl.diff_in_means(tiny_model, harmful, harmless)
    table = base_vs_chat.direction_cosines(chat, chat)
    assert np.isnan(table.cosine[0])  # resid_pre of layer 0 at the last token: the same token, a zero direction
    assert table.cosine[1] == pytest.approx(1.0)
    flipped = rl.Directions(vectors=-chat.vectors, positions=chat.positions, layers=chat.layers, hook=chat.hook,
                            model="flipped")
    assert base_vs_chat.direction_cosines(chat, flipped).cosine[1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="different layers"):
        base_vs_chat.direction_cosines(chat, chat.subset(layers=[1]))


def test_ablation_effect_on_the_base_twin(tiny_model):
    table = base_vs_chat.ablation_effect(tiny_model, torch.eye(64)[0], PROMPTS, max_new_tokens=2)
    assert table.condition.tolist() == ["none", "ablated"]
    assert table.refusal_score[0] == pytest.approx(float(rl.refusal_score(tiny_model, PROMPTS).mean()))


def test_gcg_lowers_the_refusal_score_and_round_trips(tiny_model):
    search = suffix.gcg_suffix(tiny_model, PROMPTS[:2], n_tokens=4, steps=3, top_k=16, search_width=8)
    assert len(search.losses) == 4
    assert all(b <= a for a, b in zip(search.losses, search.losses[1:]))  # never accepts a worse suffix
    ids = tiny_model.tokenizer(search.suffix, add_special_tokens=False)["input_ids"]
    assert ids == search.token_ids
    score = float(rl.refusal_score(tiny_model, search.apply(PROMPTS[:2])).mean())
    assert score == pytest.approx(search.losses[-1], abs=1e-3)


def test_token_regions_cover_instruction_and_suffix(tiny_model):
    instruction, tail = "Tell me a joke.", " ! ! !"
    instruction_idx, suffix_idx = suffix.token_regions(tiny_model, instruction, tail)
    ids = tiny_model.chat.tokenize([instruction + tail])["input_ids"][0]
    assert tiny_model.tokenizer.decode(ids[instruction_idx]) == instruction
    assert tiny_model.tokenizer.decode(ids[suffix_idx]) == tail
    shares = suffix.attention_shares(tiny_model, [instruction], tail, [(0, 0), (1, 3)])
    assert ((shares.instruction_share + shares.suffix_share) <= 1 + 1e-9).all()
    assert (shares.suffix_share > 0).all()


def test_suffix_analysis_rows_match_direct_measurements(tiny_model):
    v = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(3)), dim=0)
    harmless = ["Tell me a joke.", "Name a colour."]
    conditions, per_head = suffix.suffix_analysis(tiny_model, v, PROMPTS[:2], harmless, {"bangs": " ! ! !"}, layer=1,
                                                  heads=[(0, 0), (0, 2)], max_new_tokens=2)
    assert conditions.condition.tolist() == ["harmful", "harmful + bangs", "harmless"]
    acts = rl.activations(tiny_model, [p + " ! ! !" for p in PROMPTS[:2]], positions=[-1], layers=[1])[:, 0, 0]
    expected = torch.nn.functional.cosine_similarity(acts.double(), v.double()[None], dim=-1).mean()
    assert conditions.cosine[1] == pytest.approx(float(expected), abs=1e-6)
    assert len(per_head) == 6 and (per_head[per_head.condition == "harmful"].suffix_share == 0).all()
    assert (per_head[per_head.condition == "harmful + bangs"].suffix_share > 0).all()


def test_random_suffix_stops_when_no_draw_round_trips(tiny_model):
    """A tokenizer whose tokens always merge when joined: the search must end with a reason, not loop forever."""

    class Merging:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __len__(self):
            return len(self.inner)

        def __call__(self, text, **kwargs):
            encoded = self.inner(text, **kwargs)
            encoded["input_ids"] = encoded["input_ids"][:1]  # everything merges into one token
            return encoded

    assert suffix.random_suffix(tiny_model, 3, seed=0).startswith(" ")
    class WithMergingTokenizer:  # the model with that tokenizer swapped in (still an rl.Model)
        def __init__(self, model):
            self.model, self.tokenizer = model, Merging(model.tokenizer)

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __call__(self, *args, **kwargs):
            return self.model(*args, **kwargs)

        def hooks(self, *args, **kwargs):
            return self.model.hooks(*args, **kwargs)

    merging = WithMergingTokenizer(tiny_model)
    with pytest.raises(ValueError, match="no random 3-token suffix re-tokenized to itself in 50 draws"):
        suffix.random_suffix(merging, 3, max_tries=50)
    with pytest.raises(ValueError, match="n_tokens"):
        suffix.random_suffix(tiny_model, 0)
