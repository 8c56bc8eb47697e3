"""Interventions, metrics and selection, each against an independent reference."""

import math

import pandas as pd
import pytest
import torch

import refusal_lens as rl
from refusal_lens.interventions import _projection_hook, orthonormal_basis
from refusal_lens.metrics import kl_divergence, refusal_log_odds

from .conftest import PROMPTS

SITES_TO_CHECK = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_mid", "hook_resid_post"]


def unit(d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(d, generator=generator), dim=0)


def record(model, names):
    """Hooks that store what a site holds after every earlier hook on it ran."""
    seen = {}
    return seen, [(name, lambda x, hook, name=name: seen.__setitem__(name, x.detach().clone())) for name in names]


def logits(model, prompts, hooks=()):
    batch = model.chat.tokenize(prompts)
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return model(batch["input_ids"], attention_mask=batch["attention_mask"])


def test_ablation_leaves_every_site_orthogonal(tiny_model):
    v = unit(64)
    names = [f"blocks.{l}.{s}" for l in range(2) for s in SITES_TO_CHECK] + ["ln_final.hook_in"]
    seen, recorders = record(tiny_model, names)
    with rl.ablate(tiny_model, v):
        logits(tiny_model, PROMPTS, recorders)
    for name, x in seen.items():
        mask = tiny_model.chat.tokenize(PROMPTS)["attention_mask"].bool()
        x = x[mask].double()
        assert ((x @ v.double()).abs() / x.norm(dim=-1).clamp_min(1e-12)).max() <= 1e-5, name


def test_ablating_twice_equals_once_and_alpha_scales(tiny_model):
    v = unit(64, seed=1)
    once = logits(tiny_model, PROMPTS, rl.ablate(tiny_model, v).hooks)
    twice = logits(tiny_model, PROMPTS, [*rl.ablate(tiny_model, v).hooks, *rl.ablate(tiny_model, v).hooks])
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(tiny_model, PROMPTS, rl.ablate(tiny_model, v, alpha=0).hooks),
                               logits(tiny_model, PROMPTS), rtol=0, atol=0)
    x = torch.randn(3, 5, 64)
    flipped = _projection_hook(orthonormal_basis(v, 64), 2.0)(x, None)  # r - 2<r,v>v reflects the component
    torch.testing.assert_close(flipped @ v, -(x @ v), rtol=0, atol=1e-5)


def test_no_hook_is_left_after_an_exception(tiny_model):
    with pytest.raises(RuntimeError, match="inside"):
        with rl.ablate(tiny_model, unit(64)):
            assert any(hp._forward_hooks for hp in tiny_model.hook_dict.values())
            raise RuntimeError("inside")
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())


def test_rank_k_ablation_removes_the_whole_span(tiny_model):
    basis = torch.stack([unit(64, s) for s in range(3)])
    seen, recorders = record(tiny_model, ["blocks.1.hook_resid_pre"])
    with rl.ablate(tiny_model, basis):
        logits(tiny_model, PROMPTS[:1], recorders)
    assert (seen["blocks.1.hook_resid_pre"].double() @ basis.double().T).abs().max() <= 1e-5
    q = orthonormal_basis(basis, 64).double()
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad,error",
    [
        (torch.ones(32), r"expected \[64\] \(d_model\)"),
        (torch.ones(3, 32), r"expected \[k, 64\]"),
        (torch.full((64,), math.nan), "NaN"),
        (torch.zeros(64), "span only 0"),
        (torch.stack([unit(64), 2 * unit(64)]), "span only 1"),
    ],
)
def test_bad_directions_are_refused(tiny_model, bad, error):
    with pytest.raises(rl.InvalidDirectionError, match=error):
        rl.ablate(tiny_model, bad)


def test_half_precision_activations_are_projected_in_float32():
    v = unit(64)
    x = (torch.randn(2, 4, 64) * 50).to(torch.bfloat16)
    out = _projection_hook(orthonormal_basis(v, 64), 1.0)(x, None)
    expected = (x.float() - (x.float() @ v)[..., None] * v).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_activation_addition_shifts_one_layer(tiny_model):
    vector = 3 * unit(64, seed=2)
    names = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"]
    base, recorders = record(tiny_model, names)
    logits(tiny_model, PROMPTS, recorders)
    shifted, recorders = record(tiny_model, names)
    with rl.add(tiny_model, vector, layer=1, alpha=-0.5):
        logits(tiny_model, PROMPTS, recorders)
    torch.testing.assert_close(shifted["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"],
                               (-0.5 * vector).expand_as(base["blocks.1.hook_resid_pre"]), rtol=0, atol=1e-5)
    assert torch.equal(shifted["blocks.0.hook_resid_pre"], base["blocks.0.hook_resid_pre"])
    with pytest.raises(rl.InvalidDirectionError, match=r"expected \[64\]"):
        rl.add(tiny_model, torch.ones(10), layer=0)
    with pytest.warns(DeprecationWarning, match="use alpha="):
        old_name = rl.add(tiny_model, vector, layer=1, coeff=-0.5)
    assert old_name.description == rl.add(tiny_model, vector, layer=1, alpha=-0.5).description


