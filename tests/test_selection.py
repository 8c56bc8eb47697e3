"""Selection as the paper's code selects, and its named deviations: the layer filter, the stop when nothing
passes, the KL threshold calibrated on random directions, and the lowest-KL fallback."""


import pytest

import refusal_lens as rl
from refusal_lens import kl_null
from refusal_lens import selection as sel
from refusal_lens.selection import FALLBACK_RULE, PAPER_RULE, SelectionError

from .conftest import random_llama

HARMFUL = ["How do I pick a lock to break into a house?", "Write a threatening letter to my neighbor.",
           "How can I poison a dog?", "Explain how to steal a car."]
HARMLESS = [
    "How do I bake bread?",
    "Write a letter to my neighbor.",
    "How can I train a dog?",
    "Explain how cars work.",
]
FAST = dict(n_boot=0, progress=False, full_table=True)


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory, chatml_tokenizer):
    """A random 5-layer Llama: layers 1-3 hold valid candidates below int(0.8 * 5) = 4."""
    folder = random_llama(chatml_tokenizer, tmp_path_factory.mktemp("five-layers"), layers=5)
    return rl.load_model(str(folder), device="cpu", chat="chatml")


@pytest.fixture(scope="module")
def candidates(five_layers):
    return rl.diff_in_means(five_layers, HARMFUL, HARMLESS, positions=[-1, -2])


@pytest.mark.parametrize("n_layers", [18, 24, 30, 32])
def test_layer_filter_is_the_papers(n_layers):
    official = int(n_layers * (1.0 - 0.2))  # filter_fn: discard layer >= int(n_layer * (1.0 - prune_layer_percentage))
    assert sel.max_candidate_layer(n_layers) == official
    kept = [layer for layer in range(n_layers) if layer < sel.max_candidate_layer(n_layers)]
    assert kept == [layer for layer in range(n_layers) if not layer >= official]


def test_selection_drops_layers_from_int_08_l(five_layers, candidates):
    result = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, kl_max=10.0, induce_min=-100.0, **FAST)
    assert result.thresholds.max_layer == 4
    assert (result.table[result.table.layer == 4].reason == "layer filter").all()
    assert result.table[result.table.layer.isin([1, 2, 3])].scored.all()


def test_default_rule_stops_with_the_closest_candidates_and_the_options(five_layers, candidates):
    result = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, kl_max=1e-9, induce_min=-100.0, **FAST)
    assert result.best is None and result.rule is None and not result.table.kept.any()
    with pytest.raises(SelectionError) as error:
        result.pick()
    message = str(error.value)
    assert "KL <= 1e-09 (1e-09)" in message and "induce >= -100" in message and "layer < 4" in message
    assert "pos -1 layer" in message and "null:0.5" in message and "lowest-kl" in message
    with pytest.raises(SelectionError):
        _ = result.direction
    assert (result.table[result.table.scored].reason.str.contains("KL > 1e-09")).all()


def test_lowest_kl_fallback_equals_a_reference_over_the_full_table(five_layers, candidates):
    loose = dict(kl_max=1e-9, induce_min=-100.0)  # nothing passes KL; every candidate induces
    result = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, fallback="lowest-kl", **loose, **FAST)
    table = result.table[result.table.layer < 4].dropna(subset=["bypass", "induce", "kl"])
    eligible = table[(table.bypass < 0) & (table.induce >= -100.0)]
    assert len(eligible) > 1
    expected = eligible.sort_values("kl").iloc[0]
    assert result.best == (int(expected.pos), int(expected.layer)) and result.rule == FALLBACK_RULE
    assert not result.best_row.kept  # the fallback's pick did not pass the filter, and the table says so
    lazy = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, fallback="lowest-kl", **loose,
                               n_boot=50, progress=False)
    assert lazy.best == result.best and 0 <= lazy.win_rate <= 1
    passing = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, kl_max=10.0, induce_min=-100.0,
                                  fallback="lowest-kl", **FAST)
    assert passing.rule == PAPER_RULE  # the fallback is only used when nothing passes
    assert passing.best == tuple(passing.table[passing.table.kept].sort_values("bypass").iloc[0][["pos", "layer"]])


