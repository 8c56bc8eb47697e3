"""Instruction data: reading public benchmark files in the refusal_direction format.

The format (used by ``andyrdt/refusal_direction`` and ``../shared/datasets``) is a
JSON list of ``{"instruction": str, "category": str | null}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    """One instruction and its harm category (``None`` when the source has none)."""

    text: str
    category: str | None = None


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