def test_weight_orthogonalization_equals_hook_ablation(refusal_model):
    harmful = ["How do I poison my neighbor's dog?", "Write a threatening letter.", "How can I steal a car?"]
    harmless = ["How do I train my dog?", "Write a thank-you letter.", "How can I wash a car?"]
    v = rl.diff_in_means(refusal_model, harmful, harmless, layers=[12]).direction(-1, 12)
    edited = rl.orthogonalize_weights(refusal_model, v)
    hooked = logits(refusal_model, PROMPTS, rl.ablate(refusal_model, v).hooks)
    assert (logits(edited, PROMPTS) - hooked).abs().max() <= 1e-3
    # the original is untouched, and the (untied) unembedding of the copy is unchanged
    assert (logits(refusal_model, PROMPTS) - hooked).abs().max() > 1e-2
    assert torch.equal(edited.unembed.original_component.weight, refusal_model.unembed.original_component.weight)
    assert "orthogonalized" in edited.info.spec


# -------------------------------------------------------------------- metrics
def test_refusal_log_odds_matches_a_plain_loop():
    logits_ = torch.randn(4, 50, dtype=torch.float64) * 3
    logits_[3, 17] = 60.0  # p within 1e-15 of 1: the paper's epsilon clips the score there
    tokens = [3, 17]
    for row in range(4):
        exps = [math.exp(x - max(logits_[row].tolist())) for x in logits_[row].tolist()]
        p = sum(exps[t] for t in tokens) / sum(exps)
        clipped = math.log(p + 1e-8) - math.log(1 - p + 1e-8)  # the paper's refusal_score
        assert float(refusal_log_odds(logits_, tokens)[row]) == pytest.approx(clipped, rel=1e-9, abs=1e-9)
        if row < 3:
            assert float(refusal_log_odds(logits_, tokens, epsilon=0)[row]) == pytest.approx(
                math.log(p) - math.log(1 - p), rel=1e-10)
    assert float(refusal_log_odds(logits_, tokens)[3]) == pytest.approx(math.log(1 + 1e-8) - math.log(1e-8), rel=1e-6)
    assert float(refusal_log_odds(logits_, tokens, epsilon=0)[3]) > 40  # the exact log-odds are not clipped


def test_kl_matches_a_plain_loop_and_is_zero_for_no_change(tiny_model):
    a, b = torch.randn(2, 30, dtype=torch.float64), torch.randn(2, 30, dtype=torch.float64)
    for row in range(2):
        pa, pb = a[row].softmax(-1).tolist(), b[row].softmax(-1).tolist()
        paper = sum(x * (math.log(x + 1e-6) - math.log(y + 1e-6)) for x, y in zip(pa, pb))  # kl_div_fn
        assert float(kl_divergence(a, b)[row]) == pytest.approx(paper, rel=1e-10)
        exact = sum(x * math.log(x / y) for x, y in zip(pa, pb))
        assert float(kl_divergence(a, b, epsilon=0)[row]) == pytest.approx(exact, rel=1e-10)
        assert paper != pytest.approx(exact, rel=1e-9)
    assert rl.kl_last_token(tiny_model, PROMPTS, hooks=rl.ablate(tiny_model, unit(64), alpha=0).hooks).abs().max() == 0
    assert rl.kl_last_token(tiny_model, PROMPTS, hooks=rl.ablate(tiny_model, unit(64)).hooks).min() > 0


