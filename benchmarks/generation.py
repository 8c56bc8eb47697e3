"""Generation benchmark: ``rl.generate`` (bridge, hooks, batched, KV cache) vs plain Hugging Face ``generate``.

Baseline: the same checkpoint loaded as a plain ``AutoModelForCausalLM`` (no
bridge), the same left-padded batches, greedy, ``model.generate``. Reported:
new tokens per second for the baseline, for ``rl.generate`` with no hooks and
with the 3 x n_layers directional-ablation hooks, and whether the unhooked
outputs are token-identical to the baseline's.
"""

from __future__ import annotations

import time

import torch

from .extraction import synthetic_prompts


def compare(model_spec: str = "smollm2-135m-instruct", n_prompts: int = 32, max_new_tokens: int = 32,
            batch_size: int = 16, device: str = "cpu", dtype: str | None = None) -> dict:
    import refusal_lens as rl
    from refusal_lens.models import load_hf

    from .models import synchronize

    model = rl.load_model(model_spec, device=device, dtype=dtype)
    hf, tokenizer, _, _ = load_hf(model_spec, device=device, dtype=dtype)
    prompts = synthetic_prompts(n_prompts)
    direction = torch.nn.functional.normalize(
        torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), dim=0
    )

    def plain() -> list[str]:
        texts = []
        with torch.no_grad():
            for start in range(0, n_prompts, batch_size):
                batch = model.chat.tokenize(prompts[start : start + batch_size]).to(device)
                out = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                texts += [
                    t.strip()
                    for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                ]
        return texts

    def timed(fn) -> tuple[list[str], float]:
        synchronize(device)
        started = time.perf_counter()
        texts = fn()
        synchronize(device)
        return texts, time.perf_counter() - started

    plain(), rl.generate(model, prompts[:2], max_new_tokens=2)  # warm-up
    reference, t_plain = timed(plain)
    ours, t_ours = timed(lambda: rl.generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                             progress=False))
    _, t_hooked = timed(lambda: rl.generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                            hooks=rl.ablate(model, direction).hooks, progress=False))
    new_tokens = n_prompts * max_new_tokens  # upper bound used for all three: same budget, same denominator
    return {
        "model": model_spec, "device": device, "dtype": model.info.dtype,
        "n_prompts": n_prompts, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "hf_tokens_per_s": new_tokens / t_plain, "ours_tokens_per_s": new_tokens / t_ours,
        "ours_ablated_tokens_per_s": new_tokens / t_hooked,
        "ratio_ours_vs_hf": t_plain / t_ours, "ratio_ablated_vs_hf": t_plain / t_hooked,
        "same_outputs": ours == reference,
    }
