"""Extraction benchmark: streaming ``mean_activations`` vs a naive full-cache baseline.

Each method runs in a fresh subprocess so that its peak memory is its own.
Reported per method: wall seconds, prompts per second, and the peak memory
above the level right after loading the model (the memory the method itself
needs): resident memory (RSS) on CPU, the CUDA allocator's peak on a GPU. The
headline is the ratio streaming / naive, measured in the same run.

Baseline (how extraction is often written): ``run_with_cache`` with the full
cache for each batch, index the end-of-instruction positions at every layer's
``resid_pre``, keep those per-prompt tensors, average at the end. A third
method, streaming with the prompts in their given order (``sort_by_length=False``),
shows how much of the gain is the length-sorted batching.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

TOPICS = ["rivers", "bread", "chess", "volcanoes", "jazz", "bees", "bridges", "tea", "comets", "glass"]


def synthetic_prompts(n: int, words: int | None = None) -> list[str]:
    """``n`` distinct harmless prompts; lengths vary unless ``words`` fixes the filler length."""
    prompts = []
    for i in range(n):
        filler = " ".join(["detail"] * (words if words is not None else 3 + (i * 7) % 29))
        prompts.append(f"Request {i}: explain {TOPICS[i % len(TOPICS)]} to a curious reader, with {filler}.")
    return prompts


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _naive_mean(model, prompts: list[str], batch_size: int) -> torch.Tensor:
    n_eoi, n_layers, device = len(model.chat.eoi_tokens), model.cfg.n_layers, model.cfg.device
    kept = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = model.chat.tokenize(prompts[start : start + batch_size])
            _, cache = model.run_with_cache(
                batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            kept.append(torch.stack([cache[f"blocks.{l}.hook_resid_pre"][:, -n_eoi:] for l in range(n_layers)], dim=2))
            del cache
    return torch.cat(kept).double().mean(0)


class _PeakMemory:
    """Peak memory above a baseline, in MB: the process's RSS on CPU, the CUDA allocator's on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.measure = "CUDA allocator peak" if self.cuda else "peak RSS"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
        else:  # RSS peaks cannot be reset: the warm-up keeps other methods' peaks out of the baseline
            self.baseline = _peak_rss_mb()

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else _peak_rss_mb()


def worker(method: str, model_spec: str, n_prompts: int, batch_size: int, words: int | None, repeats: int = 1,
           device: str = "cpu", dtype: str | None = None) -> dict:
    """Run one method in this process and report time (the best of ``repeats`` runs) and memory."""
    import refusal_lens as rl

    from .models import synchronize

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model = rl.load_model(model_spec, device=device, dtype=dtype)
    prompts = synthetic_prompts(n_prompts, words)
    methods = {
        "streaming": lambda ps, bs: rl.mean_activations(model, ps, batch_size=bs, progress=False),
        "streaming-unsorted": lambda ps, bs: rl.mean_activations(model, ps, batch_size=bs, progress=False,
                                                                 sort_by_length=False),
        "naive": lambda ps, bs: _naive_mean(model, ps, bs),
    }
    run = methods[method]
    run(prompts[:1], 1)  # warm-up with this method only, so the baseline holds no other method's peak
    memory = _PeakMemory(device)
    memory.start()
    all_seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        mean = run(prompts, batch_size)
        synchronize(device)
        all_seconds.append(time.perf_counter() - started)
    seconds, peak_mb = min(all_seconds), memory.peak()
    n_tokens = int(model.chat.tokenize(prompts)["attention_mask"].sum())
    return {
        "method": method,
        "n_prompts": n_prompts,
        "batch_size": batch_size,
        "seconds": seconds,
        "all_seconds": all_seconds,
        "prompts_per_s": n_prompts / seconds,
        "device": device,
        "dtype": model.info.dtype,
        "memory_measure": memory.measure,
        "peak_mb": peak_mb,
        "extra_mb": peak_mb - memory.baseline,
        "mean_checksum": float(mean.sum()),
        "n_tokens": n_tokens,
    }


def run_in_subprocess(method: str, model_spec: str, n_prompts: int, batch_size: int, words: int | None = None,
                      repeats: int = 1, device: str = "cpu", dtype: str | None = None) -> dict:
    command = [sys.executable, "-m", "benchmarks.extraction", "--worker", method, "--model", model_spec,
               "--n-prompts", str(n_prompts), "--batch-size", str(batch_size), "--repeats", str(repeats),
               "--device", device]
    if words is not None:
        command += ["--words", str(words)]
    if dtype is not None:
        command += ["--dtype", dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model_spec: str, n_prompts: int, batch_size: int, words: int | None = None,
            with_unsorted: bool = False, repeats: int = 1, device: str = "cpu", dtype: str | None = None) -> dict:
    """Streaming and naive on the same prompts (and streaming unsorted if asked); ratios against naive.

    Each method's time is the best of ``repeats`` runs in its process (this machine's timings vary by
    tens of percent from run to run; the best run is the least disturbed one).
    """
    methods = ["streaming", "naive"] + (["streaming-unsorted"] if with_unsorted else [])
    runs = {method: run_in_subprocess(method, model_spec, n_prompts, batch_size, words, repeats, device, dtype)
            for method in methods}
    naive = runs["naive"]
    # Exact in float32 on CPU; GPU kernels may pick other reduction orders for other batch shapes.
    tolerance = 1e-6 if device == "cpu" else 1e-3
    agree = all(abs(run["mean_checksum"] - naive["mean_checksum"]) <= tolerance * max(1.0, abs(naive["mean_checksum"]))
                for run in runs.values())
    result = {
        "model": model_spec, "n_prompts": n_prompts, "batch_size": batch_size, "words": words, "repeats": repeats,
        "device": device,
        **{method.replace("-", "_"): run for method, run in runs.items()},
        "throughput_ratio": runs["streaming"]["prompts_per_s"] / naive["prompts_per_s"],
        "extra_memory_ratio": runs["streaming"]["extra_mb"] / max(naive["extra_mb"], 1e-9),
        "same_mean": agree,
    }
    if with_unsorted:
        result["unsorted_throughput_ratio"] = runs["streaming-unsorted"]["prompts_per_s"] / naive["prompts_per_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["streaming", "streaming-unsorted", "naive"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--words", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the best counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on a GPU")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.n_prompts, args.batch_size, args.words, args.repeats,
                                args.device, args.dtype)))
        return 0
    result = compare(args.model, args.n_prompts, args.batch_size, args.words, with_unsorted=True, repeats=args.repeats,
                     device=args.device, dtype=args.dtype)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
