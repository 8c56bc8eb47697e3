"""Batched generation with interventions active.

Prompts are formatted with the model's chat format and left-padded; Hugging
Face ``generate`` runs with the KV cache on and the hooks (interventions) fire
at every step. Two engines: ``"bridge"`` runs it on the bridge's wrapped model
(TransformerLens HookPoints); ``"torch"`` runs it on the plain HF modules with
the hooks translated to torch hooks (:mod:`refusal_lens.torch_engine`), which
is faster and gives the plain HF model's numbers. ``"auto"`` (the default)
takes torch when every hook translates and no hook is already active on the
bridge (``with rl.ablate(model, r):``), else the bridge.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .chat import check_instructions
from .models import Model
from .torch_engine import choose_engine, plain_hf


def generate_tokens(
    model: Model,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    hooks: Iterable = (),
    system: str | None = None,
    progress: bool | None = None,
    engine: str = "auto",
) -> list[list[int]]:
    """The new token ids of each completion (padding after an early end removed), one list per instruction.

    Greedy by default; ``do_sample=True`` samples with ``temperature``/``top_p``, seeded.
    ``hooks`` is a list of ``(hook_name, fn)`` pairs active during generation. ``engine``: ``"auto"``,
    ``"bridge"`` or ``"torch"`` (see the module docstring); ``"torch"`` raises ValueError for a hook it
    cannot translate. Greedy tokens are the same on both engines.
    """
    instructions = check_instructions(instructions, model.chat)
    tokenizer = model.tokenizer
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
        torch.manual_seed(seed)
    starts = range(0, len(instructions), batch_size)
    show = len(starts) >= 4 if progress is None else progress
    device = model.cfg.device
    completions: list[list[int]] = []
    hooks = list(hooks)
    if choose_engine(model, hooks, engine) == "torch":
        context = plain_hf(model, hooks)
    else:
        context = model.hooks(fwd_hooks=hooks)
    with torch.no_grad(), context:
        for start in tqdm(starts, disable=not show, desc="generating", unit="batch"):
            batch = model.chat.tokenize(instructions[start : start + batch_size], system=system)
            output = model.original_model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **options
            )
            completions += [strip_padding(row, tokenizer.pad_token_id)
                            for row in output[:, batch["input_ids"].shape[1] :].tolist()]
    return completions


def strip_padding(row: list[int], pad_token_id: int) -> list[int]:
    """A completion's new token ids without the padding ``generate`` appends after a row that ended early."""
    while row and row[-1] == pad_token_id:
        row.pop()
    return row


def decode(model: Model, tokens: Sequence[int]) -> str:
    """A completion's text: special tokens removed, surrounding whitespace stripped."""
    return model.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


def generate(
    model: Model,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    hooks: Iterable = (),
    system: str | None = None,
    progress: bool | None = None,
    engine: str = "auto",
) -> list[str]:
    """Completions (new text only, special tokens removed, stripped), one per instruction; the arguments
    are :func:`generate_tokens`'s."""
    tokens = generate_tokens(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, hooks=hooks,
                             system=system, progress=progress, engine=engine)
    return [decode(model, row) for row in tokens]
