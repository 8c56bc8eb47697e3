"""Adversarial suffixes and what they do to the refusal direction (paper §5).

:func:`gcg_suffix` is a small greedy coordinate gradient search (Zou et al. 2023)
against the model's own refusal score: each step takes the gradient of the mean
refusal log-odds of a few harmful prompts with respect to the one-hot suffix
tokens, proposes ``search_width`` single-token swaps from the ``top_k`` most
promising tokens per slot, and keeps the best. Only printable ASCII tokens are
allowed, and a candidate is kept only if its text re-tokenizes to the same ids,
so the suffix can be used as plain text everywhere else.

:func:`suffix_analysis` compares harmful prompts with and without suffixes and
harmless prompts: cosine of the last-token activation with the refusal direction,
refusal score, refusal rate (verdicts only), and for chosen heads the share of
the last token's attention on the instruction vs the suffix, and their direct
contribution to the direction.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .attribution import decompose
from .chat import check_instructions
from .directions import unit_direction
from .metrics import refusal_log_odds, refusal_summary
from .models import Model
from .streaming import activations, forward_chat, stop_before


@dataclass
class SuffixSearch:
    """Result of :func:`gcg_suffix`: the suffix text (appended directly to an instruction) and its history."""

    suffix: str
    token_ids: list[int]
    losses: list[float]  # mean refusal log-odds after each step (step 0 = the initial suffix)
    settings: dict = field(default_factory=dict)

    def apply(self, instructions: Sequence[str]) -> list[str]:
        return [instruction + self.suffix for instruction in instructions]


def allowed_tokens(tokenizer) -> Tensor:
    """Bool mask over the vocabulary: printable-ASCII, non-special tokens that decode to non-blank text."""
    special = set(tokenizer.all_special_ids)
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        mask[token_id] = bool(text.strip()) and text.isascii() and text.isprintable()
    return mask


def random_suffix(model: Model, n_tokens: int, *, seed: int = 0, max_tries: int = 1000) -> str:
    """``n_tokens`` random allowed tokens that re-tokenize to themselves and start with a space, as text.

    Raises after ``max_tries`` draws that all fail to round-trip (a tokenizer whose allowed tokens merge
    whenever they are joined), or when fewer than ``n_tokens`` tokens are allowed at all.
    """
    tokenizer = model.tokenizer
    candidates = allowed_tokens(tokenizer).nonzero()[:, 0].tolist()
    if n_tokens < 1 or len(candidates) < n_tokens:
        raise ValueError(f"need 1 <= n_tokens <= {len(candidates)} (the printable ASCII tokens), got {n_tokens}")
    rng = random.Random(seed)
    for _ in range(max_tries):
        ids = rng.sample(candidates, n_tokens)
        text = tokenizer.decode(ids)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids and text.startswith(" "):
            return text
    raise ValueError(f"no random {n_tokens}-token suffix re-tokenized to itself in {max_tries} draws with this "
                     "tokenizer; use fewer tokens or raise max_tries")


def _split_prompt(model: Model, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids of a formatted prompt before the end-of-instruction tokens, and those tokens."""
    ids = model.chat.tokenize([instruction])["input_ids"][0].tolist()
    eoi = list(model.chat.eoi_tokens)
    if ids[-len(eoi):] != eoi:
        raise ValueError(f"prompt {instruction[:60]!r} does not end with the end-of-instruction tokens")
    return ids[: -len(eoi)], eoi


