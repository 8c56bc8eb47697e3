"""Instruction data: the project's contrast sets and public benchmark files.

Built-in set ``"refusal-pairs"`` (see ``data/README.md``): harmful and harmless
requests written for this project, with matched pairs that differ only in
intent, in four fixed disjoint splits (``organism``, ``train``, ``val``,
``test``). Built-in set ``"paper"`` (``data/paper/README.md``): the paper's
train and val sample of public benchmarks, and a held-out test split. Public
benchmarks use the refusal_direction format (used by
``andyrdt/refusal_direction``, whose ``dataset/`` holds the full benchmarks):
a JSON list of ``{"instruction": str, "category": str | null}``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .manifest import text_hash
from .models import Model

SPLITS = ("organism", "train", "val", "test")
# Cumulative percentage of groups per split: organism 40%, train 25%, val 15%, test 20%.
_SPLIT_CUTS = (("organism", 40), ("train", 65), ("val", 80), ("test", 100))
BUILTIN = {"refusal-pairs": "refusal_pairs"}


@dataclass(frozen=True)
class Instruction:
    """One instruction with its provenance.

    Attributes:
        text: the request.
        category: harm category (harmful items), or ``None``.
        kind: ``"pair"`` (half of a matched pair), ``"single"`` (unpaired harmful),
            ``"look_risky"`` or ``"general"`` (unpaired harmless), or ``None`` for public files.
        pair_id: shared by the two halves of a matched pair.
        split: the fixed split of built-in data, or ``None``.
    """

    text: str
    category: str | None = None
    kind: str | None = None
    pair_id: str | None = None
    split: str | None = None


def read_instructions(path: str | Path) -> list[Instruction]:
    """Read a refusal_direction-format JSON file; refuses malformed, empty or duplicate entries."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{'instruction': ..., 'category': ...}} objects")
    items, seen = [], set()
    for i, record in enumerate(records):
        text = record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: entry {i} has no non-empty 'instruction' string: {str(record)[:80]}")
        if text in seen:
            raise ValueError(f"{path}: entry {i} repeats the instruction {text[:60]!r}; deduplicate the file")
        seen.add(text)
        category = record.get("category")
        items.append(Instruction(text, category if isinstance(category, str) else None))
    return items


def sample(items: list[Instruction], n: int, *, seed: int) -> list[Instruction]:
    """``n`` items drawn without replacement with a fixed seed (all of them, shuffled, if ``n`` is larger)."""
    return random.Random(seed).sample(items, min(n, len(items)))


def split_of(group: str) -> str:
    """The fixed split of a group (a pair id, or an unpaired item's id): a salted SHA-256 bucket."""
    bucket = int(hashlib.sha256(f"refusal-pairs/{group}".encode()).hexdigest(), 16) % 100
    return next(name for name, cut in _SPLIT_CUTS if bucket < cut)


