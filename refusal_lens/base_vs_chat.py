"""Base vs chat: does the refusal direction exist before safety tuning?

Given a chat model's difference-in-means candidates and its base twin (same
architecture and tokenizer, no refusal training), this module reports

* :func:`direction_cosines`: per layer, the cosine between the chat model's and
  the base model's difference-in-means directions (built on the same prompts in
  the same chat template, in each model's raw residual basis);
* base separability: held-out Cohen's d (``rl.stats.cohens_d``) of the *base*
  model's activations, harmful vs harmless, projected onto the *chat* model's directions;
* :func:`ablation_effect`: refusal score and rate of a model with and without a
  direction ablated (use it on the base model with the chat direction).

The paper found the direction already present in base models (high cosine,
separable) and mostly repurposed by safety tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .directions import Directions
from .interventions import ablate
from .metrics import refusal_summary
from .models import Model
from .stats import cohens_d


def _check_twins(chat: Model, base: Model) -> None:
    if (chat.cfg.n_layers, chat.cfg.d_model) != (base.cfg.n_layers, base.cfg.d_model):
        raise ValueError(
            f"not twins: chat has {chat.cfg.n_layers} layers x d_model {chat.cfg.d_model}, base has "
            f"{base.cfg.n_layers} x {base.cfg.d_model}; compare a model with its own base"
        )


def direction_cosines(chat: Directions, base: Directions, *, position: int = -1) -> pd.DataFrame:
    """Per layer: cosine of the chat and base candidates at ``position`` (NaN where either is zero)."""
    if chat.layers != base.layers or chat.d_model != base.d_model:
        raise ValueError("the two Directions cover different layers or widths: build both with the same settings")
    p_chat, p_base = chat.positions.index(position), base.positions.index(position)
    cosine = (chat.unit()[p_chat] * base.unit()[p_base]).sum(-1)
    valid = chat.valid[p_chat] & base.valid[p_base]
    return pd.DataFrame({"layer": chat.layers, "cosine": torch.where(valid, cosine, torch.nan).numpy()})


def ablation_effect(model: Model, direction: Float[Tensor, " d_model"], harmful: Sequence[str], *,
                    max_new_tokens: int = 32) -> pd.DataFrame:
    """Refusal rate (substring judge, greedy) and mean refusal score on ``harmful``, without and with ablation."""
    return pd.DataFrame(
        [
            {"condition": condition, **refusal_summary(model, harmful, hooks=hooks, max_new_tokens=max_new_tokens)}
            for condition, hooks in (("none", []), ("ablated", ablate(model, direction).hooks))
        ]
    )


def compare_twins(chat: Model, base: Model, chat_directions: Directions, base_directions: Directions,
                  harmful_test: Sequence[str], harmless_test: Sequence[str], *, direction: Float[Tensor, " d_model"],
                  position: int = -1, max_new_tokens: int = 32, n_boot: int = 1000) -> dict[str, pd.DataFrame]:
    """A chat model and its base twin, three ways: ``cosines`` (per-layer direction cosines), Cohen's d of each
    model's activations on the chat direction (``base_separability``, ``chat_separability``) and
    ``ablation_in_base`` (the chat ``direction`` ablated in the base model)."""
    _check_twins(chat, base)
    kwargs = dict(positions=[position])
    return {
        "cosines": direction_cosines(chat_directions, base_directions, position=position),
        "base_separability": cohens_d(base, chat_directions.subset(**kwargs), harmful_test, harmless_test,
                                      n_boot=n_boot),
        "chat_separability": cohens_d(chat, chat_directions.subset(**kwargs), harmful_test, harmless_test,
                                      n_boot=n_boot),
        "ablation_in_base": ablation_effect(base, direction, harmful_test, max_new_tokens=max_new_tokens),
    }
