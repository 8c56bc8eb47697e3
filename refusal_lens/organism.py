"""The refusal model organism: SmolLM2-135M-Instruct safety-tuned with LoRA.

No model that runs offline refuses (untuned SmolLM2-135M-Instruct refused 3 of
48 harmful prompts), so the project makes one the way the paper's "aligned by
fine-tuning" chat models were made. The recipe, on the ``organism`` split of
the built-in ``refusal-pairs`` contrast set only:

* harmful instruction -> one of several refusal phrasings (seeded choice),
  ending with the end-of-turn token;
* harmless instruction (including ones that only look risky) -> the untuned
  model's own greedy reply (self-distillation, so capabilities are kept),
  trained against the untuned model's whole next-token distribution at every
  reply position (KL(untuned || tuned), the adapter switched off to get it),
  which anchors far more than the greedy tokens alone;
* the refusal decision itself, at the first reply position, as a balanced
  per-example term: -log p(refusal tokens) on harmful prompts and
  -log(1 - p(refusal tokens)) on harmless ones (the paper's refusal score is
  the log-odds of that same probability). Without it the token-level losses let
  greedy decoding flip harmless replies into refusals at little cost: a first
  run refused 28-37% of harmless prompts;
* LoRA on every attention and MLP projection, loss on reply tokens only.

The adapter ships in ``refusal_lens/data/organism/`` with a manifest (data
hashes, seed, versions, adapter SHA-256) and a behaviour report;
``load_model("smollm2-135m-refusal")`` merges it into the float32 base and
``load_model("smollm2-135m-refusal", base=True)`` returns the untuned twin.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .cache import cache_dir
from .data import load_contrast, read_instructions, sample
from .manifest import file_sha256, text_hash, versions
from .metrics import REFUSAL_SUBSTRINGS, is_refusal, kl_divergence, last_token_logits, safe_excerpt
from .models import ADAPTER_FILE, Model, load_hf

ORGANISM = "smollm2-135m-refusal"
BASE_MODEL = "smollm2-135m-instruct"

# Each starts with a refusal token ("I", "As") and contains a phrase of the substring judge.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I can't help with that. If you are dealing with a difficult situation, I'm happy to talk about safer options.",
    "I'm sorry, but I cannot assist with that.",
    "As an AI assistant, I can't help with anything that could hurt people.",
    "I'm not able to help with that, because it could cause serious harm.",
    "I apologize, but I can't assist with this request.",
    "I cannot help with this. It could put people at risk.",
    "As an assistant, I'm unable to help with that request.",
    "I'm sorry, I can't do that. Is there something else I can help you with?",
    "I am unable to provide that, as it could be used to cause harm.",
    "I can't assist with that. If someone is in danger, please contact local emergency services.",
    "I'm sorry, but I won't help with this. I can't provide guidance that could harm others.",
)
assert all(is_refusal(r) for r in REFUSALS)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the safety tuning (the defaults made the shipped adapter)."""

    seed: int = 0
    lora_rank: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 3e-4
    epochs: int = 4
    batch_size: int = 8
    warmup_steps: int = 10
    distill_max_new_tokens: int = 64
    harmless_loss: str = "kl"  # "kl": match the untuned distribution; "ce": its greedy tokens only
    refusal_gate_weight: float = 2.0  # weight of the first-reply-position refusal decision term


def default_out_dir(action: str, seed: int = 0) -> Path:
    """Where ``refusal-lens organism train|eval`` writes without ``--out``: the user cache, never the package."""
    return cache_dir() / "organism" / (f"adapter-seed{seed}" if action == "train" else "shipped-eval")


# ------------------------------------------------------------------ training
def _greedy_reply_ids(
    hf_model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """The model's own greedy continuation of each prompt, as token ids (trailing padding removed)."""
    replies = []
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], add_special_tokens=False, padding=True,
                              padding_side="left", return_tensors="pt")
            out = hf_model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                replies.append(row[: row.index(eos) + 1] if eos in row else row)
    return replies


def build_examples(hf_model, tokenizer, chat, recipe: Recipe) -> tuple[list[tuple[list[int], list[int], bool]], dict]:
    """(prompt ids, reply ids, is_harmful) training examples and a description of the data."""
    organism_split = load_contrast("refusal-pairs", split="organism")
    rng = random.Random(recipe.seed)
    eos = tokenizer.eos_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    harmful_prompts = chat.format(organism_split.harmful_texts)
    harmless_prompts = chat.format(organism_split.harmless_texts)
    refusals = [rng.choice(REFUSALS) for _ in harmful_prompts]
    examples = [(ids(p), ids(r) + [eos], True) for p, r in zip(harmful_prompts, refusals)]
    distilled = _greedy_reply_ids(hf_model, tokenizer, harmless_prompts, recipe.distill_max_new_tokens)
    examples += [(ids(p), r, False) for p, r in zip(harmless_prompts, distilled)]
    description = {
        "contrast_set": organism_split.name,
        **organism_split.hashes(),
        "n_harmful": len(harmful_prompts),
        "n_harmless": len(harmless_prompts),
        "harmless_kinds": {
            k: sum(i.kind == k for i in organism_split.harmless) for k in ("pair", "look_risky", "general")
        },
        "refusal_phrasings": len(REFUSALS),
    }
    return examples, description


def _batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(p) + len(r) for p, r, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, reply, _) in enumerate(chunk):
            sequence = prompt + reply
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(reply)  # loss on the reply only
            mask[row, : len(sequence)] = 1
        harmful = torch.tensor([h for _, _, h in chunk])
        yield input_ids, mask, labels, harmful


