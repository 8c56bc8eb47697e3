"""Refusal rates of replies (substring judge, Wilson 95% intervals) and the JSON form of tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from ..chat import check_instructions
from ..data import Instruction
from ..generation import generate
from ..metrics import is_refusal
from ..models import Model
from ..stats import wilson_ci

__all__ = ["rate_row", "by_kind", "false_refusals", "look_risky_refusals"]


def rate(verdicts: Sequence[bool]) -> dict:
    """``n``, ``refused``, ``rate`` and its Wilson 95% interval ``ci_low``, ``ci_high`` of refusal verdicts."""
    refused = int(sum(verdicts))
    low, high = wilson_ci(refused, len(verdicts))
    return {"n": len(verdicts), "refused": refused, "rate": refused / len(verdicts), "ci_low": low, "ci_high": high}


def rate_row(replies: Sequence[str]) -> dict:
    """Refusal rate of replies (substring judge) with its 95% Wilson interval: ``n``, ``refused``,
    ``rate``, ``ci_low``, ``ci_high``."""
    return rate([is_refusal(r) for r in replies])


def by_kind(instructions: Sequence[Instruction], replies: Sequence[str]) -> pd.DataFrame:
    """Refusal rate per ``kind`` of look-risky requests (Wilson 95% CIs), plus an ``all`` row."""
    instructions, replies = list(instructions), list(replies)
    if len(instructions) != len(replies):
        raise ValueError(f"{len(instructions)} instructions but {len(replies)} replies: pass one reply per instruction")
    kinds = sorted({i.kind for i in instructions})
    rows = [{"kind": kind, **rate_row([r for i, r in zip(instructions, replies) if i.kind == kind])} for kind in kinds]
    return pd.DataFrame(rows + [{"kind": "all", **rate_row(replies)}])


def false_refusals(model: Model, instructions: Sequence[str], *, max_new_tokens: int = 48,
                   batch_size: int = 32) -> tuple[list[str], dict]:
    """The instructions the unmodified model refuses (greedy generation, substring judge) and the refusal
    rate with its Wilson CI (:func:`rate_row`). On look-risky harmless prompts these are the false refusals."""
    instructions = check_instructions(instructions, model.chat)
    replies = generate(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [i for i, r in zip(instructions, replies) if is_refusal(r)], rate_row(replies)


def look_risky_refusals(model: Model, look_risky: Sequence[Instruction], *, max_new_tokens: int = 48,
                        batch_size: int = 32) -> tuple[pd.DataFrame, list[str]]:
    """The unmodified model's refusal rate per ``kind`` of look-risky requests (:func:`by_kind`, Wilson 95% CIs, with
    an ``all`` row) and the requests it refuses (greedy generation, substring judge): the false refusals."""
    texts = check_instructions([i.text for i in look_risky], model.chat)
    replies = generate(model, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return by_kind(look_risky, replies), [t for t, r in zip(texts, replies) if is_refusal(r)]


def rounded(values: dict, digits: int = 4) -> dict:
    """Floats of a flat dict rounded to ``digits``."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


def _clean(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 5)
    return value


def records(table: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: numpy scalars as Python numbers, NaN as None, floats rounded to 5 digits."""
    return [{k: _clean(v) for k, v in row.items()} for row in table.to_dict(orient="records")]