def test_random_direction_kl_matches_a_plain_loop(tiny_model):
    null = rl.random_direction_kl(tiny_model, PROMPTS, n_directions=3, seed=5)
    directions = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for k, v in enumerate(directions):
        expected = rl.kl_last_token(tiny_model, PROMPTS, hooks=rl.ablate(tiny_model, v).hooks).mean()
        assert float(null[k]) == pytest.approx(float(expected), rel=1e-6)
    assert null.dtype == torch.float64 and (null > 0).all()
    assert not torch.equal(null, rl.random_direction_kl(tiny_model, PROMPTS, n_directions=3, seed=6))
    with pytest.raises(ValueError, match="n_directions"):
        rl.random_direction_kl(tiny_model, PROMPTS, n_directions=0)


def test_refusal_score_uses_last_position_of_padded_prompts(smollm2):
    scores = rl.refusal_score(smollm2, PROMPTS)
    for prompt, score in zip(PROMPTS, scores):
        ids = smollm2.tokenizer(smollm2.chat.format([prompt])[0], add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():
            alone = refusal_log_odds(smollm2(ids)[:, -1], smollm2.chat.refusal_tokens)
        assert float(score) == pytest.approx(float(alone), abs=1e-3)


def test_ce_loss_is_on_reply_tokens_only_with_one_bos(tiny_model):
    """Against a plain loop over the HF model: each reply token's -log p given the prompt and the reply so far."""
    instructions = ["Name a colour.", "Tell me a joke about a cat who learned to play the piano."]
    replies = ["Blue, like the sky on a clear day.", "Why did the cat sit on the keys? To play mew-sic."]
    tokenizer, hf = tiny_model.tokenizer, tiny_model.original_model
    total, count, everything = 0.0, 0, []
    for prompt, reply in zip(tiny_model.chat.format(instructions), replies):
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(reply, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logp = hf(ids).logits[0, :-1].double().log_softmax(-1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        total += float(nll[len(context) - 1 :].sum())
        count += len(target)
        everything.append(nll)
    ce = rl.ce_loss(tiny_model, instructions, replies)
    assert ce == pytest.approx(total / count, rel=1e-5)
    all_tokens = float(torch.cat(everything).mean())  # template and instruction tokens would change the value
    assert abs(ce - all_tokens) > 1e-3
    with pytest.raises(ValueError, match="one reply per instruction"):
        rl.ce_loss(tiny_model, instructions, replies[:1])
    with pytest.raises(ValueError, match="empty reply"):
        rl.ce_loss(tiny_model, instructions, [replies[0], " "])


# ------------------------------------------------------------------ selection
def test_lazy_selection_picks_what_full_scoring_picks(smollm2):
    harmful = ["How do I pick a lock to break into a house?", "Write a threatening letter to my neighbor.",
               "How can I poison a dog?", "Explain how to steal a car."]
    harmless = [
        "How do I bake bread?",
        "Write a letter to my neighbor.",
        "How can I train a dog?",
        "Explain how cars work.",
    ]
    found = rl.diff_in_means(smollm2, harmful, harmless, positions=[-1, -2], layers=[4, 10, 16, 20, 27])
    # The untuned model refuses nothing, so loosen the filters for candidates to pass; this test is about
    # lazy scoring giving the same pick, not about the thresholds.
    kwargs = dict(kl_max=10.0, induce_min=-100.0, n_boot=20, progress=False)
    lazy = rl.select_direction(smollm2, found, harmful, harmless, n_finalists=2, **kwargs)
    full = rl.select_direction(smollm2, found, harmful, harmless, full_table=True, **kwargs)
    assert lazy.best == full.best and lazy.best is not None
    assert full.table.scored[full.table.layer < 24].all() and not full.table.scored[full.table.layer >= 24].any()
    assert lazy.table.scored.sum() < full.table.scored.sum()
    scored = lazy.table[lazy.table.scored]
    reference = full.table.set_index(["pos", "layer"]).loc[list(zip(scored.pos, scored.layer))]
    for column in ("induce", "kl"):  # replayed induce and full-pass induce agree too
        torch.testing.assert_close(torch.tensor(scored[column].values), torch.tensor(reference[column].values),
                                   rtol=1e-5, atol=1e-6)
    assert (lazy.table[lazy.table.layer == 27].reason == "layer filter").all()
    assert 0 <= lazy.win_rate <= 1 and lazy.direction.norm() == pytest.approx(1.0)
    row = lazy.best_row
    assert row.kept and row.bypass == lazy.table[lazy.table.kept].bypass.min()

    # Thresholds that some (q = 0.25: bypass goes first) or most (q = 0.75: induce goes first) candidates
    # fail on induce: each gets only the scores needed to rule it out, and the pick does not change.
    for q in (0.25, 0.75):
        strict = dict(kwargs, induce_min=float(full.table[full.table.scored].induce.quantile(q)))
        lazy = rl.select_direction(smollm2, found, harmful, harmless, n_finalists=2, **strict)
        complete = rl.select_direction(smollm2, found, harmful, harmless, full_table=True, **strict)
        assert lazy.best == complete.best and lazy.best is not None
        reference = complete.table.set_index(["pos", "layer"])
        for column in ("bypass", "induce", "kl"):
            known = lazy.table.dropna(subset=[column])
            torch.testing.assert_close(torch.tensor(known[column].values), torch.tensor(
                reference.loc[list(zip(known.pos, known.layer)), column].values), rtol=1e-5, atol=1e-6)
        failed = lazy.table[lazy.table.induce < strict["induce_min"]]
        assert len(failed) and failed.kl.isna().all() and failed.reason.str.contains("KL not scored").all()
        assert failed.bypass.isna().all() == (q == 0.75)


def test_induce_replay_from_recorded_block_inputs_equals_full_forward(smollm2):
    from refusal_lens.scorer import Scorer

    prompts = ["How do I bake bread?", "Write a short letter to my neighbor about the fence.", "Explain tides."]
    scorer = Scorer(smollm2, prompts, batch_size=2)  # two batches, left padding in the first
    reference = scorer.logits(record_from=5)
    torch.testing.assert_close(scorer.logits_from(5), reference, rtol=0, atol=1e-5)
    vector = 4.0 * torch.randn(smollm2.cfg.d_model, generator=torch.Generator().manual_seed(0))
    for layer in (5, 17, 29):
        hooks = rl.add(smollm2, vector, layer=layer).hooks
        replayed = scorer.logits_from(layer, hooks)
        assert (replayed - reference).abs().max() > 1e-2  # the addition changed the logits
        torch.testing.assert_close(replayed, scorer.logits(hooks), rtol=1e-5, atol=1e-4)
    assert all(not hp._forward_hooks for hp in smollm2.hook_dict.values())
    assert all(not block._forward_pre_hooks for block in smollm2.blocks)


def test_selection_falls_back_to_full_passes_when_replay_fails(smollm2, monkeypatch):
    from refusal_lens import scorer

    harmful = ["How can I poison a dog?", "Explain how to steal a car."]
    harmless = ["How can I train a dog?", "Explain how cars work."]
    found = rl.diff_in_means(smollm2, harmful, harmless, positions=[-1], layers=[8, 16])
    kwargs = dict(kl_max=10.0, induce_min=-100.0, n_boot=0, progress=False)
    replayed = rl.select_direction(smollm2, found, harmful, harmless, **kwargs)

    def broken(self, layer, hooks=()):
        raise RuntimeError("block needs its KV cache")

    monkeypatch.setattr(scorer.Scorer, "logits_from", broken)
    with pytest.warns(UserWarning, match="does not reproduce the full forward pass.*block needs its KV cache"):
        fallback = rl.select_direction(smollm2, found, harmful, harmless, **kwargs)
    pd.testing.assert_frame_equal(fallback.table, replayed.table, rtol=1e-5)


def test_orthogonalized_model_exports_to_hugging_face(tiny_model, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    v = unit(64, seed=5)
    edited = rl.orthogonalize_weights(tiny_model, v, provenance={"position": -1, "layer": 1,
                                                                 "data": {"harmful_train": "ab12"}})
    path = rl.save_hf(edited, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings is False  # the head was untied before editing W_E
    ids = tiny_model.chat.tokenize(PROMPTS)["input_ids"]
    mask = tiny_model.chat.tokenize(PROMPTS)["attention_mask"]
    with torch.no_grad():
        exported = reloaded(ids, attention_mask=mask).logits
    hooked = logits(tiny_model, PROMPTS, rl.ablate(tiny_model, v).hooks)
    assert (exported - hooked).abs().max() <= 1e-3
    card = json.loads((path / "refusal_lens.json").read_text())
    assert card["edit"] == "orthogonalize_weights" and len(card["direction"]) == 64
    assert card["equals_hook_ablation"] and card["residual_leak"] <= 1e-5
    assert (card["layer"], card["position"], card["data"]) == (1, -1, {"harmful_train": "ab12"})
    assert card["versions"]["refusal-lens"] == rl.__version__
    readme = (path / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: transformers") and "| direction layer | 1 |" in readme
    assert "`ab12`" in readme and f"| refusal_lens | {rl.__version__} |" in readme
