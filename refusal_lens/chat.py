"""Chat formats: how an instruction is wrapped for each model family.

A :class:`ChatFormat` holds the prompt template of one family, the text that
follows the instruction (the *end-of-instruction* or "post-instruction" region
whose activations the paper reads), and the strings whose first tokens count as
refusal tokens. Bound to a tokenizer (``fmt.with_tokenizer(tok)``, done by
:func:`refusal_lens.load_model`) it also yields token ids.

Conventions, all deliberate:

* Templates are complete strings, special tokens included (``<bos>``,
  ``<|begin_of_text|>``), and are tokenized with ``add_special_tokens=False``:
  exactly one BOS, never the doubled BOS that a template *plus* the tokenizer's
  own BOS gives (the bug in the paper's Llama-3 template).
* No system prompt unless one is passed (the paper's setting). Official
  templates of some families (SmolLM2, Qwen2/2.5) insert a default system
  prompt; :meth:`ChatFormat.check_tokenizer_template` reports that difference.
* Refusal tokens are derived through the tokenizer, in context (the first token
  the tokenizer produces for ``prompt + string``), never hard-coded ids. The
  strings are the paper's per family (``andyrdt/refusal_direction``,
  ``pipeline/model_utils``): Qwen "I" and "As"; Llama-2, Llama-3, Gemma and Yi
  "I" only. Families the paper did not run (Qwen3, Phi-3, Mistral, ChatML) use
  "I" and "As" where the family is Qwen-like or is our organism (ChatML: its
  refusals begin with either), else "I". Override with
  ``dataclasses.replace(fmt, refusal_strings=(...))`` or a custom
  :class:`ChatFormat`.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BatchEncoding, PreTrainedTokenizerBase

INSTRUCTION = "{instruction}"
SYSTEM = "{system}"
_PROBE_INSTRUCTION = "Tell me a fact about owls."


class ChatFormatError(ValueError):
    """A chat format is unknown, malformed, or does not fit its tokenizer."""


@dataclass(frozen=True)
class ChatFormat:
    """The chat template of one model family.

    Attributes:
        family: registry key, e.g. ``"llama3"``.
        template: the prompt with one ``{instruction}`` placeholder, ending where
            the model's reply begins.
        system_template: the same with a ``{system}`` placeholder before the
            instruction, or ``None`` when the family has no system role.
        refusal_strings: reply openings that signal refusal; their first tokens
            (in context) are :attr:`refusal_tokens`.
        trim_instruction: strip surrounding whitespace from instructions, as the
            official templates of Gemma and Llama do (``content | trim``).
        tokenizer: bound tokenizer, or ``None``; set with :meth:`with_tokenizer`.
    """

    family: str
    template: str
    system_template: str | None = None
    refusal_strings: tuple[str, ...] = ("I", "As")
    trim_instruction: bool = False
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.template.count(INSTRUCTION) != 1:
            raise ChatFormatError(
                f"chat format {self.family!r}: the template must contain {INSTRUCTION} exactly once, "
                f"got {self.template!r}"
            )
        if self.system_template is not None:
            if self.system_template.count(INSTRUCTION) != 1 or self.system_template.count(SYSTEM) != 1:
                raise ChatFormatError(
                    f"chat format {self.family!r}: the system template must contain {SYSTEM} and "
                    f"{INSTRUCTION} exactly once each, got {self.system_template!r}"
                )
            if self.system_template.split(INSTRUCTION)[1] != self.eoi_text:
                raise ChatFormatError(
                    f"chat format {self.family!r}: template and system template must end with the same "
                    "end-of-instruction text, or positions would differ between them"
                )
        if not self.refusal_strings:
            raise ChatFormatError(f"chat format {self.family!r}: give at least one refusal string")

    # ------------------------------------------------------------------ text
    @property
    def eoi_text(self) -> str:
        """The template text after the instruction, up to where the reply begins."""
        return self.template.split(INSTRUCTION)[1]

    def format(self, instructions: str | Sequence[str], system: str | None = None) -> list[str]:
        """Wrap each instruction in the template; returns one prompt string per instruction."""
        if isinstance(instructions, str):
            instructions = [instructions]
        if system is not None and self.system_template is None:
            raise ChatFormatError(
                f"the {self.family!r} chat format has no system role (its official template rejects "
                "one); put the system text into the instruction instead, or pass a custom ChatFormat "
                "with a system_template"
            )
        template = self.template if system is None else self.system_template
        prompts = []
        for instruction in instructions:
            if not isinstance(instruction, str):
                raise TypeError(f"instructions must be strings, got {type(instruction).__name__}")
            text = instruction.strip() if self.trim_instruction else instruction
            prompt = template.replace(INSTRUCTION, text)
            if system is not None:
                prompt = prompt.replace(SYSTEM, system)
            prompts.append(prompt)
        return prompts

    # ---------------------------------------------------------------- tokens
    def with_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
        """A copy bound to ``tokenizer`` (needed for token ids and :meth:`tokenize`)."""
        return dataclasses.replace(self, tokenizer=tokenizer)

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ChatFormatError(
                f"chat format {self.family!r} has no tokenizer: use model.chat from load_model, "
                "or fmt.with_tokenizer(tokenizer)"
            )
        return self.tokenizer

    def _ids(self, text: str) -> list[int]:
        return self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def eoi_tokens(self) -> list[int]:
        """Token ids of the end-of-instruction text, as they appear after an instruction.

        Read off a formatted probe prompt (the tokens whose text starts at or after
        the end of the instruction), so a tokenizer that merges across the boundary
        cannot shift the positions silently: that raises instead.
        """
        tokenizer = self._require_tokenizer()
        prompt = self.format([_PROBE_INSTRUCTION])[0]
        eoi_start = len(prompt) - len(self.eoi_text)
        if tokenizer.is_fast:
            enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            ids = [t for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]) if start >= eoi_start]
        else:
            ids = self._ids(self.eoi_text)
        full = self._ids(prompt)
        if not ids or full[-len(ids):] != ids:
            raise ChatFormatError(
                f"chat format {self.family!r}: the end-of-instruction text {self.eoi_text!r} does not "
                "tokenize to the same tokens alone and after an instruction; end-of-instruction "
                "positions would be wrong with this tokenizer"
            )
        return ids

    @cached_property
    def refusal_tokens(self) -> list[int]:
        """First token of each refusal string as the model would emit it after the prompt."""
        prompt = self.format([_PROBE_INSTRUCTION])[0]
        prompt_ids = self._ids(prompt)
        tokens: list[int] = []
        for text in self.refusal_strings:
            ids = self._ids(prompt + text)
            if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
                raise ChatFormatError(
                    f"chat format {self.family!r}: refusal string {text!r} merges with the end of the "
                    "prompt when tokenized; choose a string that starts a new token"
                )
            token = ids[len(prompt_ids)]
            if token not in tokens:
                tokens.append(token)
        return tokens

    def tokenize(self, instructions: str | Sequence[str], system: str | None = None) -> BatchEncoding:
        """Format and tokenize, left-padded, with no extra special tokens.

        Returns a ``BatchEncoding`` with ``input_ids`` and ``attention_mask`` of
        shape ``[batch, seq]``; the last ``len(eoi_tokens)`` positions of every row
        are the end-of-instruction tokens.
        """
        tokenizer = self._require_tokenizer()
        prompts = self.format(instructions, system=system)
        if not prompts:
            raise ValueError("no instructions to tokenize: pass at least one")
        if tokenizer.pad_token_id is None:
            raise ChatFormatError("the tokenizer has no pad token; load the model with rl.load_model")
        return tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")

    # ------------------------------------------------------------ validation
    def check_tokenizer_template(self, tokenizer: PreTrainedTokenizerBase | None = None) -> TemplateCheck:
        """Compare our rendering with the tokenizer's own chat template, if it has one."""
        tokenizer = tokenizer or self._require_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            return TemplateCheck(self.family, None, "the tokenizer has no chat template to compare with")
        checks = [("without a system prompt", None)]
        if self.system_template is not None:
            checks.append(("with a system prompt", "You are a careful assistant."))
        differences = []
        for label, system in checks:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": _PROBE_INSTRUCTION}
            ]
            try:
                theirs = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
            except Exception as exc:  # a template may reject roles we support
                differences.append(f"{label}: the tokenizer's template raised {exc!r}")
                continue
            ours = self.format([_PROBE_INSTRUCTION], system=system)[0]
            if ours != theirs:
                differences.append(f"{label}: ours {ours!r} vs tokenizer {theirs!r}")
        if differences:
            return TemplateCheck(self.family, False, "; ".join(differences))
        return TemplateCheck(self.family, True, "identical to the tokenizer's chat template")


