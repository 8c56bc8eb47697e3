"""The prompts of one split for over-refusal work: look-risky, harmful and plain harmless requests."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..data import OVER_REFUSAL_SPLITS, Instruction, holdout_everyday, load_contrast

__all__ = ["OverRefusalPrompts", "over_refusal_prompts"]


@dataclass(frozen=True)
class OverRefusalPrompts:
    """The prompts of one split for over-refusal work (raw instructions).

    Attributes:
        look_risky: the ``over-refusal`` set's look-risky harmless requests, with their ``kind``.
        look_risky_pairs: ``refusal-pairs``' look-risky harmless requests (``kind == "look_risky"``).
        harmful: ``refusal-pairs``' harmful requests.
        harmful_counterparts: the ``over-refusal`` set's harmful requests, each worded as one of its look-risky
            requests but with harmful intent (the data set's ``harmful`` side, paired by ``pair_id``).
        harmless: ``refusal-pairs``' everyday requests (``kind == "general"``): plain harmless.
    """

    split: str
    look_risky: tuple[Instruction, ...]
    look_risky_pairs: tuple[str, ...]
    harmful: tuple[str, ...]
    harmful_counterparts: tuple[str, ...]
    harmless: tuple[str, ...]

    @property
    def twins(self) -> tuple[str, ...]:
        """Deprecated name of :attr:`harmful_counterparts`."""
        warnings.warn("OverRefusalPrompts.twins is deprecated; use harmful_counterparts", DeprecationWarning,
                      stacklevel=2)
        return self.harmful_counterparts

    @property
    def look_risky_texts(self) -> list[str]:
        return [i.text for i in self.look_risky]

    @property
    def all_harmful(self) -> list[str]:
        """``harmful`` then ``harmful_counterparts``: the prompts on which true refusal must survive."""
        return [*self.harmful, *self.harmful_counterparts]

    def for_selection(self, n: int | None = None) -> dict[str, list[str]]:
        """Keyword arguments ``look_risky``, ``harmful`` (the first ``n`` harmful prompts and the first ``n``
        harmful counterparts) and ``harmless`` (first ``n``) for
        :func:`~refusal_lens.over_refusal.select_false_refusal`; ``n=None``: all."""
        return {"look_risky": self.look_risky_texts[:n],
                "harmful": [*self.harmful[:n], *self.harmful_counterparts[:n]], "harmless": list(self.harmless)[:n]}


def over_refusal_prompts(split: str) -> OverRefusalPrompts:
    """Look-risky, harmful and plain harmless prompts of one fixed split (``train``, ``val``, ``test`` or ``holdout``).

    ``train``/``val``/``test`` combine the ``over-refusal`` split with the same split of ``refusal-pairs``.
    ``holdout`` is the ``over-refusal`` set's held-out files only (written after the selection rule was fixed):
    its look-risky requests and harmful counterparts, and :func:`refusal_lens.data.holdout_everyday` as the plain
    harmless requests; it has no ``refusal-pairs`` prompts (``look_risky_pairs`` and ``harmful`` are empty).
    """
    if split not in OVER_REFUSAL_SPLITS:
        raise ValueError(f"split must be one of {OVER_REFUSAL_SPLITS}, got {split!r}")
    over = load_contrast("over-refusal", split=split)
    if split == "holdout":
        return OverRefusalPrompts(split=split, look_risky=over.harmless, look_risky_pairs=(), harmful=(),
                                  harmful_counterparts=tuple(over.harmful_texts), harmless=holdout_everyday())
    pairs = load_contrast("refusal-pairs", split=split)
    return OverRefusalPrompts(
        split=split,
        look_risky=over.harmless,
        look_risky_pairs=tuple(i.text for i in pairs.harmless if i.kind == "look_risky"),
        harmful=tuple(pairs.harmful_texts),
        harmful_counterparts=tuple(over.harmful_texts),
        harmless=tuple(i.text for i in pairs.harmless if i.kind == "general"),
    )
