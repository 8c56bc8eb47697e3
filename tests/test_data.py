"""Reading public benchmark files in the refusal_direction JSON format."""

import json

import pytest

import refusal_lens as rl
from refusal_lens.data import Instruction, read_instructions, sample

from .conftest import SHARED_DATASETS

needs_shared = pytest.mark.skipif(
    not SHARED_DATASETS.exists(), reason="../shared/datasets is absent (not part of a clone)"
)


def test_reads_format_and_keeps_categories(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(
        json.dumps([{"instruction": "Do a thing", "category": "misc"}, {"instruction": "Another", "category": None}])
    )
    assert read_instructions(path) == [Instruction("Do a thing", "misc"), Instruction("Another", None)]


@pytest.mark.parametrize(
    "payload,error",
    [
        ({"instruction": "x"}, "JSON list"),
        ([{"instruction": "  "}], "non-empty"),
        ([{"prompt": "x"}], "non-empty"),
        ([{"instruction": "x"}, {"instruction": "x"}], "repeats"),
    ],
)
def test_malformed_files_are_refused(tmp_path, payload, error):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=error):
        read_instructions(path)


def test_sample_is_seeded_and_without_replacement():
    items = [Instruction(str(i)) for i in range(50)]
    first, again = sample(items, 10, seed=4), sample(items, 10, seed=4)
    assert first == again and len(set(first)) == 10 and sample(items, 10, seed=5) != first
    assert sorted(i.text for i in sample(items, 99, seed=0)) == sorted(i.text for i in items)


@needs_shared
@pytest.mark.parametrize(
    "name,rows", [("advbench", 520), ("harmbench_val", 41), ("tdc2023", 100), ("harmless_val", 6264)]
)
def test_public_benchmarks_load(name, rows):
    items = read_instructions(SHARED_DATASETS / f"{name}.json")
    assert len(items) == rows and all(i.text.strip() for i in items)


# ------------------------------------------------------------- refusal-pairs
from collections import Counter  # noqa: E402

from refusal_lens.data import SPLITS, ContrastSet, load_contrast, split_of  # noqa: E402


@pytest.fixture(scope="module")
def pairs_set():
    return load_contrast("refusal-pairs")


def test_builtin_set_meets_its_datasheet(pairs_set):
    assert len(pairs_set.harmful) >= 400 and len(pairs_set.harmless) >= 400
    assert len(pairs_set.pairs()) >= 200
    assert len({i.category for i in pairs_set.harmful}) >= 10
    assert sum(i.kind == "look_risky" for i in pairs_set.harmless) >= 100
    assert min(Counter(i.category for i in pairs_set.harmful).values()) >= 30


def test_splits_are_fixed_disjoint_and_keep_pairs_together(pairs_set):
    parts = {s: load_contrast("refusal-pairs", split=s) for s in SPLITS}
    texts = {s: set(p.harmful_texts) | set(p.harmless_texts) for s, p in parts.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not texts[a] & texts[b]
    assert sum(len(t) for t in texts.values()) == len(pairs_set.harmful) + len(pairs_set.harmless)
    assert sum(len(p.pairs()) for p in parts.values()) == len(pairs_set.pairs())  # no pair is cut
    sizes = {s: len(parts[s].harmful) / len(pairs_set.harmful) for s in SPLITS}
    assert 0.3 < sizes["organism"] < 0.5 and 0.1 < sizes["val"] < 0.25 and 0.12 < sizes["test"] < 0.3
    assert split_of("pair-000") == split_of("pair-000")  # a pure function of the id
    assert load_contrast("refusal-pairs", split="test").hashes() == parts["test"].hashes()


def test_pairs_share_their_topic(pairs_set):
    """Matched pairs differ in intent, not topic: nearly all share a content word (4+ letters).

    A dataset-level check (word overlap misses inflections such as grenade/grenades), which
    a shuffled pairing would fail: it would leave well under half of the pairs sharing a word.
    """
    def words(text):
        return {w.strip("?.,!'").lower() for w in text.split() if len(w.strip("?.,!'")) >= 4}

    pairs = pairs_set.pairs()
    shared = sum(bool(words(h) & words(b)) for h, b in pairs)
    assert shared >= 0.9 * len(pairs)
    shuffled = sum(bool(words(h) & words(b)) for h, b in zip([h for h, _ in pairs], [b for _, b in pairs][1:]))
    assert shuffled < 0.5 * len(pairs)


def test_random_split_keeps_pairs_and_is_seeded(pairs_set):
    train, val, test = pairs_set.random_split(0.6, 0.2, 0.2, seed=1)
    assert len(train.harmful) + len(val.harmful) + len(test.harmful) == len(pairs_set.harmful)
    assert len(train.pairs()) + len(val.pairs()) + len(test.pairs()) == len(pairs_set.pairs())
    assert pairs_set.random_split(seed=1)[0].hashes() == train.hashes() != pairs_set.random_split(seed=2)[0].hashes()
    with pytest.raises(ValueError, match="sum to 1"):
        pairs_set.random_split(0.5, 0.2, 0.2)


def test_loading_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="built-in sets are"):
        load_contrast("no-such-set")
    with pytest.raises(ValueError, match="unknown split"):
        load_contrast("refusal-pairs", split="holdout")
    with pytest.raises(ValueError, match="repeats"):
        ContrastSet("x", (Instruction("same"),), (Instruction("same"),))


