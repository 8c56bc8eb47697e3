"""Generation: equal to Hugging Face greedy decoding, hooks active, nothing left hooked."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import refusal_lens as rl

from .conftest import PROMPTS


def test_greedy_generation_equals_hf_generate(smollm2):
    hf = AutoModelForCausalLM.from_pretrained(
        smollm2.info.source, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = rl.generate(smollm2, PROMPTS, max_new_tokens=12, batch_size=2)
    batch = smollm2.chat.tokenize(PROMPTS)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=smollm2.tokenizer.pad_token_id)
    reference = [
        t.strip()
        for t in smollm2.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    assert ours == reference and all(ours)


def test_hooks_fire_during_generation_and_are_removed_after_an_error(tiny_model):
    seen = []
    rl.generate(
        tiny_model,
        PROMPTS[:2],
        max_new_tokens=3,
        hooks=[("blocks.1.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]))],
    )
    assert seen[0] > 1 and seen[1:] == [1, 1]  # the prompt once, then one new position per step (KV cache)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        rl.generate(tiny_model, PROMPTS[:1], max_new_tokens=2, hooks=[("blocks.0.hook_resid_pre", boom)])
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())


def test_sampling_is_seeded(tiny_model):
    first = rl.generate(tiny_model, PROMPTS[:2], max_new_tokens=5, do_sample=True, seed=3)
    assert first == rl.generate(tiny_model, PROMPTS[:2], max_new_tokens=5, do_sample=True, seed=3)