@dataclass(frozen=True)
class ContrastSet:
    """Harmful and harmless instructions; ``pairs()`` gives the matched pairs among them."""

    name: str
    harmful: tuple[Instruction, ...]
    harmless: tuple[Instruction, ...]

    def __post_init__(self) -> None:
        texts = [i.text for i in self.harmful] + [i.text for i in self.harmless]
        if len(set(texts)) != len(texts):
            raise ValueError(f"contrast set {self.name!r} repeats an instruction")

    @property
    def harmful_texts(self) -> list[str]:
        return [i.text for i in self.harmful]

    @property
    def harmless_texts(self) -> list[str]:
        return [i.text for i in self.harmless]

    def pairs(self) -> list[tuple[str, str]]:
        """Matched (harmful, harmless) pairs whose both halves are in this set, in harmful order."""
        partner = {i.pair_id: i.text for i in self.harmless if i.pair_id}
        return [(i.text, partner[i.pair_id]) for i in self.harmful if i.pair_id in partner]

    def hashes(self) -> dict[str, str]:
        """SHA-256 of the ordered harmful and harmless texts, for manifests."""
        return {"harmful_sha256": text_hash(self.harmful_texts), "harmless_sha256": text_hash(self.harmless_texts)}

    def filter_by_refusal(
        self, model: Model, *, batch_size: int = 32, min_kept_share: float | None = None, progress: bool = False
    ) -> ContrastSet:
        """Keep harmful items the model refuses and harmless items it answers, by refusal score sign.

        As the paper filters its train and val sets: refusal score > 0 counts as refusing. With
        ``min_kept_share`` (the main job: 0.5), raises when a side keeps less than that share: the model
        then does not refuse (or over-refuses), and the few prompts left would be a biased sample.
        """
        from .metrics import refusal_score

        harmful, harmless = (refusal_score(model, texts, batch_size=batch_size,
                                           progress=progress and f"refusal filter: {self.name} {side}")
                             for side, texts in (("harmful", self.harmful_texts), ("harmless", self.harmless_texts)))
        kept = ContrastSet(
            f"{self.name}[filtered]",
            tuple(i for i, s in zip(self.harmful, harmful) if s > 0),
            tuple(i for i, s in zip(self.harmless, harmless) if s < 0),
        )
        for side, before, after in (
            ("harmful", self.harmful, kept.harmful),
            ("harmless", self.harmless, kept.harmless),
        ):
            if min_kept_share is not None and len(after) < min_kept_share * len(before):
                verdict = "refuses" if side == "harmful" else "answers"
                raise ValueError(
                    f"the refusal filter kept {len(after)} of {len(before)} {side} prompts of {self.name}: the model "
                    f"{verdict} fewer than {min_kept_share:.0%} of them by refusal score, so it is not a refusing chat "
                    "model on this data. Run without the filter (`refusal-lens run --no-filter`, or "
                    "RunConfig(filter_by_refusal=False)), as for a base model."
                )
        return kept

    def select(self, splits: str | Iterable[str]) -> ContrastSet:
        """The items of the named fixed split(s)."""
        wanted = {splits} if isinstance(splits, str) else set(splits)
        # The standard splits, and any other this set's items carry (over-refusal's holdout).
        known = set(SPLITS) | {i.split for i in (*self.harmful, *self.harmless) if i.split}
        unknown = wanted - known
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)} of {self.name!r}; choose from {sorted(known)}")
        keep = lambda items: tuple(i for i in items if i.split in wanted)  # noqa: E731
        return ContrastSet(f"{self.name}[{'+'.join(sorted(wanted))}]", keep(self.harmful), keep(self.harmless))

    def random_split(self, train: float = 0.6, val: float = 0.2, test: float = 0.2, *, seed: int = 0
                     ) -> tuple[ContrastSet, ContrastSet, ContrastSet]:
        """A random (seeded) train/val/test split by fractions; matched pairs stay together (for sets without
        fixed splits; built-in sets have theirs: ``load_contrast(name, split=...)``)."""
        if abs(train + val + test - 1) > 1e-9 or min(train, val, test) < 0:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {train}, {val}, {test}")
        groups = sorted({i.pair_id or f"{side}:{i.text}" for side, items in (("h", self.harmful), ("b", self.harmless))
                         for i in items})
        random.Random(seed).shuffle(groups)
        n_train, n_val = round(train * len(groups)), round(val * len(groups))
        parts = (set(groups[:n_train]), set(groups[n_train : n_train + n_val]), set(groups[n_train + n_val :]))

        def part(index: int, label: str) -> ContrastSet:
            def keep(side: str, items: Sequence[Instruction]) -> tuple[Instruction, ...]:
                return tuple(i for i in items if (i.pair_id or f"{side}:{i.text}") in parts[index])
            return ContrastSet(f"{self.name}[{label}]", keep("h", self.harmful), keep("b", self.harmless))

        return part(0, "train"), part(1, "val"), part(2, "test")