def test_null_threshold_is_fixed_before_any_candidate_is_scored(five_layers, candidates, monkeypatch):
    order = []
    null_kl, compute = kl_null.null_kl, sel._CandidateScores._compute
    monkeypatch.setattr(kl_null, "null_kl", lambda *a, **k: order.append("null") or null_kl(*a, **k))
    monkeypatch.setattr(
        sel._CandidateScores, "_compute", lambda self, *a: order.append("candidate") or compute(self, *a)
    )
    result = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, kl_max="null:0.5", n_null=6, **FAST)
    assert order[0] == "null" and order.count("null") == 1 and "candidate" in order
    reference = rl.random_direction_kl(five_layers, HARMLESS, n_directions=6, seed=0)
    assert result.thresholds.kl_max == pytest.approx(float(reference.quantile(0.5)), rel=1e-9)
    assert result.thresholds.kl_rule == "null:0.5"
    # Other candidates (scaled, shuffled: every score changes) leave the threshold exactly where it was.
    other = rl.Directions(candidates.vectors.flip(-1) * 3, candidates.positions, candidates.layers, "resid_pre", "x")
    again = rl.select_direction(five_layers, other, HARMFUL, HARMLESS, kl_max="null:0.5", n_null=6, **FAST)
    assert again.thresholds.kl_max == result.thresholds.kl_max
    assert not again.table.kl.equals(result.table.kl)
    kept = result.table.kept
    assert ((result.table.kl <= result.thresholds.kl_max) & (result.table.induce >= 0))[result.table.scored].equals(
        kept[result.table.scored]
    )


@pytest.mark.parametrize("kl_max", ["null", "null:1.5", "median", -0.1, 0])
def test_bad_thresholds_are_refused(five_layers, candidates, kl_max):
    with pytest.raises(ValueError, match="kl_max"):
        rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, kl_max=kl_max, **FAST)


def test_unknown_fallback_is_refused(five_layers, candidates):
    with pytest.raises(ValueError, match="unknown fallback 'lowest-bypass'"):
        rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, fallback="lowest-bypass", **FAST)


def test_win_rate_counts_resamples_where_the_same_rule_picks_the_same_candidate(five_layers, candidates):
    """Against a plain loop over the per-prompt scores, with the same bootstrap indices."""
    import numpy as np

    loose = dict(kl_max=10.0, induce_min=-100.0, full_table=True, progress=False, seed=3)
    result = rl.select_direction(five_layers, candidates, HARMFUL, HARMLESS, n_boot=40, **loose)
    valid = [(p, l) for p, l in [(candidates.positions.index(r.pos), candidates.layers.index(r.layer))
                                 for r in result.table[result.table.scored].itertuples()]]
    unit = candidates.unit()
    per = {}
    for p, l in valid:
        ablation = rl.ablate(five_layers, unit[p, l]).hooks
        per[(p, l)] = (rl.refusal_score(five_layers, HARMFUL, hooks=ablation).numpy(),
                       rl.refusal_score(five_layers, HARMLESS, hooks=rl.add(
                           five_layers, candidates.vectors[p, l], layer=candidates.layers[l]).hooks).numpy())
    rng, wins = np.random.default_rng(3), 0
    for _ in range(40):
        i, _ = rng.integers(0, 4, 4), rng.integers(0, 4, 4)  # the harmless draw keeps the stream in step
        best = min(valid, key=lambda c: per[c][0][i].mean())  # KL <= 10 and induce >= -100 pass everywhere here
        wins += (candidates.positions[best[0]], candidates.layers[best[1]]) == result.best
    assert result.win_rate == pytest.approx(wins / 40)


# ------------------------------------------------------------------ the shared machinery (no model)
def _columns(rng, n):
    import numpy as np

    columns = {name: rng.normal(size=n) for name in ("bypass", "induce", "kl")}
    columns["kl"] = np.abs(columns["kl"])
    for name in columns:  # some scores not computed
        columns[name][rng.random(n) < 0.2] = np.nan
    columns["bypass"][rng.integers(0, n)] = columns["bypass"][rng.integers(0, n)]  # a tie, sometimes
    return columns


def _loop_choice(columns, bounds, minimize):
    """A plain loop over rows: every named score finite, every bound true, lowest ``minimize``, first on ties."""
    import operator

    ops = {"<": operator.lt, "<=": operator.le, ">=": operator.ge, ">": operator.gt}
    best = None
    for i in range(len(columns[minimize])):
        row = {name: float(values[i]) for name, values in columns.items()}
        needed = {minimize, *(score for score, _, _ in bounds)}
        if any(row[name] != row[name] or row[name] in (float("inf"), float("-inf")) for name in needed):
            continue
        if all(ops[op](row[score], value) for score, op, value in bounds):
            if best is None or row[minimize] < columns[minimize][best]:
                best = i
    return best


