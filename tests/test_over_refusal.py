"""Over-refusal: the data set, the false-refusal direction on a planted model, selection, Wilson CIs, the figure."""

import itertools
import json
import re
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import refusal_lens as rl
from refusal_lens import plots
from refusal_lens.data import OVER_REFUSAL_KINDS, holdout_everyday, over_refusal_split_of
from refusal_lens.over_refusal import (
    FALLBACK_RULE,
    METHOD_BOTH,
    METHOD_FALSE_REFUSAL,
    METHOD_REFUSAL,
    PAPER_RULE,
    OverRefusalConfig,
    by_kind,
    compare_methods,
    evaluate_on_test,
    over_refusal_prompts,
    over_refusal_stage,
    partial_ablation_scan,
    rate_row,
    result_tables,
    select_false_refusal,
    trade_off_alphas,
)
from refusal_lens.selection import SelectionError
from refusal_lens.stats import wilson_ci


# ------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def over():
    return rl.load_contrast("over-refusal")


def test_set_meets_its_datasheet(over):
    developed = over.select(["train", "val", "test"])
    kinds = Counter(i.kind for i in developed.harmless)
    assert len(developed.harmless) == 268 and len(developed.harmful) == 67 and len(developed.pairs()) == 67
    assert set(kinds) == set(OVER_REFUSAL_KINDS) and min(kinds.values()) >= 30, kinds
    assert kinds == {"homonym": 46, "figurative": 37, "safe_target": 37, "safe_context": 39, "history": 34,
                     "definition": 43, "privacy_public": 32}
    # The held-out files: 16 unpaired requests and 8 pairs per kind, 48 everyday requests.
    holdout = over.select("holdout")
    assert len(holdout.harmless) == 168 and len(holdout.harmful) == 56 and len(holdout.pairs()) == 56
    assert Counter(i.kind for i in holdout.harmless) == {kind: 24 for kind in OVER_REFUSAL_KINDS}
    assert Counter(i.kind for i in holdout.harmful) == {kind: 8 for kind in OVER_REFUSAL_KINDS}
    assert len(holdout_everyday()) == 48 == len(set(holdout_everyday()))
    categories = {i.category for i in rl.load_contrast("refusal-pairs").harmful}
    assert {i.category for i in over.harmful} <= categories
    assert all(i.category is None for i in over.harmless)
    # Each harmful counterpart shares its kind and pair id with the look-risky request it rewords.
    partner = {i.pair_id: i for i in over.harmless if i.pair_id}
    assert all(partner[i.pair_id].kind == i.kind for i in over.harmful)


def test_splits_are_fixed_disjoint_and_keep_pairs_together(over):
    parts = {s: rl.load_contrast("over-refusal", split=s) for s in ("train", "val", "test", "holdout")}
    texts = {s: set(p.harmful_texts) | set(p.harmless_texts) for s, p in parts.items()}
    assert all(not texts[a] & texts[b] for a, b in itertools.combinations(texts, 2))
    assert sum(map(len, texts.values())) == len(over.harmful) + len(over.harmless)
    assert sum(len(p.pairs()) for p in parts.values()) == len(over.pairs())  # no pair is cut
    assert not rl.load_contrast("over-refusal", split="organism").harmless  # the organism never saw this set
    # Pinned: the salted-hash rule and append-only rows keep every request in its split.
    counts = {s: (len(p.harmful), len(p.harmless)) for s, p in parts.items()}
    assert counts == {"train": (30, 107), "val": (19, 76), "test": (18, 85), "holdout": (56, 168)}
    assert all(i.pair_id.startswith("holdout_") for i in parts["holdout"].harmful)
    assert [over_refusal_split_of(f"pair-{n:03d}") for n in range(6)] == [i.split for i in over.harmless[:6]]
    assert over_refusal_split_of("single-000") == over.harmless[67].split


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_no_text_duplicates_refusal_pairs_or_itself(over):
    pairs = rl.load_contrast("refusal-pairs")
    theirs = {_norm(t) for t in pairs.harmful_texts + pairs.harmless_texts}
    ours = [_norm(t) for t in over.harmful_texts + over.harmless_texts + list(holdout_everyday())]
    assert not set(ours) & theirs
    assert len(set(ours)) == len(ours)


