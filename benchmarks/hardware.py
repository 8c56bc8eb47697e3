"""Against the hardware: achieved forward-pass FLOP/s as a fraction of the measured matmul rate.

Peak: the best of several timed ``n x n`` matmuls (``2 n^3`` FLOP each) in this
process, in the model's dtype on its device: float32 ``2048 x 2048`` with the
same thread count on CPU, ``8192 x 8192`` on a GPU. Forward pass: ``rl``
model forward on a batch of prompts, counted as ``2 x parameters x tokens``
FLOP (attention's sequence-length term is ignored: small at these lengths).
"""

from __future__ import annotations

import time

import torch

from .extraction import synthetic_prompts
from .models import synchronize


def matmul_flops(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def forward_flops(model_spec: str = "smollm2-135m-instruct", n_prompts: int = 32, batch_size: int = 16,
                  repeats: int = 3, device: str = "cpu", dtype: str | None = None) -> dict:
    import refusal_lens as rl

    model = rl.load_model(model_spec, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.original_model.parameters())
    batches = [model.chat.tokenize(synthetic_prompts(n_prompts)[s : s + batch_size]).to(device)
               for s in range(0, n_prompts, batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # real tokens; padding is not counted as work
    with torch.no_grad():
        model(batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            for b in batches:
                model(b["input_ids"], attention_mask=b["attention_mask"])
            synchronize(device)
            best = min(best, time.perf_counter() - started)
    achieved = 2 * n_params * tokens / best
    on_gpu = device.startswith("cuda")
    peak = matmul_flops(n=8192 if on_gpu else 2048, device=device, dtype=model.cfg.dtype)
    return {"model": model_spec, "device": device, "dtype": model.info.dtype,
            "parameters": n_params, "tokens": tokens, "seconds": best,
            "achieved_gflops": achieved / 1e9, "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": achieved / peak,
            "threads": torch.get_num_threads()}


def selection_share_of_peak(model_spec: str = "smollm2-135m-refusal", *, full_table: bool = False,
                            device: str = "cpu", dtype: str | None = None, **overrides) -> dict:
    """The main job's selection step (its data, filter, candidates and rule: ``RunConfig()`` with the lowest-KL
    fallback of ``make run``) timed, and its matrix FLOPs counted from the executed ops' shapes
    (``torch.utils.flop_counter.FlopCounterMode`` on a second, identical run), against the matmul peak.

    Returns seconds, counted FLOPs, achieved GFLOP/s, the peak and the fraction; ``full_table=True`` scores every
    candidate (the figure's table) instead of what the pick needs. ``overrides``: further ``RunConfig`` fields.
    """
    from torch.utils.flop_counter import FlopCounterMode

    import refusal_lens as rl
    from refusal_lens import pipeline

    model = rl.load_model(model_spec, device=device, dtype=dtype)
    config = pipeline.RunConfig(**{"fallback": "lowest-kl", "full_selection_table": full_table, **overrides})
    data = pipeline.load_data(model, config)
    candidates = pipeline.extract(model, data, config)
    synchronize(device)
    started = time.perf_counter()
    choice = pipeline.choose_direction(model, candidates, data, config)
    synchronize(device)
    seconds = time.perf_counter() - started
    counter = FlopCounterMode(display=False)
    with counter:
        again = pipeline.choose_direction(model, candidates, data, config)
    assert again.selected == choice.selected, "the counted run must do the same work as the timed one"
    flops = counter.get_total_flops()
    peak = matmul_flops(n=8192 if device.startswith("cuda") else 2048, device=device, dtype=model.cfg.dtype)
    table = choice.selection.table
    return {"model": model_spec, "device": device, "dtype": model.info.dtype, "full_table": full_table,
            "candidates": int(table.scored.size), "scores": {k: int(table[k].notna().sum()) for k in
                                                              ("bypass", "induce", "kl")},
            "seconds": seconds, "flops": flops, "achieved_gflops": flops / seconds / 1e9,
            "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": flops / seconds / peak,
            "threads": torch.get_num_threads(), "pick": [choice.position, choice.layer]}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.hardware``: the selection step's share of the matmul peak (lazy, then full table)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="smollm2-135m-refusal")
    parser.add_argument("--full-table", action="store_true", help="also measure the full table")
    args = parser.parse_args(argv)
    for full in (False, True) if args.full_table else (False,):
        result = selection_share_of_peak(args.model, full_table=full)
        print(json.dumps(result, indent=2))
        print(f"selection ({'full table' if full else 'what the pick needs'}): {result['seconds']:.0f} s, "
              f"{result['flops'] / 1e12:.2f} TFLOP counted, {result['achieved_gflops']:.1f} GFLOP/s = "
              f"{result['fraction_of_peak']:.1%} of the {result['matmul_peak_gflops']:.1f} GFLOP/s matmul peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