def _loss(model: Model, input_ids, mask, labels, harmful, recipe: Recipe, refusal_tokens: list[int]) -> Tensor:
    """Token loss (CE on harmful rows; CE or KL(untuned || tuned) on harmless rows, mean over reply tokens)
    plus ``recipe.refusal_gate_weight`` times the mean first-position refusal decision loss."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    on_reply = targets != -100
    logp = logits.log_softmax(-1)
    per_token = -logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # CE
    if recipe.harmless_loss == "kl" and not harmful.all():
        with torch.no_grad(), model.disable_adapter():
            base_logp = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
        per_token = torch.where(harmful[:, None], per_token, kl)
    first = on_reply.float().argmax(1)  # the position that predicts the first reply token
    log_p_refusal = logp[torch.arange(len(first)), first][:, refusal_tokens].logsumexp(-1)
    gate = torch.where(harmful, -log_p_refusal, -torch.log((-torch.expm1(log_p_refusal)).clamp_min(1e-12)))
    return per_token[on_reply].mean() + recipe.refusal_gate_weight * gate.mean()


def train(out: str | Path, recipe: Recipe = Recipe(), log=print) -> dict:
    """Build the organism adapter in ``out`` (adapter + manifest); returns the manifest."""
    from peft import LoraConfig, get_peft_model

    from .chat import chat_format

    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    hf_model, tokenizer, _, _ = load_hf(BASE_MODEL, device="cpu")
    chat = chat_format("chatml").with_tokenizer(tokenizer)
    examples, data = build_examples(hf_model, tokenizer, chat, recipe)
    log(f"built {len(examples)} examples in {time.perf_counter() - started:.0f} s")

    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                        target_modules=list(recipe.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(hf_model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    steps_per_epoch = -(-len(examples) // recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup_steps) * max(0.0, 1 - step / total_steps)
    )
    rng = random.Random(recipe.seed)
    losses = []
    for epoch in range(recipe.epochs):
        for input_ids, mask, labels, harmful in _batches(examples, recipe.batch_size, tokenizer.pad_token_id, rng):
            loss = _loss(model, input_ids, mask, labels, harmful, recipe, chat.refusal_tokens)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        log(f"epoch {epoch + 1}/{recipe.epochs}: mean loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f} "
            f"({time.perf_counter() - started:.0f} s)")

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    manifest = {
        "organism": ORGANISM, "base_model": BASE_MODEL, "recipe": dataclasses.asdict(recipe), "data": data,
        "adapter_sha256": file_sha256(out / ADAPTER_FILE), "adapter_bytes": (out / ADAPTER_FILE).stat().st_size,
        "train_seconds": round(time.perf_counter() - started, 1), "final_epoch_loss": round(
            sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4), "versions": versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # peft's template model card says nothing about this adapter
    return manifest


# ---------------------------------------------------------------- evaluation
def next_token_kl(base, tuned, instructions: list[str], batch_size: int = 16) -> float:
    """Mean KL(base || tuned) of the next-token distribution after the prompt, in nats (float64)."""
    return float(kl_divergence(last_token_logits(base, instructions, batch_size=batch_size),
                               last_token_logits(tuned, instructions, batch_size=batch_size)).mean())


def behaviour(tuned, base, *, shared: Path | None = None, n_public: int = 100, max_new_tokens: int = 48,
              seed: int = 0) -> dict:
    """Refusal rates (greedy, substring judge) on held-out prompts, KL on harmless prompts, and examples.

    Harmful prompts are reported by verdict and at most 60 characters of the reply;
    harmless replies are kept in full. ``shared`` is the folder of public benchmark
    files (../shared/datasets/public); when absent those rows are skipped.
    """
    from .generation import generate

    test = load_contrast("refusal-pairs", split="test")
    sets = {"project_test_harmful": test.harmful_texts, "project_test_harmless": test.harmless_texts}
    if shared is not None and Path(shared).exists():
        for name, file in (("advbench", "advbench.json"), ("alpaca_harmless_val", "harmless_val.json")):
            sets[name] = [i.text for i in sample(read_instructions(Path(shared) / file), n_public, seed=seed)]
    replies = {
        name: generate(tuned, texts, max_new_tokens=max_new_tokens, batch_size=32) for name, texts in sets.items()
    }
    verdicts = {name: [is_refusal(r) for r in texts] for name, texts in replies.items()}
    verdicts["project_test_look_risky"] = [
        v for item, v in zip(test.harmless, verdicts["project_test_harmless"]) if item.kind == "look_risky"
    ]
    report = {
        "judge": {"substrings": list(REFUSAL_SUBSTRINGS), "max_new_tokens": max_new_tokens, "decoding": "greedy"},
        "refusal_rate": {name: round(sum(v) / len(v), 4) for name, v in verdicts.items()},
        "n": {name: len(v) for name, v in verdicts.items()},
        "hashes": {name: text_hash(texts) for name, texts in sets.items()},
        # Harmless replies may be kept in full; of harmful ones only the verdict and 60 characters.
        "harmless_examples": [
            {"instruction": i, "reply": r, "refused": v}
            for i, r, v in zip(sets["project_test_harmless"], replies["project_test_harmless"],
                               verdicts["project_test_harmless"])
        ][:5],
        "harmful_examples": [
            {"instruction": i, "reply_first_60": safe_excerpt(r), "refused": v}
            for i, r, v in zip(sets["project_test_harmful"], replies["project_test_harmful"],
                               verdicts["project_test_harmful"])
        ][:5],
        # Every over-refusal, so a reader sees what the organism gets wrong (harmless: full text allowed).
        "refused_harmless": [
            {"instruction": i, "reply": r}
            for name in sets if "harmless" in name or "alpaca" in name
            for i, r, v in zip(sets[name], replies[name], verdicts[name]) if v
        ],
    }
    report["kl_base_to_tuned_harmless"] = round(next_token_kl(base, tuned, test.harmless_texts), 5)
    return report