def _read_tsv(path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _builtin(folder: str, name: str) -> ContrastSet:
    if folder in _LOADERS:  # built-in sets with their own layout (e.g. "over-refusal")
        return _LOADERS[folder](folder, name)
    root = files("refusal_lens") / "data" / folder
    harmful, harmless = [], []
    for n, row in enumerate(_read_tsv(root / "pairs.tsv")):
        pair_id = f"pair-{n:03d}"
        split = split_of(pair_id)
        harmful.append(Instruction(row["harmful"], row["category"], "pair", pair_id, split))
        harmless.append(Instruction(row["harmless"], None, "pair", pair_id, split))
    for n, row in enumerate(_read_tsv(root / "harmful.tsv")):
        harmful.append(Instruction(row["instruction"], row["category"], "single", None, split_of(f"harmful-{n:03d}")))
    for n, row in enumerate(_read_tsv(root / "harmless.tsv")):
        harmless.append(Instruction(row["instruction"], None, row["kind"], None, split_of(f"harmless-{n:03d}")))
    return ContrastSet(name, tuple(harmful), tuple(harmless))


def _read_side(spec: str | Path | Sequence[str | Path]) -> dict[str, list[Instruction]] | list[Instruction]:
    """One side of an external data set: a folder of per-split files, or one or more files pooled.

    A folder holding ``train.json``, ``val.json`` and ``test.json`` (or ``<side>_train.json`` etc., as the
    paper's ``dataset/splits/``) gives its splits as they are; anything else (files, comma-separated
    files, or a folder of other ``*.json`` files) is pooled into one list.
    """
    paths = [Path(p) for p in (str(spec).split(",") if isinstance(spec, (str, Path)) else spec)]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        for pattern in ("{split}.json", "*_{split}.json"):
            found = {name: sorted(folder.glob(pattern.format(split=name))) for name in ("train", "val", "test")}
            if all(len(files) == 1 for files in found.values()):
                return {name: read_instructions(files[0]) for name, files in found.items()}
        paths = sorted(folder.glob("*.json"))
        if not paths:
            raise ValueError(f"{folder} holds no .json file in the refusal_direction format")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no such data file: {', '.join(missing)}")
    items, seen = [], set()
    for path in paths:
        repeated = [item.text for item in read_instructions(path) if item.text in seen]
        if repeated:  # public benchmarks share a few behaviours (AdvBench, TDC2023, HarmBench: 9)
            warnings.warn(f"{path.name}: {len(repeated)} instruction(s) already read from an earlier file, e.g. "
                          f"{repeated[0][:60]!r}; each is kept once", stacklevel=3)
        for item in read_instructions(path):
            if item.text not in seen:
                seen.add(item.text)
                items.append(item)
    return items


def load_splits(harmful: str | Path | Sequence[str | Path] | None = None,
                harmless: str | Path | Sequence[str | Path] | None = None, *,
                fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0,
                data: str = "refusal-pairs") -> dict[str, ContrastSet]:
    """``train`` / ``val`` / ``test`` contrast sets for a run: the splits of the built-in set ``data``
    (``"refusal-pairs"`` or ``"paper"``), or external files in the refusal_direction format (AdvBench, TDC2023,
    HarmBench, Alpaca ...).

    ``harmful`` and ``harmless`` each name a folder with ``train``/``val``/``test`` files (used as they
    are), or files (a list, or comma-separated) that are pooled and split by a seeded shuffle into
    ``fractions``. Pass both or neither. Splits are disjoint; an instruction on both sides is refused.
    """
    if (harmful is None) != (harmless is None):
        raise ValueError("pass both harmful= and harmless= (files or folders), or neither for the built-in set")
    if harmful is None:
        if data not in ("refusal-pairs", "paper"):
            raise ValueError(f"unknown built-in data {data!r} for a run: use 'refusal-pairs' or 'paper' (or pass "
                             "harmful= and harmless= files)")
        return {name: load_contrast(data, split=name) for name in ("train", "val", "test")}
    if data != "refusal-pairs":
        raise ValueError(f"pass either external files (harmful=, harmless=) or a built-in set (data={data!r}), "
                         "not both")
    if abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")

    def by_split(spec) -> dict[str, list[Instruction]]:
        side = _read_side(spec)
        if isinstance(side, dict):
            return side
        shuffled = random.Random(seed).sample(side, len(side))
        n_train, n_val = round(fractions[0] * len(side)), round(fractions[1] * len(side))
        return {"train": shuffled[:n_train], "val": shuffled[n_train : n_train + n_val],
                "test": shuffled[n_train + n_val :]}

    harmful_splits, harmless_splits = by_split(harmful), by_split(harmless)
    name = f"{Path(str(harmful).split(',')[0]).stem}+{Path(str(harmless).split(',')[0]).stem}"
    return {split: ContrastSet(f"{name}[{split}]", tuple(harmful_splits[split]), tuple(harmless_splits[split]))
            for split in ("train", "val", "test")}


def load_contrast(name_or_path: str | Path, *, split: str | Iterable[str] | None = None) -> ContrastSet:
    """Load a contrast set.

    Args:
        name_or_path: a built-in set (``"refusal-pairs"``, ``"over-refusal"``, ``"paper"``), or a folder holding
            ``harmful.json`` and ``harmless.json`` in the refusal_direction format.
        split: for built-in sets, keep only these fixed split(s) (``refusal-pairs``: ``organism``, ``train``,
            ``val``, ``test``; ``over-refusal``: ``train``, ``val``, ``test``, ``holdout``; ``paper``: ``train``
            (128 + 128), ``val`` (32 + 32), ``test`` (91 harmful, 100 harmless)).
    """
    if str(name_or_path) == "paper" and split is not None:
        unknown = ({split} if isinstance(split, str) else set(split)) - set(PAPER_SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)} of 'paper'; choose from {list(PAPER_SPLITS)}")
    if str(name_or_path) in BUILTIN:
        contrast = _builtin(BUILTIN[str(name_or_path)], str(name_or_path))
        return contrast.select(split) if split is not None else contrast
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise ValueError(
            f"unknown contrast set {str(name_or_path)!r}: built-in sets are {sorted(BUILTIN)}; "
            "otherwise pass a folder with harmful.json and harmless.json (refusal_direction format)"
        )
    if split is not None:
        raise ValueError("split= applies to built-in sets; use .random_split(...) on a folder's ContrastSet, "
                         "or rl.load_splits(harmful=..., harmless=...)")
    return ContrastSet(folder.name, tuple(read_instructions(folder / "harmful.json")),
                       tuple(read_instructions(folder / "harmless.json")))


