"""Rebuild this folder's JSON files from the public benchmark files (a folder in the refusal_direction format).

    python refusal_lens/data/paper/build.py PUBLIC_DIR [--out refusal_lens/data/paper]

PUBLIC_DIR holds advbench.json, tdc2023.json, harmbench_val.json, harmless_train.json and harmless_val.json
(the processed files of andyrdt/refusal_direction's ``dataset/``; Alpaca split as that repository does).
Train and val are the paper's sampling (its dataset step: ``random.seed(42)``, then 128 harmful train from
AdvBench, 128 harmless train, 32 harmful val from HarmBench val, 32 harmless val, in that order). Test is the
rest of the public files, seeded: every TDC2023 behaviour that is in neither AdvBench nor HarmBench val, and
100 harmless val instructions not in the val sample. The output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

N_TRAIN, N_VAL, N_HARMLESS_TEST, SEED = 128, 32, 100, 42


def _load(folder: Path, name: str) -> list[str]:
    return [row["instruction"] for row in json.loads((folder / name).read_text(encoding="utf-8"))]


def build(public: Path) -> dict[str, list[str]]:
    """The six splits (``harmful_train`` ... ``harmless_test``) as lists of instructions."""
    random.seed(SEED)  # the paper's order of draws, so train/val equal its sample of the same files
    sets = {
        "harmful_train": random.sample(_load(public, "advbench.json"), N_TRAIN),
        "harmless_train": random.sample(_load(public, "harmless_train.json"), N_TRAIN),
        "harmful_val": random.sample(_load(public, "harmbench_val.json"), N_VAL),
        "harmless_val": random.sample(_load(public, "harmless_val.json"), N_VAL),
    }
    seen_harmful = set(_load(public, "advbench.json")) | set(_load(public, "harmbench_val.json"))
    sets["harmful_test"] = [text for text in _load(public, "tdc2023.json") if text not in seen_harmful]
    rest = [text for text in _load(public, "harmless_val.json") if text not in set(sets["harmless_val"])]
    sets["harmless_test"] = random.Random(SEED).sample(rest, N_HARMLESS_TEST)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("public", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for name, texts in build(args.public).items():
        rows = [{"instruction": text, "category": None} for text in texts]
        (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)}")


if __name__ == "__main__":
    main()
