"""Reading public benchmark files in the refusal_direction JSON format."""

import json

import pytest

from refusal_lens.data import Instruction, read_instructions, sample

from .conftest import SHARED_DATASETS

needs_shared = pytest.mark.skipif(not SHARED_DATASETS.exists(), reason="../shared/datasets is absent (not part of a clone)")


def test_reads_format_and_keeps_categories(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"instruction": "Do a thing", "category": "misc"}, {"instruction": "Another", "category": None}]))
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
@pytest.mark.parametrize("name,rows", [("advbench", 520), ("harmbench_val", 41), ("tdc2023", 100), ("harmless_val", 6264)])
def test_public_benchmarks_load(name, rows):
    items = read_instructions(SHARED_DATASETS / f"{name}.json")
    assert len(items) == rows and all(i.text.strip() for i in items)