IMPERATIVES = ("Write", "Describe", "Explain", "List", "Give", "Tell")


def test_every_item_is_a_single_short_request(over):
    for text in (*over.harmful_texts, *over.harmless_texts, *holdout_everyday()):
        assert text == text.strip() and "\n" not in text and "\t" not in text and len(text) <= 160, text
        assert text.endswith("?") or (text.endswith(".") and text.startswith(IMPERATIVES)), text


def test_prompts_of_a_split_combine_the_sets():
    val = over_refusal_prompts("val")
    pairs = rl.load_contrast("refusal-pairs", split="val")
    assert len(val.look_risky) == 76 and len(val.harmful_counterparts) == 19
    assert set(val.harmless) == {i.text for i in pairs.harmless if i.kind == "general"}
    assert set(val.look_risky_pairs) == {i.text for i in pairs.harmless if i.kind == "look_risky"}
    assert val.all_harmful == [*pairs.harmful_texts, *val.harmful_counterparts]
    with pytest.raises(ValueError, match="split must be"):
        over_refusal_prompts("organism")
    # holdout: the held-out files alone; plain harmless are its own everyday requests.
    holdout = over_refusal_prompts("holdout")
    assert len(holdout.look_risky) == 168 and len(holdout.harmful_counterparts) == 56
    assert holdout.harmful == () and holdout.look_risky_pairs == () and holdout.harmless == holdout_everyday()
    assert holdout.all_harmful == list(holdout.harmful_counterparts)


def test_deprecated_names_still_work_and_warn():
    from dataclasses import asdict

    from refusal_lens import over_refusal

    val = over_refusal_prompts("val")
    with pytest.warns(DeprecationWarning, match="harmful_counterparts"):
        assert val.twins == val.harmful_counterparts
    with pytest.warns(DeprecationWarning, match="orthogonalize"):
        config = OverRefusalConfig(lambdas=(0.5, 1.0))
    assert config.orthogonalize == (0.5, 1.0) and "lambdas" not in asdict(config)
    assert replace(config, n_val=3).orthogonalize == (0.5, 1.0)
    with pytest.warns(DeprecationWarning, match="PAPER_ORTHOGONALIZE"):
        assert over_refusal.PAPER_LAMBDA == over_refusal.PAPER_ORTHOGONALIZE == 1.0


# ------------------------------------------------------------------ planted model
A, B, FILLER = " apple", " pear", " x"
D_MODEL = 16