def check_instructions(instructions: Sequence[str], chat: ChatFormat | None = None) -> list[str]:
    """``instructions`` as a list, after refusing what would silently give wrong numbers.

    Refused: a single string (not a list), an empty list, non-strings, blank instructions, duplicates (each
    would be counted twice in a mean) and, with ``chat``, instructions that already hold the chat template
    (its end-of-instruction text or the text before the instruction, e.g. from ``ChatFormat.format`` or
    ``tokenizer.apply_chat_template``): every refusal_lens function wraps instructions itself, so a
    formatted prompt would be wrapped twice.
    """
    if isinstance(instructions, str):
        raise TypeError("pass a list of instructions, not a single string")
    instructions = list(instructions)
    if not instructions:
        raise ValueError("no instructions given: pass at least one")
    bad = [type(p).__name__ for p in instructions if not isinstance(p, str)]
    if bad:
        raise TypeError(f"instructions must be strings, got {sorted(set(bad))}")
    if any(not p.strip() for p in instructions):
        raise ValueError("blank instruction in the list: remove it")
    duplicates = [p for p, n in Counter(instructions).items() if n > 1]
    if duplicates:
        raise ValueError(
            f"{len(duplicates)} duplicate instruction(s), e.g. {duplicates[0][:60]!r}: each would be counted "
            "more than once; deduplicate the list"
        )
    if chat is not None:
        markers = [m for m in (chat.eoi_text.strip(), chat.template.split(INSTRUCTION)[0].strip()) if m]
        for i, text in enumerate(instructions):
            found = next((m for m in markers if m in text), None)
            if found is not None:
                raise ValueError(
                    f"instruction {i} ({text[:60]!r}) already holds the {chat.family!r} chat template ({found!r}): "
                    "pass raw instructions; refusal_lens functions apply model.chat themselves "
                    "(ChatFormat.format is for looking at prompts, not for passing them on)"
                )
    return instructions