class _SuffixObjective:
    """The mean refusal score of ``instructions`` with a candidate suffix (token ids) before the end-of-instruction
    tokens: its value for a batch of suffixes, and its gradient with respect to the one-hot suffix tokens."""

    def __init__(self, model: Model, instructions: list[str]):
        self.model, self.instructions = model, instructions
        self.hf, self.device = model.original_model, model.cfg.device
        self.embed = self.hf.get_input_embeddings().weight  # [d_vocab, d_model]
        self.refusal = list(model.chat.refusal_tokens)
        self.parts = [_split_prompt(model, i) for i in instructions]

    def round_trips(self, ids: list[int]) -> bool:
        """Whether the suffix's text re-tokenizes to ``ids`` after an instruction (so it works as plain text)."""
        before, eoi = self.parts[0]
        text = self.instructions[0] + self.model.tokenizer.decode(ids)
        return self.model.chat.tokenize([text])["input_ids"][0].tolist() == before + ids + eoi

    def losses(self, candidates: Int[Tensor, "n_candidates n_tokens"]) -> Float[Tensor, " n_candidates"]:
        total = torch.zeros(len(candidates), dtype=torch.float64)
        with torch.no_grad():
            for before, eoi in self.parts:
                ids = torch.cat([torch.tensor(before).expand(len(candidates), -1), candidates.cpu(),
                                 torch.tensor(eoi).expand(len(candidates), -1)], dim=1).to(self.device)
                logits = self.hf(input_ids=ids, logits_to_keep=1).logits[:, -1]
                total += refusal_log_odds(logits.float().cpu(), self.refusal).cpu()
        return total / len(self.parts)

    def gradient(self, ids: list[int]) -> Float[Tensor, "n_tokens d_vocab"]:
        """d (mean refusal score) / d (one-hot suffix tokens)."""
        embed = self.embed
        one_hot = torch.zeros(len(ids), embed.shape[0], device=self.device, dtype=embed.dtype)
        one_hot[torch.arange(len(ids)), torch.tensor(ids)] = 1.0
        one_hot.requires_grad_(True)
        for before, eoi in self.parts:
            with torch.no_grad():
                fixed_before = embed[torch.tensor(before, device=self.device)]
                fixed_eoi = embed[torch.tensor(eoi, device=self.device)]
            inputs = torch.cat([fixed_before, one_hot @ embed, fixed_eoi])[None]
            logits = self.hf(inputs_embeds=inputs, logits_to_keep=1).logits[:, -1].float()
            (refusal_log_odds(logits, self.refusal)[0] / len(self.parts)).backward()
        return one_hot.grad.detach()


def gcg_suffix(
    model: Model,
    instructions: Sequence[str],
    *,
    n_tokens: int = 12,
    steps: int = 20,
    top_k: int = 64,
    search_width: int = 32,
    seed: int = 0,
    log=None,
) -> SuffixSearch:
    """Greedy coordinate gradient search for a suffix that lowers the mean refusal score of ``instructions``.

    Cost per step: one forward+backward per instruction and ``search_width``
    forwards per instruction (last-position logits only).
    """
    objective = _SuffixObjective(model, check_instructions(instructions, model.chat))
    allowed = allowed_tokens(model.tokenizer).to(model.cfg.device)
    generator = torch.Generator().manual_seed(seed)
    suffix = model.tokenizer(" !" * n_tokens, add_special_tokens=False)["input_ids"]
    if len(suffix) != n_tokens:
        raise ValueError(f"could not build a {n_tokens}-token initial suffix with this tokenizer")
    started = time.perf_counter()
    history = [float(objective.losses(torch.tensor([suffix]))[0])]
    for step in range(steps):
        top = (-objective.gradient(suffix).masked_fill(~allowed, float("inf"))).topk(top_k, dim=-1).indices.cpu()
        slots = torch.randint(n_tokens, (search_width,), generator=generator)
        candidates = torch.tensor(suffix).repeat(search_width, 1)
        candidates[torch.arange(search_width), slots] = top[
            slots, torch.randint(top_k, (search_width,), generator=generator)
        ]
        keep = [c for c in candidates.tolist() if c != suffix and objective.round_trips(c)]
        scores = objective.losses(torch.tensor(keep)) if keep else None
        if scores is not None and scores.min() < history[-1]:
            suffix = keep[int(scores.argmin())]
        history.append(min(float(scores.min()), history[-1]) if scores is not None else history[-1])
        if log:
            log(
                f"GCG step {step + 1}/{steps}: refusal log-odds {history[-1]:.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    settings = {"n_tokens": n_tokens, "steps": steps, "top_k": top_k, "search_width": search_width, "seed": seed,
                "n_prompts": len(objective.parts), "seconds": round(time.perf_counter() - started, 1)}
    return SuffixSearch(suffix=model.tokenizer.decode(suffix), token_ids=suffix, losses=history, settings=settings)


