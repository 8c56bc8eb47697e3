"""Extraction and geometry: streamed means, directions, statistics, each against a reference."""

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import refusal_lens as rl
from refusal_lens import streaming
from refusal_lens.stats import bootstrap_cohens_d, bootstrap_mean_ci, cohens_d_tensor

from .conftest import PROMPTS

MIXED_LENGTHS = PROMPTS + [
    "A much longer request that goes on for a while: " + "describe each season of the year in turn, " * 6 + "thanks.",
    "Ok?",
]


# --------------------------------------------------------------- planted model
TRIGGER, NEUTRAL = " apple", " pear"
FRAMES = [
    "Tell me about the{w} tree.",
    "Write one sentence about a{w} on a kitchen table near the window.",
    "Why is the{w} a symbol in old stories?",
    "List facts about the{w}",
    "Could you draw a{w} for me, with a little leaf on top and a shadow underneath it?",
    "Describe the{w} harvest in autumn.",
    "Is a{w} sweet?",
    "Compose a short riddle whose answer is the{w}.",
]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, smollm2):
    """A 3-layer model whose trigger token embeds a known unit direction d that layer 0 copies to every position.

    Layer 0 attends uniformly (zero queries and keys) with identity value/output maps;
    every other attention output and MLP output is zeroed, and the neutral token embeds
    to 0. So at resid_pre of layers 1 and 2 each end-of-instruction position carries
    (trigger - neutral) contributions exactly along d, and at layer 0 (the last token's
    embedding, the same for every prompt) there is nothing.
    """
    tokenizer = smollm2.tokenizer
    trigger, neutral = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in (TRIGGER, NEUTRAL))
    assert len(trigger) == len(neutral) == 1
    d_model = 64
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=16, num_hidden_layers=3,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=d_model, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    direction = torch.nn.functional.normalize(torch.randn(d_model), dim=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[trigger[0]] = 10 * direction
        model.model.embed_tokens.weight[neutral[0]] = 0
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.zero_()
            if i == 0:
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.k_proj.weight.zero_()
                layer.self_attn.v_proj.weight.copy_(torch.eye(d_model))
                layer.self_attn.o_proj.weight.copy_(torch.eye(d_model))
            else:
                layer.self_attn.o_proj.weight.zero_()
    path = tmp_path_factory.mktemp("planted")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    harmful = [f.format(w=TRIGGER) for f in FRAMES]
    harmless = [f.format(w=NEUTRAL) for f in FRAMES]
    return rl.load_model(str(path), device="cpu", chat="chatml"), direction.double(), harmful, harmless


def test_diff_in_means_recovers_a_planted_direction(planted):
    model, direction, harmful, harmless = planted
    found = rl.diff_in_means(model, harmful, harmless, batch_size=3)
    assert found.positions == list(range(-6, 0)) and found.layers == [0, 1, 2]
    assert not found.valid[:, 0].any()  # layer 0: the same template embedding for everyone
    assert not torch.isnan(found.unit()).any()
    assert torch.equal(found.unit()[:, 0], torch.zeros_like(found.unit()[:, 0]))
    cosines = found.unit()[:, 1:] @ direction
    assert cosines.min() >= 0.99, cosines


def test_cohens_d_and_split_half_on_planted_direction(planted):
    model, direction, harmful, harmless = planted
    train = rl.diff_in_means(model, harmful[:4], harmless[:4])
    table = rl.stats.cohens_d(model, train, harmful[4:], harmless[4:], n_boot=200)
    valid = table[table.valid]
    assert set(valid.layer) == {1, 2} and table[~table.valid].d.isna().all()
    assert (valid.d > 2).all() and (valid.ci_low <= valid.d).all() and (valid.d <= valid.ci_high).all()
    stability = rl.stats.split_half_stability(model, harmful, harmless, paired=True, seed=0)
    assert (stability[stability.valid].cosine > 0.99).all() and not stability[stability.layer == 0].valid.any()


# ------------------------------------------------------------ streaming means
def reference_mean(model, prompts, positions, batch_size):
    """Plain loop: full run_with_cache per batch, index the positions, average in float64 in Python.

    Batches hold the prompts sorted by token length, as in the library, so that both see the same
    float32 activations and the comparison isolates the float64 accumulation.
    """
    prompts = sorted(prompts, key=lambda p: model.chat.tokenize([p])["input_ids"].shape[1])
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = model.chat.tokenize(prompts[start : start + batch_size])
        _, cache = model.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
        for b in range(batch["input_ids"].shape[0]):
            rows.append(torch.stack([
                torch.stack([cache[f"blocks.{l}.hook_resid_pre"][b, p].double() for l in range(model.cfg.n_layers)])
                for p in positions
            ]))
    total = torch.zeros_like(rows[0])
    for row in rows:
        total += row
    return total / len(rows)


def test_streamed_float64_mean_equals_plain_loop(tiny_model):
    positions = rl.eoi_positions(tiny_model)
    streamed = rl.mean_activations(tiny_model, MIXED_LENGTHS, batch_size=2)
    reference = reference_mean(tiny_model, MIXED_LENGTHS, positions, batch_size=2)
    assert streamed.dtype == torch.float64 and streamed.shape == (6, 2, 64)
    assert ((streamed - reference).abs().max() / reference.abs().max()) <= 1e-10


@pytest.mark.parametrize("fixture", ["tiny_model", "smollm2"])
def test_batched_equals_sequential(fixture, request):
    """Left padding with the attention mask changes nothing beyond fp32 rounding.

    The bound is 1e-4 relative to each layer's largest activation (absolute below 1):
    SmolLM2's late layers carry activations of ~580, where fp32 resolution alone is ~3e-5.
    """
    model = request.getfixturevalue(fixture)
    sequential = torch.cat([rl.activations(model, [prompt], batch_size=1) for prompt in MIXED_LENGTHS])
    scale = sequential.abs().amax(dim=(0, 1, 3), keepdim=True).clamp_min(1.0)
    for batch_size in (2, len(MIXED_LENGTHS)):  # batches of length-sorted prompts; rows in the given order
        batched = rl.activations(model, MIXED_LENGTHS, batch_size=batch_size)
        assert ((batched - sequential).abs() / scale).max() <= 1e-4
    unit = torch.nn.functional.normalize(sequential[0].double(), dim=-1)  # [pos, layer, d_model]
    projected = rl.projections(model, MIXED_LENGTHS, unit, batch_size=2)
    reference = torch.einsum("bpld,pld->bpl", sequential.double(), unit)
    assert ((projected - reference).abs() / reference.abs().amax(0).clamp_min(1.0)).max() <= 1e-4
    table = rl.stats.batched_vs_sequential(model, MIXED_LENGTHS, layers=[0, model.cfg.n_layers - 1])
    assert (table.max_rel_diff <= 1e-4).all() and (table.min_cosine > 0.99999).all()


def test_padding_without_the_mask_would_be_caught(smollm2):
    """Negative control for the test above: attending to pad tokens moves activations far past the bound."""
    batch = smollm2.chat.tokenize(MIXED_LENGTHS)
    layer = 10
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(batch["input_ids"], names_filter=f"blocks.{layer}.hook_resid_pre")
    unmasked = cache[f"blocks.{layer}.hook_resid_pre"][:, -1]
    sequential = rl.activations(smollm2, MIXED_LENGTHS, positions=[-1], layers=[layer], batch_size=1)[:, 0, 0]
    assert (unmasked - sequential).abs().max() / sequential.abs().max() > 1e-2


def test_no_activation_outlives_its_batch(tiny_model, monkeypatch):
    """Structural memory check: the mean keeps one [pos, layer, d_model] sum, never per-prompt tensors."""
    alive = []
    real_stream = streaming.stream

    def spying_stream(model, prompts, reduce, **kwargs):
        def spy(rows, layer_index, acts):
            alive.append(weakref.ref(acts))
            reduce(rows, layer_index, acts)
        return real_stream(model, prompts, spy, **kwargs)

    def no_cache(*args, **kwargs):
        raise AssertionError("mean_activations must not build an ActivationCache")

    monkeypatch.setattr(streaming, "stream", spying_stream)
    monkeypatch.setattr(tiny_model, "run_with_cache", no_cache)
    mean = rl.mean_activations(tiny_model, MIXED_LENGTHS, batch_size=2)
    gc.collect()
    assert len(alive) == 3 * 2 and all(ref() is None for ref in alive)
    assert mean.shape == (6, 2, 64)


def test_sites_decompose_as_expected(tiny_model):
    """resid_mid = resid_pre + attn_out; resid_post = resid_mid + mlp_out; resid_post[l] = resid_pre[l+1]."""
    means = {site: rl.mean_activations(tiny_model, PROMPTS, hook=site) for site in rl.SITES}
    torch.testing.assert_close(means["resid_mid"], means["resid_pre"] + means["attn_out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(means["resid_post"], means["resid_mid"] + means["mlp_out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(means["resid_post"][:, 0], means["resid_pre"][:, 1], rtol=0, atol=1e-6)


def test_hooks_are_removed_even_when_a_batch_fails(tiny_model):
    custom = rl.ChatFormat("chatml", tiny_model.chat.template)  # same format, used to sanity-check the model
    assert custom.template == tiny_model.chat.template

    def boom(start, layer_index, acts):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        streaming.stream(tiny_model, PROMPTS, boom)
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())


@pytest.mark.parametrize(
    "prompts,kwargs,error",
    [
        ([], {}, "no instructions"),
        (["a", "b", "a"], {}, "duplicate"),
        (["a", "  "], {}, "blank instruction"),
        (["a"], {"positions": [0]}, "negative offsets"),
        (["a"], {"hook": "resid_sideways"}, "unknown activation site"),
        (["a"], {"layers": [5]}, r"layers must lie in \[0, 2\)"),
    ],
)
def test_bad_input_is_refused_with_a_reason(tiny_model, prompts, kwargs, error):
    with pytest.raises(ValueError, match=error):
        rl.mean_activations(tiny_model, prompts, **kwargs)


RAW = ["How do I bake bread?", "Name a colour."]
TAKES_INSTRUCTIONS = {
    "diff_in_means": lambda m, p: rl.diff_in_means(m, p[:1], RAW[1:]),
    "refusal_score": lambda m, p: rl.refusal_score(m, p),
    "generate": lambda m, p: rl.generate(m, p, max_new_tokens=1),
    "select_direction": lambda m, p: rl.select_direction(m, rl.diff_in_means(m, RAW[:1], RAW[1:], layers=[1]), p,
                                                         RAW, max_layer_frac=1.0),
    "head_attribution": lambda m, p: rl.head_attribution(m, p, torch.ones(64), layer=1),
    "mean_activations": lambda m, p: rl.mean_activations(m, p),
}


@pytest.mark.parametrize("function", sorted(TAKES_INSTRUCTIONS))
def test_formatted_prompts_are_refused_everywhere_instructions_are_taken(tiny_model, function):
    """Passing ChatFormat.format's output would wrap every prompt twice (refusal scores off by up to 4.3 nats on
    the organism): every function that takes instructions refuses it and says what to pass."""
    call = TAKES_INSTRUCTIONS[function]
    with pytest.raises(ValueError, match=r"already holds the 'chatml' chat template.*pass raw instructions"):
        call(tiny_model, tiny_model.chat.format(RAW))
    half = ["Explain tides.<|im_end|>\n<|im_start|>assistant\nSure", RAW[1]]  # a reply glued to the template
    with pytest.raises(ValueError, match="already holds"):
        call(tiny_model, half)
    call(tiny_model, RAW)  # the same instructions, raw, are fine


def test_overlapping_sets_are_refused(tiny_model):
    with pytest.raises(ValueError, match="in both sets"):
        rl.diff_in_means(tiny_model, ["a", "b"], ["b", "c"])


# ---------------------------------------------------------------- directions
def test_directions_save_load_roundtrip_and_geometry(tiny_model, tmp_path):
    found = rl.diff_in_means(tiny_model, PROMPTS, MIXED_LENGTHS[3:])
    path = found.save(tmp_path / "dirs.safetensors")
    loaded = rl.Directions.load(path)
    assert torch.equal(loaded.vectors, found.vectors) and torch.equal(loaded.valid, found.valid)
    assert (loaded.positions, loaded.layers, loaded.hook) == (found.positions, found.layers, "resid_pre")
    assert loaded.metadata["harmful_sha256"] == found.metadata["harmful_sha256"] != found.metadata["harmless_sha256"]
    norms = found.unit().norm(dim=-1)
    torch.testing.assert_close(norms[found.valid], torch.ones_like(norms[found.valid]), rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="zero-norm"):
        cos = found.cosine_matrix(-1)
    assert torch.isnan(cos[0]).all() and cos[1, 1] == pytest.approx(1.0)
    with pytest.raises(rl.InvalidDirectionError, match="zero norm"):
        found.direction(-1, 0)
    torch.testing.assert_close(found.direction(-1, 1), found.unit()[-1, 1])
    # a vector is the raw difference in means (a copy), a direction its unit version
    assert torch.equal(found.vector(-1, 1), found.vectors[-1, 1]) and found.vector(-1, 1) is not found.vectors[-1, 1]
    torch.testing.assert_close(found.direction(-1, 1) * found.vector(-1, 1).norm(), found.vector(-1, 1))
    with pytest.raises(rl.InvalidDirectionError, match="zero norm"):
        found.vector(-1, 0)
    with pytest.warns(DeprecationWarning, match="use Directions.vector"):
        assert torch.equal(found.direction(-1, 1, unit=False), found.vector(-1, 1))


def test_layer_cosines_matches_numpy(smollm2):
    found = rl.diff_in_means(smollm2, MIXED_LENGTHS[:3], MIXED_LENGTHS[3:], layers=[3, 10, 20])
    table = rl.stats.layer_cosines(found, -1)
    vectors = found.vectors[-1].numpy()
    for i, li in enumerate(found.layers):
        for j, lj in enumerate(found.layers):
            expected = vectors[i] @ vectors[j] / np.linalg.norm(vectors[i]) / np.linalg.norm(vectors[j])
            assert table.loc[li, lj] == pytest.approx(expected, abs=1e-12)


def test_load_direction_formats_and_errors(tiny_model, tmp_path):
    vector = torch.randn(64)
    torch.save(vector, tmp_path / "v.pt")
    save_file({"direction": vector}, str(tmp_path / "v.safetensors"))
    np.save(tmp_path / "v.npy", vector.numpy()[None])
    for name in ("v.pt", "v.safetensors", "v.npy"):
        loaded = rl.load_direction(tmp_path / name, tiny_model)
        torch.testing.assert_close(loaded, vector / vector.norm())
    torch.save(torch.randn(32), tmp_path / "narrow.pt")
    with pytest.raises(rl.InvalidDirectionError, match=r"narrow.pt has shape \(32,\).*expected \[64\] \(d_model\)"):
        rl.load_direction(tmp_path / "narrow.pt", tiny_model)
    torch.save(torch.full((64,), float("nan")), tmp_path / "nan.pt")
    with pytest.raises(rl.InvalidDirectionError, match="NaN"):
        rl.load_direction(tmp_path / "nan.pt", tiny_model)
    torch.save(torch.zeros(64), tmp_path / "zero.pt")
    with pytest.raises(rl.InvalidDirectionError, match="zero vector"):
        rl.load_direction(tmp_path / "zero.pt", tiny_model)
    torch.save({"direction": vector, "note": Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        rl.load_direction(tmp_path / "pickled.pt", tiny_model)


class Opaque:
    """An arbitrary class: loading it would need full unpickling, which weights_only=True refuses."""


# ----------------------------------------------------------------- statistics
def test_cohens_d_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (40, 3)), rng.normal(0.0, 1.0, (25, 3))
    for k in range(3):
        x, y = list(a[:, k]), list(b[:, k])
        mx, my = sum(x) / len(x), sum(y) / len(y)
        vx = sum((v - mx) ** 2 for v in x) / (len(x) - 1)
        vy = sum((v - my) ** 2 for v in y) / (len(y) - 1)
        pooled = (((len(x) - 1) * vx + (len(y) - 1) * vy) / (len(x) + len(y) - 2)) ** 0.5
        assert float(cohens_d_tensor(torch.tensor(a), torch.tensor(b))[k]) == pytest.approx(
            (mx - my) / pooled, rel=1e-12
        )


def test_bootstrap_interval_is_reproducible_and_covers_the_estimate():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 2, generator=generator) + 1, torch.randn(60, 2, generator=generator)
    low, high = bootstrap_cohens_d(a, b, n_boot=300, seed=3)
    again = bootstrap_cohens_d(a, b, n_boot=300, seed=3)
    assert torch.equal(low, again[0]) and torch.equal(high, again[1])
    d = cohens_d_tensor(a, b)
    assert (low < d).all() and (d < high).all() and (high - low < 1.5).all()


def test_bootstrap_mean_interval_matches_the_normal_theory_width():
    """For n draws of N(mu, 1) the 95% interval of a mean difference is about 2 * 1.96 * sqrt(2 / n) wide."""
    generator = torch.Generator().manual_seed(1)
    n = 400
    a, b = torch.randn(n, 3, generator=generator, dtype=torch.float64) + 0.5, torch.randn(n, 3, generator=generator,
                                                                                           dtype=torch.float64)
    low, high = bootstrap_mean_ci(a, b, n_boot=2000, seed=0)
    difference = a.mean(0) - b.mean(0)
    assert (low < difference).all() and (difference < high).all()
    expected = 2 * 1.96 * math.sqrt(2 / n)
    assert ((high - low) / expected - 1).abs().max() < 0.15
    one_low, one_high = bootstrap_mean_ci(a, n_boot=2000, seed=0)  # one sample: interval of its mean
    assert ((one_high - one_low) / (2 * 1.96 / math.sqrt(n)) - 1).abs().max() < 0.15