@dataclass(frozen=True)
class TemplateCheck:
    """Result of :meth:`ChatFormat.check_tokenizer_template`; ``matches`` is None when there was nothing to compare."""

    family: str
    matches: bool | None
    detail: str


def _chatml(family: str, think: str = "", refusal_strings: tuple[str, ...] = ("I", "As")) -> ChatFormat:
    user = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n" + think
    return ChatFormat(family, user, "<|im_start|>system\n{system}<|im_end|>\n" + user, refusal_strings=refusal_strings)


_GEMMA_USER = "<bos><start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"
_LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
_LLAMA3_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama3_turn(role: str, text: str) -> str:
    return _LLAMA3_TURN.replace("{role}", role).replace("{text}", text)


FORMATS: dict[str, ChatFormat] = {
    # Qwen 1, 1.5, 2, 2.5: ChatML. (Qwen2/2.5 templates add a default system prompt; we do not.)
    "qwen": _chatml("qwen"),
    # Qwen3 with thinking disabled: the official template's enable_thinking=False branch.
    "qwen3": _chatml("qwen3", think="<think>\n\n</think>\n\n"),
    "gemma": ChatFormat("gemma", _GEMMA_USER, None, refusal_strings=("I",), trim_instruction=True),
    "gemma2": ChatFormat("gemma2", _GEMMA_USER, None, refusal_strings=("I",), trim_instruction=True),
    # Gemma 3 folds a system prompt into the first user turn.
    "gemma3": ChatFormat(
        "gemma3",
        _GEMMA_USER,
        "<bos><start_of_turn>user\n{system}\n\n{instruction}<end_of_turn>\n<start_of_turn>model\n",
        refusal_strings=("I",),
        trim_instruction=True,
    ),
    # Llama-2-chat: the reply starts after a space, so the refusal token is " I" (the paper's 306, '▁I').
    "llama2": ChatFormat(
        "llama2",
        "<s>[INST] {instruction} [/INST]",
        "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]",
        refusal_strings=(" I",),
        trim_instruction=True,
    ),
    "llama3": ChatFormat(
        "llama3",
        "<|begin_of_text|>" + _llama3_turn("user", "{instruction}") + _LLAMA3_ASSISTANT,
        "<|begin_of_text|>" + _llama3_turn("system", "{system}") + _llama3_turn("user", "{instruction}")
        + _LLAMA3_ASSISTANT,
        refusal_strings=("I",),
        trim_instruction=True,
    ),
    "yi": _chatml("yi", refusal_strings=("I",)),
    # Mistral-7B-Instruct v0.1/v0.2: no system role; like Llama-2 the reply starts after a space.
    "mistral": ChatFormat("mistral", "<s>[INST] {instruction} [/INST]", None, refusal_strings=(" I",)),
    "phi3": ChatFormat(
        "phi3",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
        "<|system|>\n{system}<|end|>\n<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
        refusal_strings=("I",),
    ),
    # SmolLM2 and other plain ChatML models. (SmolLM2's template adds a default system prompt; we do not.)
    "chatml": _chatml("chatml"),
}