def token_regions(model: Model, instruction: str, suffix: str = "") -> tuple[list[int], list[int]]:
    """Token indices (in the unpadded prompt) of the instruction and of the suffix in ``instruction + suffix``."""
    text = model.chat.format([instruction + suffix])[0]
    encoding = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index(instruction + suffix)
    split, end = start + len(instruction), start + len(instruction) + len(suffix)
    instruction_tokens, suffix_tokens = [], []
    for i, (lo, _) in enumerate(encoding["offset_mapping"]):
        if start <= lo < split:
            instruction_tokens.append(i)
        elif split <= lo < end:
            suffix_tokens.append(i)
    return instruction_tokens, suffix_tokens


def attention_shares(
    model: Model, instructions: Sequence[str], suffix: str, heads: Sequence[tuple[int, int]]
) -> pd.DataFrame:
    """Mean share of each head's last-token attention on the instruction and on the suffix tokens.

    One row per head: ``layer, head, instruction_share, suffix_share`` (fractions of 1).
    """
    heads = [(int(l), int(h)) for l, h in heads]
    layers = sorted({l for l, _ in heads})
    sums = {head: [0.0, 0.0] for head in heads}
    rows: dict[int, Tensor] = {}
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda p, hook, l=l: rows.__setitem__(l, p[0, :, -1].double().cpu()))
             for l in layers]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for instruction in check_instructions(instructions, model.chat):
            instruction_idx, suffix_idx = token_regions(model, instruction, suffix)
            forward_chat(model, [instruction + suffix],
                         stop_at_layer=stop_before(model, max(layers) + 1))
            for l, h in heads:
                sums[(l, h)][0] += float(rows[l][h, instruction_idx].sum())
                sums[(l, h)][1] += float(rows[l][h, suffix_idx].sum()) if suffix_idx else 0.0
    n = len(instructions)
    return pd.DataFrame([{"layer": l, "head": h, "instruction_share": s[0] / n, "suffix_share": s[1] / n}
                         for (l, h), s in sums.items()])


def suffix_analysis(
    model: Model,
    direction: Float[Tensor, " d_model"],
    harmful: Sequence[str],
    harmless: Sequence[str],
    suffixes: dict[str, str],
    *,
    layer: int,
    heads: Sequence[tuple[int, int]],
    max_new_tokens: int = 32,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare harmful prompts plain and with each suffix, and harmless prompts.

    Returns ``(conditions, heads_table)``. ``conditions``: one row per condition
    with ``cosine`` (mean cosine of ``resid_pre[layer]`` at the last token with the
    direction), ``refusal_score`` (mean log-odds), ``refusal_rate`` (greedy,
    substring judge; completions are not kept) and ``heads_dfa`` (summed direct
    contribution of ``heads`` to the projection). ``heads_table``: per condition
    and head, attention shares on instruction and suffix and the head's DFA.
    """
    v = unit_direction(direction, model.cfg.d_model)
    conditions = {
        "harmful": (list(harmful), ""),
        **{f"harmful + {name}": (list(harmful), s) for name, s in suffixes.items()},
        "harmless": (list(harmless), ""),
    }
    summary, per_head = [], []
    for name, (instructions, suffix) in conditions.items():
        prompts = [i + suffix for i in instructions]
        last = activations(model, prompts, positions=[-1], layers=[layer])[:, 0, 0].double()  # [batch, d_model]
        cosine = torch.nn.functional.cosine_similarity(last, v[None], dim=-1)
        terms = decompose(model, prompts, v, layer=layer).heads.mean(0)  # [layer, head]
        summary.append({
            "condition": name, "suffix": suffix, "cosine": float(cosine.mean()),
            **refusal_summary(model, prompts, max_new_tokens=max_new_tokens),
            "heads_dfa": float(sum(terms[l, h] for l, h in heads)),
        })
        shares = attention_shares(model, instructions, suffix, heads)
        shares.insert(0, "condition", name)
        shares["dfa"] = [float(terms[l, h]) for l, h in heads]
        per_head.append(shares)
    return pd.DataFrame(summary), pd.concat(per_head, ignore_index=True)
