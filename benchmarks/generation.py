"""Generation benchmark: ``rl.generate`` on its two engines vs plain Hugging Face ``generate``.

Baseline: the same checkpoint loaded as a plain ``AutoModelForCausalLM`` (no
bridge), the same left-padded batches, greedy, ``model.generate``. Timed: the
baseline; the bridge engine (``engine="bridge"``: HF ``generate`` on the
bridge-wrapped model, TransformerLens hooks) and the torch engine
(``engine="torch"``: the plain HF modules with the hooks as torch hooks), each
with no hooks and with the 3 x n_layers directional-ablation hooks. Reported:
new tokens per second, each ratio to the baseline, the torch engine's speed-up
over the bridge, and whether the outputs agree (torch vs bridge tokens, with
and without hooks; unhooked tokens vs the baseline's).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .extraction import synthetic_prompts

CONDITIONS = ("hf", "bridge", "bridge_ablated", "torch", "torch_ablated")


def compare(model_spec: str = "smollm2-135m-instruct", n_prompts: int = 32, max_new_tokens: int = 32,
            batch_size: int = 16, device: str = "cpu", dtype: str | None = None, repeats: int = 3) -> dict:
    """Time each of :data:`CONDITIONS` ``repeats`` times, interleaved (the best run counts), on ``n_prompts``
    synthetic prompts; returns tokens/s, ratios and agreement flags (see the module docstring)."""
    import refusal_lens as rl
    from refusal_lens.generation import generate_tokens, strip_padding
    from refusal_lens.models import load_hf

    from .models import synchronize

    model = rl.load_model(model_spec, device=device, dtype=dtype)
    hf, tokenizer, _, _ = load_hf(model_spec, device=device, dtype=dtype)
    prompts = synthetic_prompts(n_prompts)
    direction = torch.nn.functional.normalize(
        torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), dim=0
    )
    ablation = rl.ablate(model, direction).hooks

    def plain(texts: list[str]) -> list[list[int]]:
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = model.chat.tokenize(texts[start : start + batch_size]).to(device)
                out = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                new = out[:, batch["input_ids"].shape[1] :].tolist()
                rows += [strip_padding(row, tokenizer.pad_token_id) for row in new]
        return rows

    def ours(engine: str, hooks) -> Callable[[list[str]], list[list[int]]]:
        return lambda texts: generate_tokens(model, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                             hooks=hooks, engine=engine, progress=False)

    runs = {"hf": plain, "bridge": ours("bridge", ()), "bridge_ablated": ours("bridge", ablation),
            "torch": ours("torch", ()), "torch_ablated": ours("torch", ablation)}
    for run in runs.values():
        run(prompts[:2])  # warm-up
    seconds = dict.fromkeys(CONDITIONS, float("inf"))
    tokens = {}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            started = time.perf_counter()
            tokens[name] = run(prompts)
            synchronize(device)
            seconds[name] = min(seconds[name], time.perf_counter() - started)
    new_tokens = n_prompts * max_new_tokens  # upper bound used for all: same budget, same denominator
    result = {"model": model_spec, "device": device, "dtype": model.info.dtype, "n_prompts": n_prompts,
              "max_new_tokens": max_new_tokens, "batch_size": batch_size, "repeats": repeats,
              "ablation_hooks": len(ablation)}
    for name in CONDITIONS:
        result[f"{name}_tokens_per_s"] = new_tokens / seconds[name]
        if name != "hf":
            result[f"ratio_{name}_vs_hf"] = seconds["hf"] / seconds[name]
    result["speedup_torch_vs_bridge"] = seconds["bridge"] / seconds["torch"]
    result["speedup_torch_vs_bridge_ablated"] = seconds["bridge_ablated"] / seconds["torch_ablated"]
    result["same_outputs"] = tokens["torch"] == tokens["bridge"]
    result["same_outputs_ablated"] = tokens["torch_ablated"] == tokens["bridge_ablated"]
    result["same_outputs_as_hf"] = tokens["torch"] == tokens["hf"] == tokens["bridge"]
    return result


def summary(result: dict) -> str:
    """One line per run for the console."""
    rates = ", ".join(f"{name} {result[f'{name}_tokens_per_s']:.1f}"
                      + ("" if name == "hf" else f" ({result[f'ratio_{name}_vs_hf']:.2f}x)") for name in CONDITIONS)
    return (f"generation ({result['device']}, batch {result['batch_size']}), tokens/s (ratio vs HF): {rates}; "
            f"torch vs bridge {result['speedup_torch_vs_bridge']:.2f}x, ablated "
            f"{result['speedup_torch_vs_bridge_ablated']:.2f}x; same outputs torch/bridge: {result['same_outputs']}, "
            f"ablated: {result['same_outputs_ablated']}, vs HF: {result['same_outputs_as_hf']}")
