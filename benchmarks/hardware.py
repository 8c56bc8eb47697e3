"""Against the hardware: achieved forward-pass FLOP/s as a fraction of the measured matmul rate.

Peak: the best of several timed float32 ``n x n`` matmuls (``2 n^3`` FLOP each)
in this process, with the same thread count. Forward pass: ``rl`` model
forward on a batch of prompts, counted as ``2 x parameters x tokens`` FLOP
(attention's sequence-length term is ignored: small at these lengths).
"""

from __future__ import annotations

import time

import torch

from .extraction import synthetic_prompts


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def forward_flops(model_spec: str = "smollm2-135m-instruct", n_prompts: int = 32, batch_size: int = 16,
                  repeats: int = 3) -> dict:
    import refusal_lens as rl

    model = rl.load_model(model_spec, device="cpu")
    n_params = sum(p.numel() for p in model.original_model.parameters())
    batches = [model.chat.tokenize(synthetic_prompts(n_prompts)[s : s + batch_size]) for s in range(0, n_prompts, batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # real tokens; padding is not counted as work
    with torch.no_grad():
        model(batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for b in batches:
                model(b["input_ids"], attention_mask=b["attention_mask"])
            best = min(best, time.perf_counter() - started)
    achieved = 2 * n_params * tokens / best
    peak = matmul_flops()
    return {"model": model_spec, "parameters": n_params, "tokens": tokens, "seconds": best,
            "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": achieved / peak,
            "threads": torch.get_num_threads()}