def _sized(model, head: str, length: int) -> str:
    """``head`` plus filler words so that the formatted prompt is exactly ``length`` tokens long."""
    for k in range(length):
        text = head + FILLER * k
        n = int(model.chat.tokenize([text])["attention_mask"].sum())
        if n == length:
            return text
        assert n < length, f"cannot make {head!r} exactly {length} tokens"
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, chatml_tokenizer):
    """A 2-layer model whose ``resid_pre[1]`` at the last position is ``(a·#A + b·#B) / n`` exactly.

    Every token embeds to 0 except `` apple`` (``a``) and `` pear`` (``b``), both in {±1}^16, so their
    RMSNorm is themselves (mean square 1; eps 1e-10 vanishes next to 1 in float32). Layer 0 attends
    uniformly (zero queries and keys) with identity value and output maps; every MLP and layer 1's
    attention write nothing. With prompts of n = 32 or 64 tokens every value is a dyadic rational,
    so the means are exact and the expected direction can be written down.
    """
    tokenizer = chatml_tokenizer
    ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in (A, B, FILLER)}
    assert all(len(v) == 1 for v in ids.values())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=D_MODEL, rms_norm_eps=1e-10,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    hf = LlamaForCausalLM(config)
    a = torch.where(torch.rand(D_MODEL) < 0.5, -1.0, 1.0)
    b = torch.where(torch.rand(D_MODEL) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        hf.model.embed_tokens.weight.zero_()
        hf.model.embed_tokens.weight[ids[A][0]] = a
        hf.model.embed_tokens.weight[ids[B][0]] = b
        for i, layer in enumerate(hf.model.layers):
            layer.mlp.down_proj.weight.zero_()
            if i == 0:
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.k_proj.weight.zero_()
                layer.self_attn.v_proj.weight.copy_(torch.eye(D_MODEL))
                layer.self_attn.o_proj.weight.copy_(torch.eye(D_MODEL))
            else:
                layer.self_attn.o_proj.weight.zero_()
    path = tmp_path_factory.mktemp("planted-over-refusal")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = rl.load_model(str(path), device="cpu", chat="chatml")
    frames = ["Tell me about the{w}", "Is a{w} good", "Why the{w} now", "Draw a{w} please"]
    look_risky = [_sized(model, f.format(w=A), 32) for f in frames]
    harmless = ([_sized(model, f.format(w=B), 32) for f in frames[:2]]
                + [_sized(model, f.format(w=" tree"), 64) for f in frames[2:]])
    # Expected mean difference at resid_pre[1], last position: a/32 - (b/32 + 0)/2 = a/32 - b/64.
    expected = a.double() / 32 - b.double() / 64
    return model, look_risky, harmless, expected


def _expected(d: torch.Tensor, r: torch.Tensor, share: float) -> torch.Tensor:
    """Independent closed form: d minus share times its projection on r (r of any norm), normalized."""
    v = d - share * torch.dot(d, r) / torch.dot(r, r) * r
    return v / torch.linalg.vector_norm(v)


def test_planted_activations_are_the_closed_form(planted):
    model, look_risky, harmless, expected = planted
    mean = lambda prompts: rl.mean_activations(model, prompts, positions=[-1], layers=[1])[0, 0]  # noqa: E731
    torch.testing.assert_close(mean(look_risky) - mean(harmless), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_false_refusal_direction_on_planted_model(planted, share):
    model, look_risky, harmless, expected = planted
    r = torch.linspace(-1.0, 2.0, D_MODEL, dtype=torch.float64) * 7  # not unit norm, overlaps d
    found = rl.false_refusal_direction(model, look_risky, harmless, refusal_direction=r, layer=1,
                                       orthogonalize=share, batch_size=3)
    assert found.dtype == torch.float64 and found.device.type == "cpu" and found.shape == (D_MODEL,)
    torch.testing.assert_close(found, _expected(expected, r, share), rtol=0, atol=1e-14)


def test_orthogonalize_one_is_orthogonal_zero_is_plain_and_between_is_linear(planted):
    model, look_risky, harmless, expected = planted
    r = torch.linspace(-1.0, 2.0, D_MODEL, dtype=torch.float64)
    r_hat = r / r.norm()
    get = lambda share: rl.false_refusal_direction(model, look_risky, harmless, refusal_direction=r,  # noqa: E731
                                                   layer=1, orthogonalize=share)
    assert abs(float(get(1.0) @ r_hat)) < 1e-15
    torch.testing.assert_close(get(0.0), expected / expected.norm(), rtol=0, atol=1e-15)
    # Unnormalized, v(s) = d - s (d·r̂) r̂: its r̂ component over its (fixed) orthogonal part falls linearly in s.
    d_perp = (expected - (expected @ r_hat) * r_hat).norm()
    for share in (0.0, 0.3, 0.6, 0.9):
        u = get(share)
        ratio = (u @ r_hat) / (u - (u @ r_hat) * r_hat).norm()
        assert abs(float(ratio) - (1 - share) * float(expected @ r_hat) / float(d_perp)) < 1e-13


def test_false_refusal_direction_errors(planted):
    model, look_risky, harmless, expected = planted
    r = torch.ones(D_MODEL)
    kwargs = dict(refusal_direction=r, layer=1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="orthogonalize must be a number in"):
            rl.false_refusal_direction(model, look_risky, harmless, orthogonalize=bad, **kwargs)
    with pytest.raises((TypeError, ValueError)):  # the type check (at test time) or the range check
        rl.false_refusal_direction(model, look_risky, harmless, orthogonalize=True, **kwargs)
    with pytest.raises(rl.InvalidDirectionError, match=r"expected \[16\]"):
        rl.false_refusal_direction(model, look_risky, harmless, refusal_direction=torch.ones(D_MODEL + 1), layer=1)
    with pytest.raises(rl.InvalidDirectionError, match="zero vector"):
        rl.false_refusal_direction(model, look_risky, harmless, refusal_direction=torch.zeros(D_MODEL), layer=1)
    with pytest.raises(rl.InvalidDirectionError, match="lies along the refusal direction"):
        rl.false_refusal_direction(model, look_risky, harmless, refusal_direction=-3 * expected, layer=1)
    # Half the component removed: still a direction, with half the projection of the plain one.
    half = rl.false_refusal_direction(model, look_risky, harmless, refusal_direction=expected, layer=1,
                                      orthogonalize=0.5)
    torch.testing.assert_close(half, expected / expected.norm(), rtol=0, atol=1e-15)
    with pytest.raises(rl.InvalidDirectionError, match="means coincide"):
        rl.false_refusal_direction(model, look_risky, harmless, layer=0, refusal_direction=r)
    with pytest.raises(ValueError, match="in both sets"):
        rl.false_refusal_direction(model, look_risky, look_risky[:1] + harmless, **kwargs)


# ------------------------------------------------------------------ selection on the organism
@pytest.fixture(scope="module")
def organism_selection(refusal_model):
    """A small selection: candidates at layers 8 and 12, last position, a few val prompts per set."""
    model = refusal_model
    train, val = over_refusal_prompts("train"), over_refusal_prompts("val")
    pairs_train = rl.load_contrast("refusal-pairs", split="train")
    refusal = rl.diff_in_means(model, pairs_train.harmful_texts[:16], list(train.harmless)[:16], positions=[-1],
                               layers=[12]).direction(-1, 12)
    candidates = rl.diff_in_means(model, train.look_risky_texts[:16], list(train.harmless)[16:32], positions=[-1],
                                  layers=[8, 12])
    # Look-risky: 4 that the organism refuses (greedy) among the first 12 val requests; 4 + 4 harmful (with
    # twins); 4 plain harmless.
    prompts = {**val.for_selection(4), "look_risky": [val.look_risky_texts[i] for i in (3, 8, 9, 10)]}
    selection = select_false_refusal(model, candidates, refusal_direction=refusal, orthogonalize=(1.0, 0.5),
                                     kl_max=10.0, keep_harmful=0.5, n_null=2, full_table=True, batch_size=8, **prompts)
    return model, refusal, candidates, prompts, selection


def test_selection_scores_match_an_independent_computation(organism_selection):
    model, refusal, candidates, prompts, selection = organism_selection
    table = selection.table
    assert set(table.layer) == {8, 12} and set(table.stage) == {"site", "orthogonalize"}
    harm_base = rl.refusal_score(model, prompts["harmful"]) > 0
    for row in table.itertuples():
        v = _candidate(candidates, refusal, row.layer, row.orthogonalize)
        hooks = rl.ablate(model, v).hooks
        look = rl.refusal_score(model, prompts["look_risky"], hooks=hooks)
        harm = rl.refusal_score(model, prompts["harmful"], hooks=hooks) > 0
        kl = rl.kl_last_token(model, prompts["harmless"], hooks=hooks)
        assert row.false_refusal == pytest.approx(float(look.mean()), abs=1e-6)
        assert row.look_risky_refusing == pytest.approx(float((look > 0).double().mean()))
        assert row.harmful_kept == pytest.approx(float(harm.double().mean() / harm_base.double().mean()))
        assert row.kl == pytest.approx(float(kl.mean()), rel=1e-5, abs=1e-8)
        assert row.cosine == pytest.approx(float(candidates.direction(-1, row.layer) @ (refusal / refusal.norm())))


def _candidate(candidates, refusal, layer, share):
    """Independent of the module: d - share (d·r)r/(r·r), normalized."""
    d = candidates.vector(-1, layer)
    v = d - share * (d @ refusal) / (refusal @ refusal) * refusal
    return v / v.norm()


def test_selection_applies_its_rule(organism_selection):
    _, refusal, candidates, _, selection = organism_selection
    table, thresholds = selection.table, selection.thresholds
    assert thresholds.bound("harmful_kept") == 0.5 and thresholds.kl_max == 10.0 and thresholds.max_layer == 24
    assert thresholds.bound("false_refusal") == pytest.approx(selection.baseline["false_refusal"])
    expected_kept = (table.false_refusal < selection.baseline["false_refusal"]) & (table.harmful_kept >= 0.5) & (
        table.kl <= 10.0)
    assert (table.kept == expected_kept).all()
    sites = table[table.stage == "site"]
    if not sites.kept.any():  # neither site lowers the false-refusal score here: no pick, and it says why
        assert selection.best is None and sites.reason.str.contains("does not lower").all()
        return
    best_site = sites[sites.kept].sort_values("false_refusal").iloc[0]
    at_site = table[(table.layer == best_site.layer) & (table.kept)]
    winner = at_site.sort_values("false_refusal").iloc[0]
    assert selection.best == (-1, int(winner.layer), float(winner.orthogonalize)) and selection.rule == PAPER_RULE
    assert table.chosen.sum() == 1 and table[table.chosen].iloc[0].orthogonalize == winner.orthogonalize
    torch.testing.assert_close(selection.direction, _candidate(candidates, refusal, int(winner.layer),
                                                               winner.orthogonalize),
                               rtol=0, atol=1e-12)
    assert len(selection.null_kl) == 2 and table.kl_null_quantile.between(0, 1).all()


def test_selection_stops_or_falls_back_when_nothing_passes(organism_selection):
    model, refusal, candidates, prompts, _ = organism_selection
    prompts = {"look_risky": prompts["look_risky"][:2], "harmful": prompts["harmful"][:4],
               "harmless": prompts["harmless"][:2]}
    strict = select_false_refusal(model, candidates, refusal_direction=refusal, kl_max=1e-12, n_null=0, batch_size=8,
                                  **prompts)
    assert strict.best is None and strict.rule is None and not strict.table.kept.any()
    assert strict.table.reason.str.contains("KL >|harmful_kept <|not scored").all()
    with pytest.raises(SelectionError, match="no false-refusal candidate passed"):
        _ = strict.direction
    fallback = select_false_refusal(model, candidates, refusal_direction=refusal, kl_max=1e-12, n_null=0,
                                    batch_size=8, fallback="lowest-kl", keep_harmful=1e-9, **prompts)
    eligible = fallback.table[(fallback.table.look_risky_refusing <= 0.5 * fallback.baseline["look_risky_refusing"])
                              & fallback.table.kl.notna()]
    if len(eligible):
        assert fallback.rule == FALLBACK_RULE
        assert fallback.best[1] == int(eligible.sort_values("kl").iloc[0].layer)
    else:
        assert fallback.best is None
    with pytest.raises(ValueError, match="kl_max='null:2'"):
        select_false_refusal(model, candidates, refusal_direction=refusal, kl_max="null:2", **prompts)
    with pytest.raises(ValueError, match="unknown fallback"):
        select_false_refusal(model, candidates, refusal_direction=refusal, fallback="best", **prompts)


def test_saved_vector_is_read_by_load_direction(organism_selection, tmp_path):
    model, refusal, candidates, _, _ = organism_selection
    vector = _candidate(candidates, refusal, 8, 1.0)
    path = rl.open_run(model, tmp_path).save_direction(3 * vector, layer=8, position=-1, source="test",
                                                       name="false_refusal")
    assert path.name == "false_refusal.safetensors"
    loaded = rl.load_direction(path, model)
    torch.testing.assert_close(loaded.double(), vector, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ rates, Wilson CIs, figure
def test_wilson_ci_against_hand_computation():
    # 8/10, z = 1.959964: centre (0.8 + z²/20)/(1 + z²/10) = 0.716740, half-width 0.226579.
    low, high = wilson_ci(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-6) and high == pytest.approx(0.943318, abs=1e-6)
    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)  # upper = z²/(n + z²)
    assert wilson_ci(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    narrow, wide = wilson_ci(50, 100, confidence=0.9), wilson_ci(50, 100, confidence=0.99)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    for args, error in (((3, 0), "n >= 1"), ((4, 3), r"\[0, 3\]"), ((1.5, 3), "whole counts|successes")):
        with pytest.raises((ValueError, TypeError), match=error):
            wilson_ci(*args)


def test_rates_by_kind():
    from refusal_lens.data import Instruction

    items = [Instruction("a?", kind="homonym"), Instruction("b?", kind="homonym"), Instruction("c?", kind="definition")]
    table = by_kind(items, ["I'm sorry, no.", "Sure: ...", "I cannot help."]).set_index("kind")
    assert table.loc["homonym", "refused"] == 1 and table.loc["homonym", "rate"] == 0.5
    assert table.loc["all", "n"] == 3 and table.loc["all", "refused"] == 2
    assert (table.loc["homonym", "ci_low"], table.loc["homonym", "ci_high"]) == pytest.approx(wilson_ci(1, 2))
    assert rate_row(["As an AI, I cannot"])["rate"] == 1.0
    with pytest.raises(ValueError, match="one reply per instruction"):
        by_kind(items, ["x"])


def test_trade_off_figure_and_comparison():
    import pandas as pd

    table = pd.DataFrame({
        "method": ["refusal direction, partial ablation"] * 3 + ["false-refusal vector (λ=1)"] * 2,
        "strength": [0.0, 0.05, 0.1, 0.0, 1.0],
        "look_risky_rate": [0.4, 0.25, 0.1, 0.4, 0.15], "look_risky_low": [0.3, 0.15, 0.05, 0.3, 0.08],
        "look_risky_high": [0.5, 0.35, 0.2, 0.5, 0.25], "look_risky_n": [40] * 5,
        "harmful_rate": [0.95, 0.9, 0.5, 0.95, 0.93], "harmful_low": [0.9, 0.8, 0.4, 0.9, 0.85],
        "harmful_high": [0.99, 0.95, 0.6, 0.99, 0.97], "harmful_n": [60] * 5,
    })
    fig = plots.trade_off(table)
    assert [t.name for t in fig.data] == ["refusal direction, partial ablation", "false-refusal vector (λ=1)"]
    first = fig.data[0]
    assert list(first.x) == pytest.approx([95.0, 90.0, 50.0]) and list(first.y) == pytest.approx([40.0, 25.0, 10.0])
    assert list(first.error_y.array) == pytest.approx([10.0, 10.0, 10.0])
    assert list(first.error_x.arrayminus) == pytest.approx([5.0, 10.0, 10.0])
    best = compare_methods(table, harmful_floor=0.9 * 0.95).set_index("method")
    assert best.loc["false-refusal vector (λ=1)", "look_risky_rate"] == 0.15
    assert best.loc["refusal direction, partial ablation", "look_risky_rate"] == 0.25  # 0.1 is below the floor


def test_trade_off_strengths_are_fixed_on_val(organism_selection):
    import pandas as pd

    scan = pd.DataFrame({"alpha": [0.02, 0.005, 0.01, 0.015, 0.03], "harmful_kept": [0.8, 0.95, 0.93, 0.83, 0.6]})
    assert trade_off_alphas(scan) == ([0.005, 0.01, 0.015, 0.02], [0.005, 0.01])
    assert trade_off_alphas(scan.assign(harmful_kept=0.5)) == ([0.005, 0.01, 0.015], [0.005])
    model, refusal, _, prompts, _ = organism_selection
    table = partial_ablation_scan(model, refusal, look_risky=prompts["look_risky"][:2], harmful=prompts["harmful"][:3],
                                  alphas=[0.0, 1.0])
    assert table.harmful_kept.tolist()[0] == 1.0 and table.harmful_kept.tolist()[1] <= 1.0
    assert list(table.columns) == ["alpha", "harmful_kept", "look_risky_refusing", "false_refusal"]


# ------------------------------------------------------------------ test evaluation and the main-job stage
def test_evaluate_on_test_is_consistent(organism_selection):
    model, refusal, candidates, _, _ = organism_selection
    result = evaluate_on_test(model, _candidate(candidates, refusal, 8, 1.0), refusal_direction=refusal,
                              refusal_alphas=[0.5], both_alphas=[0.5], n_test=1, max_new_tokens=4, n_null=2,
                              n_examples=1, batch_size=8)
    assert result["n"] == {"look_risky": 1, "look_risky_refusal_pairs": 1, "harmful_all": 2, "harmless": 1}
    rates = result["refusal_rate"]
    for conditions in rates.values():
        for rate in conditions.values():
            assert rate["ci_low"] <= rate["rate"] <= rate["ci_high"] and rate["refused"] <= rate["n"]
    checks = result["acceptance"]
    assert checks["harmful_kept_90pct"] == (rates["harmful_all"]["ablated"]["rate"]
                                            >= 0.9 * rates["harmful_all"]["baseline"]["rate"])
    assert checks["harmless_not_increased"] == (rates["harmless"]["ablated"]["refused"]
                                                <= rates["harmless"]["baseline"]["refused"])
    trade = result_tables(result)["trade_off"]
    assert list(zip(trade.method, trade.strength)) == [(METHOD_FALSE_REFUSAL, 0.0), (METHOD_FALSE_REFUSAL, 1.0),
                                                       (METHOD_REFUSAL, 0.0), (METHOD_REFUSAL, 0.5), (METHOD_BOTH, 0.0),
                                                       (METHOD_BOTH, 0.5)]
    unmodified, ablated = trade.iloc[0], trade.iloc[1]
    assert unmodified.look_risky_rate == trade.iloc[2].look_risky_rate == rates["look_risky"]["baseline"]["rate"]
    assert ablated.harmful_rate == rates["harmful_all"]["ablated"]["rate"]
    assert len(result["kl_harmless"]["null"]["values"]) == 2 and result["kl_harmless"]["mean"] >= 0
    assert all(len(e["reply_first_60"]) <= 60 for e in result["examples"]["harmful_ablated"])
    assert len(result["examples"]["look_risky"]) == 1
    assert set(result_tables(result)["by_kind"].kind) >= {"all"}


def test_evaluate_on_holdout_uses_the_held_out_files_only(organism_selection):
    model, refusal, candidates, _, _ = organism_selection
    vector = _candidate(candidates, refusal, 8, 1.0)
    result = evaluate_on_test(model, vector, n_test=2, max_new_tokens=4, n_null=0, n_examples=2, batch_size=8,
                              split="holdout")
    holdout = over_refusal_prompts("holdout")
    assert result["split"] == "holdout"
    assert result["n"] == {"look_risky": 2, "harmful_all": 2, "harmless": 2}  # no refusal-pairs look-risky set
    assert set(result["acceptance"]) == {"look_risky_halved", "harmful_kept_90pct", "harmless_not_increased"}
    assert [e["instruction"] for e in result["examples"]["harmful_ablated"]] == list(holdout.harmful_counterparts[:2])
    assert {e["instruction"] for e in result["examples"]["look_risky"]} == set(holdout.look_risky_texts[:2])
    assert result["kl_harmless"]["null"] is None
    with pytest.raises(ValueError, match="split must be 'test' or 'holdout'"):
        evaluate_on_test(model, vector, n_test=1, split="val")


def test_stage_stops_below_its_threshold_and_the_over_refusal_command_runs_above(organism_selection, tmp_path):
    from refusal_lens import pipeline
    from refusal_lens.cli import build_parser
    from refusal_lens.report import over_refusal_lines

    model, refusal, _, _, _ = organism_selection
    # The 4th val look-risky request (a baking-contest idiom) is refused by the organism; the first 3 are not.
    small = OverRefusalConfig(threshold=0.5, n_val=4, max_new_tokens=6, batch_size=8)
    report, vector, metadata = over_refusal_stage(model, refusal, layer=12, position=-1, config=small,
                                                  log=lambda *_: None)
    assert report["ran"] is False and vector is None and metadata == {}
    assert report["look_risky_val_refusal"]["n"] == 4 and report["look_risky_val_refusal"]["refused"] == 1
    # Above the threshold, through the study's run step on a run folder: over_refusal.json, its selection table,
    # false_refusal.safetensors and the manifest's record.
    settings = replace(small, threshold=0.1, n_train=6, n_test=1, positions=(-1,), layers=(8,), filter_train=False,
                       kl_max=100.0, keep_harmful=0.01, fallback=None, n_null=2)
    folder = rl.open_run(model, tmp_path)
    folder.save_direction(5 * refusal, layer=12, position=-1, source="test")
    report = pipeline.run_over_refusal(model, folder.path, settings, log=lambda *_: None)
    assert json.loads((folder.path / "over_refusal.json").read_text()) == json.loads(json.dumps(report, default=float))
    assert report["ran"] is True and report["selected"]["layer"] == 8 and report["selected"]["orthogonalize"] == 1.0
    assert abs(report["selected"]["cosine_with_refusal_direction"]) < 1e-9
    assert report["refusal_direction"] == {"layer": 12, "pos": -1}
    assert report["train"]["n_look_risky"] == 6 and report["train"]["filter_train"] is False
    assert set(report["test"]["acceptance"]) == {"look_risky_halved", "look_risky_refusal_pairs_halved",
                                                 "harmful_kept_90pct", "harmless_not_increased"}
    assert report["holdout"]["split"] == "holdout" and report["holdout"]["n"]["look_risky"] == 1
    assert "over_refusal" in report["seconds"] and report["config"]["n_train"] == 6
    vector = rl.load_direction(folder.path / report["file"], model)
    assert report["file"] == "false_refusal.safetensors" and abs(float(vector.double() @ refusal)) < 1e-6
    assert (folder.path / "over_refusal_selection.csv").exists()
    manifest = json.loads((folder.path / "manifest.json").read_text())
    assert manifest["over_refusal"]["config"]["n_train"] == 6 and "over_refusal.json" in manifest["outputs"]
    lines = over_refusal_lines(report)
    assert lines[0].startswith("over-refusal (val)") and "false-refusal vector    pos -1, layer 8" in lines[1]
    assert any("look-risky (holdout)" in line for line in lines) and any("(test)" in line for line in lines)
    parse = build_parser().parse_args
    args = parse(["over-refusal", "--n-val", "4", "--fallback", "none", "--positions=-1,-2", "--no-holdout"])
    assert (args.n_val, args.fallback, args.positions, args.holdout) == (4, None, (-1, -2), False)