def test_folder_in_refusal_direction_format(tmp_path):
    (tmp_path / "harmful.json").write_text(json.dumps([{"instruction": "bad thing", "category": "c"}]))
    (tmp_path / "harmless.json").write_text(json.dumps([{"instruction": "good thing", "category": None}]))
    loaded = load_contrast(tmp_path)
    assert loaded.harmful_texts == ["bad thing"] and loaded.harmless_texts == ["good thing"]


def _write(path, texts):
    path.write_text(json.dumps([{"instruction": t, "category": None} for t in texts]))
    return path


def test_load_splits_reads_split_folders_as_they_are(tmp_path):
    for side in ("harmful", "harmless"):
        (tmp_path / side).mkdir()
        for split in ("train", "val", "test"):
            _write(tmp_path / side / f"{side}_{split}.json", [f"{side} {split} {i}" for i in range(3)])
    splits = rl.load_splits(tmp_path / "harmful", tmp_path / "harmless")
    assert splits["val"].harmful_texts == ["harmful val 0", "harmful val 1", "harmful val 2"]
    assert splits["test"].harmless_texts[0] == "harmless test 0"


def test_load_splits_pools_files_and_splits_them_disjointly_with_a_seed(tmp_path):
    a = _write(tmp_path / "a.json", [f"harmful a {i}" for i in range(30)])
    b = _write(tmp_path / "b.json", [f"harmful b {i}" for i in range(20)])
    c = _write(tmp_path / "c.json", [f"harmless {i}" for i in range(40)])
    splits = rl.load_splits(f"{a},{b}", c, seed=1)
    sizes = {name: (len(s.harmful), len(s.harmless)) for name, s in splits.items()}
    assert sizes == {"train": (30, 24), "val": (10, 8), "test": (10, 8)}
    harmful = [t for s in splits.values() for t in s.harmful_texts]
    assert sorted(harmful) == sorted([f"harmful a {i}" for i in range(30)] + [f"harmful b {i}" for i in range(20)])
    assert rl.load_splits([a, b], c, seed=1)["train"].hashes() == splits["train"].hashes()
    assert rl.load_splits([a, b], c, seed=2)["train"].hashes() != splits["train"].hashes()
    assert rl.load_splits()["test"].hashes() == load_contrast("refusal-pairs", split="test").hashes()


def test_load_splits_errors_name_the_fix(tmp_path):
    a = _write(tmp_path / "a.json", ["one", "two"])
    b = _write(tmp_path / "b.json", ["two", "three"])
    with pytest.raises(ValueError, match="pass both"):
        rl.load_splits(a)
    with pytest.warns(UserWarning, match="b.json: 1 instruction.*'two'; each is kept once"):
        pooled = rl.load_splits([a, b], _write(tmp_path / "c.json", ["four", "five", "six"]), fractions=(1, 0, 0))
    assert pooled["train"].harmful_texts.count("two") == 1 and len(pooled["train"].harmful) == 3
    with pytest.raises(ValueError, match="no such data file"):
        rl.load_splits(tmp_path / "missing.json", a)


@needs_shared
def test_load_splits_on_the_papers_public_files():
    harmful = ",".join(str(SHARED_DATASETS / f) for f in ("advbench.json", "tdc2023.json", "harmbench_val.json"))
    with pytest.warns(UserWarning, match="already read from an earlier file"):
        splits = rl.load_splits(harmful, SHARED_DATASETS / "harmless_val.json")
    assert sum(len(s.harmful) for s in splits.values()) == 520 + 100 + 41 - 9  # 9 behaviours appear twice