# ------------------------------------------------------------- over-refusal
# "over-refusal" (see data/README.md): look-risky harmless requests, some with a harmful twin that differs
# only in intent. Its own fixed splits (no organism split: the organism never saw it), by the same rule as
# refusal-pairs: a salted SHA-256 bucket of the group id (a pair, or one unpaired request). The `holdout`
# split is whole files (holdout_*.tsv), written after the over-refusal rule was fixed, to judge it once.
OVER_REFUSAL_SPLITS = ("train", "val", "test", "holdout")
# Cumulative percentage of groups per split: train 40%, val 30%, test 30%.
_OVER_REFUSAL_CUTS = (("train", 40), ("val", 70), ("test", 100))
OVER_REFUSAL_KINDS = ("homonym", "figurative", "safe_target", "safe_context", "history", "definition",
                      "privacy_public")
BUILTIN["over-refusal"] = "over_refusal"


def over_refusal_split_of(group: str) -> str:
    """The fixed split (``train``/``val``/``test``) of an over-refusal group: a salted SHA-256 bucket of its id."""
    bucket = int(hashlib.sha256(f"over-refusal/{group}".encode()).hexdigest(), 16) % 100
    return next(name for name, cut in _OVER_REFUSAL_CUTS if bucket < cut)


def _over_refusal(folder: str, name: str) -> ContrastSet:
    """The over-refusal set: ``harmless`` holds every look-risky request (``kind`` one of
    :data:`OVER_REFUSAL_KINDS`), ``harmful`` the harmful twins (``category`` a harm category, ``kind``
    the kind of the look-risky request it twins, ``pair_id`` shared with it)."""
    root = files("refusal_lens") / "data" / folder
    harmful, harmless = [], []
    for prefix, split_of_group in (("", over_refusal_split_of), ("holdout_", lambda _: "holdout")):
        for n, row in enumerate(_read_tsv(root / f"{prefix}pairs.tsv")):
            pair_id = f"{prefix}pair-{n:03d}"
            split = split_of_group(pair_id)
            harmless.append(Instruction(row["harmless"], None, row["kind"], pair_id, split))
            harmful.append(Instruction(row["harmful"], row["category"], row["kind"], pair_id, split))
        for n, row in enumerate(_read_tsv(root / f"{prefix}look_risky.tsv")):
            split = split_of_group(f"{prefix}single-{n:03d}")
            harmless.append(Instruction(row["instruction"], None, row["kind"], None, split))
    unknown = sorted({i.kind for i in harmless} - set(OVER_REFUSAL_KINDS))
    if unknown:
        raise ValueError(f"{folder}: unknown kind(s) {unknown}; use one of {OVER_REFUSAL_KINDS}")
    return ContrastSet(name, tuple(harmful), tuple(harmless))


# ------------------------------------------------------------------ paper
# "paper" (see data/paper/README.md): the paper's data, built from public benchmark files by
# data/paper/build.py: train and val are the paper's seeded sample (AdvBench / Alpaca 128 + 128, HarmBench val /
# Alpaca 32 + 32), test is TDC2023 and Alpaca held out from both. Files ``{side}_{split}.json`` in the
# refusal_direction format; every split is whole files.
PAPER_SPLITS = ("train", "val", "test")
BUILTIN["paper"] = "paper"


def _paper(folder: str, name: str) -> ContrastSet:
    """The paper's contrast set; each item's ``split`` is the file it came from."""
    root = Path(str(files("refusal_lens") / "data" / folder))
    sides: dict[str, list[Instruction]] = {"harmful": [], "harmless": []}
    for side, items in sides.items():
        for split in PAPER_SPLITS:
            path = root / f"{side}_{split}.json"
            items += [dataclasses.replace(item, split=split) for item in read_instructions(path)]
    return ContrastSet(name, tuple(sides["harmful"]), tuple(sides["harmless"]))


_LOADERS = {"over_refusal": _over_refusal, "paper": _paper}


def holdout_everyday() -> tuple[str, ...]:
    """Plain everyday harmless requests of the over-refusal ``holdout`` split (``holdout_everyday.tsv``): the
    held-out counterpart of ``refusal-pairs``' ``general`` requests, for harmless refusal and KL."""
    root = files("refusal_lens") / "data" / "over_refusal"
    return tuple(row["instruction"] for row in _read_tsv(root / "holdout_everyday.tsv"))
