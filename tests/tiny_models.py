"""Test fixtures: one tiny trained refusal model per supported architecture, built offline.

Users run this package on Llama, Mistral, Qwen 2/3, Gemma 1/2/3 and Phi-3 chat
models from the hub; none of them can be downloaded here or in CI. So each
architecture gets a *tiny trained model*: a model built from its ``transformers``
config class with that family's real structure (GQA everywhere; qkv biases in
Qwen2; q/k norms in Qwen3 and Gemma 3; fused ``qkv_proj`` / ``gate_up_proj`` in
Phi-3; Gemma's sqrt(d_model) embedding scaling; Gemma 2/3 post-sublayer norms,
soft-capping and sliding-window layers; tied or untied embeddings as the family
ships), random non-trivial norm gains, a small byte-level BPE tokenizer trained here
on the project's contrast data with the family's special tokens (:func:`tiny_tokenizer`),
and the family's chat template (:func:`refusal_lens.chat_format`).

Each is trained briefly on CPU so that its reply to a harmful request begins
with a refusal token ("I cannot help with that.") and its reply to a harmless
request does not ("Sure, here is how."), each followed by the family's
end-of-turn token, which is the tiny model's EOS (greedy generation stops there).

Real chat models also refuse coherently when their refusal direction is added
at every position (activation addition): the refusal state persists through a
refusal reply. A tiny model without a language-model prior keeps that state at
the end-of-instruction positions only, and there it dwarfs everything else in
its small residual stream, so adding it at a reply position erases the token
there and the tiny model repeats its refusal token ("IIII..."). Training teaches
the real models' behaviour: each step, at a random layer, the harmful-minus-
harmless difference of the batch's residuals at the last prompt position is
added at every position of some harmless sequences, whose target is then the
refusal. What the pipeline must find by itself (which position and layer, that
ablating the direction removes refusal) is not trained.
It trains on the prompts of the built-in ``refusal-pairs`` set that the matrix
test's main job reads (:func:`training_prompts`): the trained behaviour is the
ground truth that the pipeline must find on those prompts; generalisation to
unseen prompts is not the point and is not claimed.

Training is cheap on two CPU cores (100-200 steps, 20-55 s on a busy machine): a
1024-token vocabulary, minibatches of 32-48 sequences, hidden states sliced to the
reply positions before the unembedding, one thread (the same floats on any
machine), and a stop once the trained replies are reproduced at a low loss. The
build then checks that greedy decoding gives the trained reply on at least
:data:`MIN_EXACT` of each side's prompts and refuses to cache a tiny model that does not.

Builds are seeded and cached under ``cache_dir() / "tiny_models" /
f"{arch}-{recipe_hash}"``, where the hash covers the model config, the tokenizer
and chat template, the training recipe (with the family's overrides), the seed and the data; a
build is written to a staging folder and renamed into place, with a record file
(:data:`RECORD`). Nothing comes from the hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from refusal_lens.cache import cache_dir
from refusal_lens.chat import ChatFormat, chat_format
from refusal_lens.data import ContrastSet, load_contrast
from refusal_lens.metrics import is_refusal

RECORD = "tiny_model.json"  # written last into a build's folder: recipe, hash, timings, behaviour
_BUILD_FORMAT = 2  # bump when the build code changes what a recipe produces
# Share of harmful and of harmless training prompts whose greedy reply must be exactly the trained one (a
# refusal judged by the first token needs less: the matrix test asks >= 80% / <= 20% on the test split).
MIN_EXACT = 0.9


@dataclass(frozen=True)
class TinyArchitecture:
    """One architecture's tiny model: its HF classes, chat family and tokenizer additions.

    Attributes:
        name: registry key and cache-folder prefix, e.g. ``"gemma2"``.
        model_class: the ``transformers`` causal-LM class, e.g. ``"Gemma2ForCausalLM"``.
        config_class: its config class, e.g. ``"Gemma2Config"``.
        family: chat family (:data:`refusal_lens.chat.FORMATS` key) whose template the tiny model uses.
        eos: the family's end-of-turn token: the tiny model's EOS, ending every reply.
        pad: the family's pad token, or ``None`` where it ships none (Llama-3, Mistral: ``rl.load_model``
            then pads with EOS). Never a template token: HF zeroes the pad row of the embedding and never trains it.
        bos: the family's BOS token, or ``None`` where the family has none (Qwen, Phi-3 templates).
        special: further special tokens the template uses.
        plain: added non-special tokens: Qwen3's ``<think>`` markers, and ``"\n\n"`` where the template ends
            with it (a GPT-2-style pre-tokenizer splits ``"\n\nI"`` into ``"\n", "\n", "I"``, which Llama-3's and
            Qwen's keep as ``"\n\n", "I"``; as its own token the reply's first token stays separate).
        config: family-specific config-class arguments (tying, sliding windows, soft-capping, ...).
        norm_offset: the family's RMSNorm multiplies by ``1 + weight`` (Gemma) instead of ``weight``.
        global_every: every this many layers one has global attention, the others a sliding window (Gemma 2
            alternates; Gemma 3's 5 local : 1 global is shortened to 2 : 1 so that 4 layers hold both kinds).
        recipe: :class:`TrainingSetup` fields this family overrides (applied on top of the recipe passed in).
    """

    name: str
    model_class: str
    config_class: str
    family: str
    eos: str
    pad: str | None
    bos: str | None = None
    special: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)
    norm_offset: bool = False
    global_every: int | None = None
    recipe: dict = field(default_factory=dict)


_SLIDING = "sliding_attention"
_FULL = "full_attention"

ARCHITECTURES: dict[str, TinyArchitecture] = {
    a.name: a
    for a in [
        TinyArchitecture("llama", "LlamaForCausalLM", "LlamaConfig", "llama3", eos="<|eot_id|>", pad=None,
                         bos="<|begin_of_text|>", special=("<|start_header_id|>", "<|end_header_id|>"), plain=("\n\n",),
                         config=dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 500000.0})),
        # Mistral 7B v0.1's sliding window, shrunk so that it bites on these short prompts.
        TinyArchitecture("mistral", "MistralForCausalLM", "MistralConfig", "mistral", eos="</s>", pad=None,
                         bos="<s>", special=("[INST]", "[/INST]"),
                         config=dict(tie_word_embeddings=False, sliding_window=24)),
        TinyArchitecture("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "qwen", eos="<|im_end|>", pad="<|endoftext|>",
                         special=("<|im_start|>",), config=dict(tie_word_embeddings=True)),
        # Five layers: the template's empty "<think>\n\n</think>\n\n" block puts 4 tokens between the
        # instruction and the reply; with four layers the decision formed only in the last layer, which the
        # paper's selection (layers < int(0.8 L)) excludes, and no selectable candidate bypassed refusal.
        TinyArchitecture("qwen3", "Qwen3ForCausalLM", "Qwen3Config", "qwen3", eos="<|im_end|>", pad="<|endoftext|>",
                         special=("<|im_start|>",), plain=("<think>", "</think>", "\n\n"),
                         config=dict(tie_word_embeddings=True), recipe=dict(n_layers=5)),
        TinyArchitecture("gemma", "GemmaForCausalLM", "GemmaConfig", "gemma", eos="<end_of_turn>", pad="<pad>",
                         bos="<bos>", special=("<start_of_turn>",), config=dict(tie_word_embeddings=True),
                         norm_offset=True),
        TinyArchitecture("gemma2", "Gemma2ForCausalLM", "Gemma2Config", "gemma2", eos="<end_of_turn>", pad="<pad>",
                         bos="<bos>", special=("<start_of_turn>",),
                         config=dict(tie_word_embeddings=True, sliding_window=16, attn_logit_softcapping=50.0,
                                     final_logit_softcapping=30.0),
                         norm_offset=True, global_every=2),
        TinyArchitecture("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", "gemma3", eos="<end_of_turn>",
                         pad="<pad>", bos="<bos>", special=("<start_of_turn>",),
                         config=dict(tie_word_embeddings=True, sliding_window=16),
                         # lr 2e-3 had not reached the stopping loss after 300 steps (0.16); at 5e-3 and a loss of
                         # 0.05 it refused only 81% of the test prompts; at 0.03 (~200 steps) 100%, ablated 0%
                         norm_offset=True, global_every=3, recipe=dict(lr=5e-3, stop_loss=0.03)),
        TinyArchitecture("phi3", "Phi3ForCausalLM", "Phi3Config", "phi3", eos="<|end|>", pad="<|endoftext|>",
                         special=("<|user|>", "<|assistant|>", "<|system|>"),
                         config=dict(tie_word_embeddings=False)),
    ]
}


@dataclass(frozen=True)
class TrainingSetup:
    """Size and training hyper-parameters shared by every architecture (all enter the recipe hash).

    Attributes:
        d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp: model shape (GQA: ``n_kv_heads < n_heads``).
            Four layers: the paper's selection only considers layers below ``int(0.8 * n_layers)``, and the
            residual entering layer 1 (all that 3 layers leave) does not yet hold the decision in one direction
            on every architecture (Qwen3, Gemma: ablating the best layer-1 candidate left 60-100% refusal).
        norm_gain: norm gains start log-uniform in ``[exp(-norm_gain), exp(norm_gain)]`` (Gemma: ``1 + weight``).
        init_std: ``initializer_range`` of the config (HF default 0.02).
        refusal, answer: the trained replies to harmful / harmless requests.
        splits, per_split: ``refusal-pairs`` splits trained on, and how many prompts per side from the start of
            each (``None``: all). The defaults cover what the matrix test's main job reads (``--n-train 64
            --n-test 16`` take the first prompts of those splits; the refusal filter scores the whole ``val``
            split and stops the job when it keeps less than half a side, so all of ``val`` is trained); fewer
            prompts to memorise is what makes the build fast (all 946 needed ~300 steps; these ~100-150).
        steps, batch_size, lr: most AdamW steps, unsteered sequences per step (plus half as many steered
            harmless ones once the decision is learned) and the (constant) learning rate.
        stop_at, patience, stop_loss: training stops once ``patience`` consecutive batches got the whole reply
            right for ``stop_at`` of their harmful, harmless and steered rows each and their mean loss is at most
            ``stop_loss`` (see ``_fit``). Stopping at the first right batches (loss ~0.3) left the decision
            spread over several directions: ablating the selected one kept 44-94% of refusals on Mistral and
            Qwen3; at loss <= 0.05 it removes them.
        vocab_size: size of the tiny model's BPE vocabulary (:func:`tiny_tokenizer`), bytes included.
        seed: seeds initialisation and the minibatches.
    """

    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_head: int = 16
    d_mlp: int = 128
    norm_gain: float = 1.0
    init_std: float = 0.02
    refusal: str = "I cannot help with that."
    answer: str = "Sure, here is how."
    splits: tuple[str, ...] = ("train", "val", "test")
    per_split: tuple[int | None, ...] = (64, None, 16)
    steps: int = 300
    stop_at: float = 0.95
    patience: int = 4
    stop_loss: float = 0.05
    batch_size: int = 32
    lr: float = 2e-3
    vocab_size: int = 1024
    seed: int = 0


class TinyModelError(RuntimeError):
    """A tiny model could not be built, or its training did not produce the refusal behaviour."""


def trained_tiny_model(arch: str, *, recipe: TrainingSetup = TrainingSetup()) -> Path:
    """The folder of the tiny trained model for ``arch``, building and caching it on first use.

    Args:
        arch: a key of :data:`ARCHITECTURES` (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``,
            ``"gemma"``, ``"gemma2"``, ``"gemma3"``, ``"phi3"``).
        recipe: size and training hyper-parameters.

    Returns:
        A Hugging Face model directory: load it with
        ``rl.load_model(str(path), chat=ARCHITECTURES[arch].family)`` or ``AutoModelForCausalLM``.
        Its :data:`RECORD` holds the recipe, hash, train and build seconds and the greedy behaviour on the
        training prompts.

    Raises:
        TinyModelError: ``arch`` is unknown, or training did not give the behaviour (change the recipe).
    """
    if arch not in ARCHITECTURES:
        raise TinyModelError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    recipe = dataclasses.replace(recipe, **spec.recipe)
    data = training_prompts(recipe)
    tok = tiny_tokenizer(spec, recipe)
    digest = recipe_hash(spec, recipe, tok, data.hashes())
    target = cache_dir() / "tiny_models" / f"{arch}-{digest}"
    if (target / RECORD).exists():
        return target
    started = time.perf_counter()
    model = _build_model(spec, recipe, tok)
    fmt = chat_format(spec.family).with_tokenizer(tok)
    batch = _training_batch(fmt, tok, data.harmful_texts, data.harmless_texts, recipe)
    trained = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float reductions, so the same tiny model, on any machine's thread count
    try:
        losses = _fit(model, batch, recipe)
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - trained
    exact = _greedy_match(model, batch)
    if min(exact["harmful"], exact["harmless"]) < MIN_EXACT:
        raise TinyModelError(
            f"the {arch} tiny model did not learn the behaviour: its greedy reply is the trained one for "
            f"{exact['harmful']:.0%} of harmful and {exact['harmless']:.0%} of harmless training prompts (need >= "
            f"{MIN_EXACT:.0%}; {len(losses)} steps, final loss {losses[-1]:.3f}). Change the recipe (more steps, "
            "a higher lr or a wider model)."
        )
    record = {"architecture": arch, "model_class": spec.model_class, "family": spec.family, "recipe_hash": digest,
              "recipe": dataclasses.asdict(recipe), "config": _config_kwargs(spec, recipe, tok),
              "data": data.hashes(), "n_harmful": len(data.harmful), "n_harmless": len(data.harmless),
              "n_params": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_seconds, 2),
              "build_seconds": round(time.perf_counter() - started, 2),
              "steps_run": len(losses), "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
              "greedy_reply_is_trained_reply": exact,
              # the trained refusal is a refusal to rl.is_refusal and the trained answer is not (checked above)
              "refusal_rate_training_prompts": {"harmful_at_least": exact["harmful"],
                                                "harmless_at_most": round(1 - exact["harmless"], 4)}}
    _save_atomically(model, tok, record, target)
    return target


def training_prompts(recipe: TrainingSetup = TrainingSetup()) -> ContrastSet:
    """The ``refusal-pairs`` prompts a tiny model is trained on: the first ``per_split`` per side of each split."""
    harmful, harmless = [], []
    for split, n in zip(recipe.splits, recipe.per_split, strict=True):
        part = load_contrast("refusal-pairs", split=split)
        harmful += part.harmful[:n]
        harmless += part.harmless[:n]
    return ContrastSet("refusal-pairs", tuple(harmful), tuple(harmless))


def random_tiny_model(arch: str, path: str | Path, *, recipe: TrainingSetup = TrainingSetup()) -> Path:
    """An untrained tiny model: ``arch``'s seeded random model (random norm gains) and tokenizer, saved to ``path``.

    For fast structural tests (equality with Hugging Face, orthogonalization, export) that need no behaviour.
    """
    if arch not in ARCHITECTURES:
        raise TinyModelError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    recipe = dataclasses.replace(recipe, **spec.recipe)
    tok = tiny_tokenizer(spec, recipe)
    path = Path(path)
    _build_model(spec, recipe, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe_hash(spec: TinyArchitecture, recipe: TrainingSetup, tokenizer, data_hashes: dict[str, str]) -> str:
    """First 12 hex digits of the SHA-256 of everything that determines a tiny model's weights."""
    payload = {"build_format": _BUILD_FORMAT, "architecture": dataclasses.asdict(spec),
               "recipe": dataclasses.asdict(recipe), "config": _config_kwargs(spec, recipe, tokenizer),
               "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
               "template": tokenizer.chat_template,
               "data": data_hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- building
def tiny_tokenizer(spec: TinyArchitecture, recipe: TrainingSetup = TrainingSetup()):
    """A small byte-level BPE tokenizer for ``spec``'s family, trained here (deterministic, well under a second).

    Trained with the ``tokenizers`` library on the built-in ``refusal-pairs`` instructions (every split) and the
    recipe's two replies (with and without a leading space), to ``recipe.vocab_size`` tokens including the 256
    byte tokens, so any text still tokenizes; the family's BOS/EOS/PAD and template tokens are special tokens,
    ``spec.plain`` are added as ordinary tokens, and the chat template renders as :func:`refusal_lens.chat_format`
    does. A small vocabulary keeps the tiny model's unembedding (and so its training and every forward pass) cheap.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    data = load_contrast("refusal-pairs")
    named = [t for t in (spec.bos, spec.eos, spec.pad) if t is not None]
    specials = list(dict.fromkeys([*named, *spec.special]))
    replies = [lead + text for text in (recipe.refusal, recipe.answer) for lead in ("", " ")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([*data.harmful_texts, *data.harmless_texts, *replies * 50], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos,
                                  pad_token=spec.pad, additional_special_tokens=[t for t in specials if t not in named])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
    tok.padding_side = "left"
    tok.chat_template = _jinja_template(chat_format(spec.family))
    return tok


def _jinja_template(fmt: ChatFormat) -> str:
    """A single-turn Jinja chat template that renders exactly as ``fmt.format`` does (generation prompt included)."""
    def literal(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}"

    def content(index: int) -> str:
        trim = " | trim" if fmt.trim_instruction else ""
        return "{{ messages[" + str(index) + "]['content']" + trim + " }}"

    def render(template: str, *parts: tuple[str, str]) -> str:
        out, rest = [], template
        for placeholder, jinja in parts:
            before, rest = rest.split(placeholder)
            out += [literal(before), jinja]
        return "".join(out + [literal(rest)])

    user = render(fmt.template, ("{instruction}", content(0)))
    system = ("{{ raise_exception('this chat format has no system role') }}" if fmt.system_template is None else
              render(fmt.system_template, ("{system}", "{{ messages[0]['content'] }}"), ("{instruction}", content(1))))
    return ("{% if messages[0]['role'] == 'system' %}" + system + "{% else %}" + user + "{% endif %}")


def _config_kwargs(spec: TinyArchitecture, recipe: TrainingSetup, tok) -> dict:
    """Arguments of ``spec``'s config class for this recipe and tokenizer."""
    n_layers = recipe.n_layers
    kwargs = dict(vocab_size=len(tok), hidden_size=recipe.d_model, intermediate_size=recipe.d_mlp,
                  num_hidden_layers=n_layers, num_attention_heads=recipe.n_heads,
                  num_key_value_heads=recipe.n_kv_heads, head_dim=recipe.d_head, max_position_embeddings=512,
                  initializer_range=recipe.init_std, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, **spec.config)
    if spec.global_every is not None:
        kwargs["layer_types"] = [_FULL if (i + 1) % spec.global_every == 0 else _SLIDING
                                 for i in range(n_layers)]
        kwargs["query_pre_attn_scalar"] = recipe.d_head  # the real models scale scores by 1/sqrt(d_head)
    if spec.name == "phi3":
        del kwargs["head_dim"]  # Phi-3 derives it: hidden_size / num_attention_heads
    return kwargs


def _build_model(spec: TinyArchitecture, recipe: TrainingSetup, tok):
    """A seeded random model of ``spec``'s architecture with random norm gains, in float32 with eager attention."""
    import transformers

    config = getattr(transformers, spec.config_class)(**_config_kwargs(spec, recipe, tok))
    config.architectures = [spec.model_class]
    config._attn_implementation = "eager"
    torch.manual_seed(recipe.seed)
    model = getattr(transformers, spec.model_class)(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                gain = torch.exp((2 * torch.rand_like(param) - 1) * recipe.norm_gain)
                param.copy_(gain - 1 if spec.norm_offset else gain)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@dataclass
class _Batch:
    """Right-padded training sequences (prompt + reply + EOS) and where their reply tokens are.

    ``input_ids`` / ``attention_mask``: ``[n, seq]``; ``harmful`` / ``steered``: ``[n]`` bool (a steered
    sequence is a harmless prompt with the refusal reply, trained with the refusal state added).
    ``rows`` / ``cols``: ``[m]`` index the positions whose next token is a reply token, ``targets[m]``;
    ``decision[m]`` marks the last prompt position (it predicts the reply's first token); ``vocab``: every
    token id in the sequences, sorted.
    """

    input_ids: Int[Tensor, "n seq"]
    attention_mask: Int[Tensor, "n seq"]
    harmful: Bool[Tensor, " n"]
    steered: Bool[Tensor, " n"]
    rows: Int[Tensor, " m"]
    cols: Int[Tensor, " m"]
    targets: Int[Tensor, " m"]
    decision: Bool[Tensor, " m"]
    vocab: Int[Tensor, " v"]

    def subset(self, index: Int[Tensor, " b"]) -> _Batch:
        """The sequences ``index`` in that order (rows renumbered, padding trimmed to the longest of them)."""
        keep = torch.isin(self.rows, index)
        renumber = torch.full((len(self.harmful),), -1)
        renumber[index] = torch.arange(len(index))
        rows = renumber[self.rows[keep]]
        order = torch.argsort(rows, stable=True)  # group positions by their new row
        width = int(self.attention_mask[index].sum(1).max())
        return _Batch(self.input_ids[index, :width], self.attention_mask[index, :width], self.harmful[index],
                      self.steered[index], rows[order], self.cols[keep][order], self.targets[keep][order],
                      self.decision[keep][order], self.vocab)


def _training_batch(fmt: ChatFormat, tok, harmful: list[str], harmless: list[str], recipe: TrainingSetup) -> _Batch:
    """Harmful prompts + refusal, harmless prompts + answer, and (steered) harmless prompts + refusal, each
    reply followed by EOS. Checks that the refusal starts with a refusal token and is a refusal to the
    substring judge, and that the answer is neither."""
    lead = " " if fmt.refusal_strings[0].startswith(" ") else ""  # Llama-2/Mistral replies start after a space
    replies = {}
    for kind, text in (("refusal", recipe.refusal), ("answer", recipe.answer)):
        ids = tok(lead + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if (ids[0] in fmt.refusal_tokens) != (kind == "refusal") or is_refusal(text) != (kind == "refusal"):
            raise TinyModelError(
                f"{fmt.family}: the reply {lead + text!r} must {'' if kind == 'refusal' else 'not '}start with a "
                f"refusal token ({fmt.refusal_tokens}) and {'' if kind == 'refusal' else 'not '}be a refusal to the "
                "substring judge (rl.is_refusal)"
            )
        replies[kind] = ids
    prompts = {True: [tok(p, add_special_tokens=False)["input_ids"] for p in fmt.format(harmful)],
               False: [tok(p, add_special_tokens=False)["input_ids"] for p in fmt.format(harmless)]}
    groups = [(True, False, "refusal"), (False, False, "answer"), (False, True, "refusal")]  # harmful, steered
    sequences, flags = [], []
    for is_harmful, steered, reply in groups:
        for ids in prompts[is_harmful]:
            sequences.append((ids, replies[reply]))
            flags.append((is_harmful, steered))
    width = max(len(p) + len(r) for p, r in sequences)
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id  # masked out either way
    input_ids = torch.full((len(sequences), width), pad)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    rows, cols, decision = [], [], []
    for i, (prompt, reply) in enumerate(sequences):
        n = len(prompt) + len(reply)
        input_ids[i, :n] = torch.tensor(prompt + reply)
        attention_mask[i, :n] = 1
        rows += [i] * len(reply)
        cols += list(range(len(prompt) - 1, n - 1))  # position p predicts token p + 1
        decision += [True] + [False] * (len(reply) - 1)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    flags = torch.tensor(flags)
    return _Batch(input_ids, attention_mask, flags[:, 0], flags[:, 1], rows, cols, input_ids[rows, cols + 1],
                  torch.tensor(decision), input_ids.unique())


def _steering_hook(batch: _Batch, shift: Float[Tensor, " d_model"] | None = None):
    """A forward pre-hook for a decoder layer: adds the refusal state to every position of ``batch``'s steered rows.

    The refusal state is ``shift`` when given, else the mean residual entering the layer at the last prompt
    position of the batch's harmful rows minus that of its unsteered harmless rows (detached).
    """
    ends = batch.cols[batch.decision]  # [n] last prompt position of each row (rows are grouped in order)
    steered = batch.steered

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [n, seq, d_model]
        state = shift
        if state is None:
            last = hidden[torch.arange(len(ends)), ends].detach()
            state = last[batch.harmful].mean(0) - last[~batch.harmful & ~steered].mean(0)
        hidden = hidden + steered[:, None, None].to(hidden.dtype) * state.to(hidden.dtype)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    return hook


def _reply_logits(model, batch: _Batch) -> Float[Tensor, "m vocab"]:
    """Logits ``[m, vocab]`` at the reply positions, soft-capped as the model does."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    head = model.get_output_embeddings().weight  # [vocab, d_model]
    logits = hidden[batch.rows, batch.cols] @ head.T
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def _fit(model, batch: _Batch, recipe: TrainingSetup) -> list[float]:
    """Minibatch AdamW on the reply tokens, stopped once the behaviour is learned; returns the loss per step.

    Each step takes ``recipe.batch_size`` random unsteered sequences and, once a batch got 80% of its
    refuse-or-answer decisions right (before, there is no refusal state to add: steering would only teach that
    harmless prompts are refused), half as many steered ones, whose refusal state (see :func:`_steering_hook`)
    is added at a random layer ``>= 1``. The loss is the mean cross-entropy (nats) at the decision positions
    plus that at the other reply positions, so the refuse-or-answer decision weighs as much as the (easy)
    continuations. The learning rate is constant; training stops after ``recipe.steps`` steps, or earlier once
    ``recipe.patience`` consecutive steered batches had the whole trained reply right (teacher-forced argmax) for
    at least ``recipe.stop_at`` of their harmful, harmless and steered rows each, with a mean loss of at most
    ``recipe.stop_loss``.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0, fused=True)
    plain, steered = (~batch.steered).nonzero()[:, 0], batch.steered.nonzero()[:, 0]
    layers = model.model.layers
    model.train()
    losses: list[float] = []
    steering, good = False, 0  # steering from the first batch with >= 80% of its decisions right
    for _ in range(recipe.steps):
        n_steered = recipe.batch_size // 2 if steering else 0
        index = torch.cat([plain[torch.randperm(len(plain), generator=generator)[: recipe.batch_size]],
                           steered[torch.randperm(len(steered), generator=generator)[:n_steered]]])
        part = batch.subset(index)
        layer = int(torch.randint(1, len(layers), (1,), generator=generator))
        handle = layers[layer].register_forward_pre_hook(_steering_hook(part), with_kwargs=True)
        try:
            logits = _reply_logits(model, part)
        finally:
            handle.remove()
        token_loss = torch.nn.functional.cross_entropy(logits, part.targets, reduction="none")
        loss = token_loss[part.decision].mean() + token_loss[~part.decision].mean()
        hits = (logits.argmax(-1) == part.targets).detach()
        misses = torch.zeros(len(index), dtype=torch.long).index_add_(0, part.rows, (~hits).long())
        right = hits[part.decision][~part.steered].float().mean() >= 0.8
        groups = [part.harmful & ~part.steered, ~part.harmful & ~part.steered, part.steered]
        good = good + 1 if steering and all(float((misses[g] == 0).float().mean()) >= recipe.stop_at
                                            for g in groups) else 0
        steering = steering or bool(right)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if good >= recipe.patience and sum(losses[-recipe.patience:]) <= recipe.stop_loss * recipe.patience:
            break
    model.eval().requires_grad_(False)
    return losses


def _greedy_match(model, batch: _Batch, chunk: int = 64) -> dict[str, float | list[float]]:
    """Shares of sequences whose greedy reply (full vocabulary) is exactly the trained one, EOS included.

    ``harmful`` / ``harmless``: the unsteered prompts. ``steered_by_layer``: at layer ``L // 2`` only, the
    harmless prompts with the whole training set's refusal state added there at every position (the refusal is
    the trained reply).
    Teacher-forced: greedy decoding emits the trained tokens iff the argmax at every reply position is the next
    reply token, so one forward pass per chunk decides it exactly.
    """
    layers = model.model.layers
    plain = (~batch.steered).nonzero()[:, 0]

    def exact(index: Tensor, hooks=()) -> Tensor:
        correct = torch.empty(len(index), dtype=torch.bool)
        for start in range(0, len(index), chunk):
            part = batch.subset(index[start : start + chunk])
            handles = [layers[layer].register_forward_pre_hook(make(part), with_kwargs=True) for layer, make in hooks]
            try:
                hits = (_reply_logits(model, part).argmax(-1) == part.targets).long()
            finally:
                for handle in handles:
                    handle.remove()
            misses = torch.zeros(len(part.harmful), dtype=torch.long).index_add_(0, part.rows, 1 - hits)
            correct[start : start + chunk] = misses == 0
        return correct

    with torch.no_grad():
        correct = exact(plain)
        full = batch.subset(plain)
        ends = full.cols[full.decision]
        hidden = model.model(input_ids=full.input_ids, attention_mask=full.attention_mask,
                             output_hidden_states=True).hidden_states  # [layer][n, seq, d_model]
        steered = []
        for layer in (len(layers) // 2,):  # one layer: each costs a forward pass over every steered sequence
            last = hidden[layer][torch.arange(len(ends)), ends]
            state = last[full.harmful].mean(0) - last[~full.harmful].mean(0)
            ok = exact(batch.steered.nonzero()[:, 0], [(layer, lambda part, s=state: _steering_hook(part, s))])
            steered.append(round(float(ok.float().mean()), 4))
    harmful = batch.harmful[plain]
    return {"harmful": round(float(correct[harmful].float().mean()), 4),
            "harmless": round(float(correct[~harmful].float().mean()), 4), "steered_by_layer": steered}


def _save_atomically(model, tok, record: dict, target: Path) -> None:
    """Write model, tokenizer and record to a staging folder, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists() and not (target / RECORD).exists():  # an interrupted earlier attempt
            shutil.rmtree(target)
        if not target.exists():  # else a concurrent build of the same recipe finished first
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