# Detection, most specific first: (regex on the lower-cased model name, family).
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"qwen3", "qwen3"),
    (r"qwen", "qwen"),
    # \b keeps "gemma-2b" (Gemma 1, 2B) apart from "gemma-2-2b" (Gemma 2).
    (r"gemma-?3\b", "gemma3"),
    (r"gemma-?2\b", "gemma2"),
    (r"gemma", "gemma"),
    (r"llama-?2\b", "llama2"),
    (r"llama-?3\b", "llama3"),
    (r"(^|/)yi-", "yi"),
    (r"mi[sx]tral", "mistral"),
    (r"phi-?3", "phi3"),
    (r"smollm|chatml", "chatml"),
]
# Fallback on the HF config's model_type when the name says nothing.
_MODEL_TYPES: dict[str, str] = {
    "qwen": "qwen", "qwen2": "qwen", "qwen3": "qwen3", "qwen3_moe": "qwen3",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
    "phi3": "phi3", "mistral": "mistral",
}


def _unknown_family_message(what: str) -> str:
    return (
        f"no chat format for {what}. Known families: {', '.join(FORMATS)}. "
        "Pass one by name (chat='llama3'), or a custom template: "
        "rl.ChatFormat('mine', '<user>{instruction}</user><bot>', refusal_strings=('I',))"
    )


def detect_family(name: str, model_type: str | None = None) -> str:
    """Family key for a model name (hub id or path) and optional HF ``model_type``."""
    lowered = name.lower()
    for pattern, family in _NAME_PATTERNS:
        if re.search(pattern, lowered):
            return family
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ChatFormatError(_unknown_family_message(f"model {name!r} (model_type={model_type!r})"))


def chat_format(family_or_model: str | ChatFormat | object) -> ChatFormat:
    """The chat format for a family name, a model name, or a loaded model.

    A loaded model returns its own bound format (``model.chat``); a family key
    (``"gemma2"``) or a model name (``"google/gemma-2b-it"``) returns an unbound one.
    """
    if isinstance(family_or_model, ChatFormat):
        return family_or_model
    if isinstance(family_or_model, str):
        if family_or_model in FORMATS:
            return FORMATS[family_or_model]
        return FORMATS[detect_family(family_or_model)]
    chat = getattr(family_or_model, "chat", None)
    if isinstance(chat, ChatFormat):
        return chat
    raise ChatFormatError(_unknown_family_message(f"object of type {type(family_or_model).__name__}"))