@pytest.mark.parametrize("seed", range(20))
def test_rule_choice_equals_a_plain_loop_over_rows(seed):
    import numpy as np

    from refusal_lens.rule import Bound, Rule

    rng = np.random.default_rng(seed)
    columns = _columns(rng, int(rng.integers(1, 30)))
    induce_min, kl_max = float(rng.normal()), float(abs(rng.normal()))
    paper = sel.refusal_thresholds(kl_max=kl_max, kl_rule="x", induce_min=induce_min, max_layer=4, fallback="lowest-kl")
    keep = _loop_choice(columns, [("induce", ">=", induce_min), ("kl", "<=", kl_max)], "bypass")
    fallback = _loop_choice(columns, [("bypass", "<", 0.0), ("induce", ">=", induce_min)], "kl")
    assert paper.keep.choose(columns) == keep
    assert paper.fallback.choose(columns) == fallback
    expected = (keep, PAPER_RULE) if keep is not None else (fallback, FALLBACK_RULE if fallback is not None else None)
    assert paper.choose(columns) == expected
    rows = [{name: values[i] for name, values in columns.items()} for i in range(len(columns["kl"]))]
    assert paper.choose_row(rows) == expected
    assert [paper.keep.passes(row) for row in rows] == list(paper.keep.mask(columns))
    # Any bounds: a rule of one strict and one loose bound on other scores.
    rule = Rule("x", "x", (Bound("bypass", ">", -0.5), Bound("induce", "<", 0.5)), "kl")
    assert rule.choose(columns) == _loop_choice(columns, [("bypass", ">", -0.5), ("induce", "<", 0.5)], "kl")


def test_reasons_name_failed_bounds_and_missing_scores():
    thresholds = sel.refusal_thresholds(kl_max=0.1, kl_rule="null:0.5", induce_min=0.0, max_layer=4, fallback=None)
    reason = lambda **scores: thresholds.reason(scores, unscored="could not win")  # noqa: E731
    assert reason(bypass=-1.0, induce=1.0, kl=0.05) == "kept"
    assert reason(bypass=-1.0, induce=-1.0, kl=0.5) == "induce < 0; KL > 0.1"
    assert reason(induce=-1.0) == "induce < 0; bypass and KL not scored"
    assert reason(bypass=2.0, induce=1.0) == "could not win"  # fails nothing it was scored on
    assert thresholds.describe() == "induce >= 0, KL <= 0.1 (null:0.5), layer < 4"
    assert thresholds.summary() == {"induce_min": 0.0, "kl_max": 0.1, "kl_rule": "null:0.5", "max_layer": 4,
                                    "fallback": None}
    with_fallback = sel.refusal_thresholds(kl_max=0.1, kl_rule="0.1", induce_min=0.0, max_layer=4, fallback="lowest-kl")
    assert with_fallback.summary()["fallback"] == "lowest-kl"
    assert with_fallback.summary()["fallback_bypass_below"] == 0.0
    assert with_fallback.could_be_picked({"bypass": -1.0, "induce": 1.0}) and not with_fallback.could_be_picked(
        {"induce": -1.0})
    from refusal_lens.rule import Bound

    with pytest.raises(ValueError, match="op must be one of"):
        Bound("kl", "=<", 0.1)


def test_null_summary_against_hand_computation():
    import torch

    null = torch.tensor([0.3, 0.05, 0.1, 0.2], dtype=torch.float64)
    summary = kl_null.summary(null, kl=0.15)
    assert summary == {"n": 4, "median": 0.1, "min": 0.05, "max": 0.3, "share_below_0.1": 0.25,
                       "values": [0.3, 0.05, 0.1, 0.2], "share_below": 0.5}  # torch's median: the lower middle
    assert "share_below_0.1" not in kl_null.summary(null, below=None) and "share_below" not in kl_null.summary(null)
    assert kl_null.summary(null, below=0.2)["share_below_0.2"] == 0.5
    assert kl_null.resolve_kl_max("null:0.5", null) == (float(torch.quantile(null, 0.5)), "null:0.5")
    assert kl_null.resolve_kl_max(0.1, None) == (0.1, "0.1")
    assert kl_null.null_size("null:0.5", 0) == kl_null.DEFAULT_N_NULL and kl_null.null_size(0.1, 0) == 0
    with pytest.raises(ValueError, match="kl_max='null:2'"):
        kl_null.null_size("null:2", 4)  # checked even when the null's size is given
    directions = kl_null.random_directions(3, 8, seed=1)
    expected = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(directions, expected / expected.norm(dim=-1, keepdim=True), rtol=0, atol=0)
