"""Direct feature attribution: completeness, a plain-loop reference, and the mean-ablation cross-check."""

import pytest
import torch

import refusal_lens as rl
from refusal_lens.attribution import AttributionError, Decomposition, decompose, mean_ablate_heads

from .conftest import PROMPTS


def unit(d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(d, generator=generator, dtype=torch.float64), dim=0)


def reference_terms(model, prompts, v, layer, position):
    """Per-prompt head terms and total from a full cache, one head at a time."""
    batch = model.chat.tokenize(prompts)
    _, cache = model.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
    d_head = model.cfg.d_head
    heads = torch.zeros(len(prompts), layer, model.cfg.n_heads, dtype=torch.float64)
    for l in range(layer):
        w_o = model.blocks[l].attn.o.original_component.weight.double()  # [d_model, n_heads * d_head]
        for h in range(model.cfg.n_heads):
            z = cache[f"blocks.{l}.attn.hook_z"][:, position, h].double()  # [batch, d_head]
            heads[:, l, h] = (z @ w_o[:, h * d_head : (h + 1) * d_head].T) @ v
    total = cache[f"blocks.{layer}.hook_resid_pre"][:, position].double() @ v
    return heads, total


def test_decomposition_matches_plain_loop_and_is_complete(tiny_model):
    v = unit(64)
    parts = decompose(tiny_model, PROMPTS, v, layer=1, position=-2, batch_size=2)
    heads, total = reference_terms(tiny_model, PROMPTS, v, layer=1, position=-2)
    torch.testing.assert_close(parts.heads, heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total, total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.sum_of_terms(), parts.total, rtol=1e-4, atol=1e-5)


def test_decomposition_is_complete_on_the_organism(refusal_model):
    v = unit(refusal_model.cfg.d_model, seed=1)
    parts = decompose(refusal_model, PROMPTS, v, layer=16, position=-1)
    assert parts.heads.shape == (len(PROMPTS), 16, refusal_model.cfg.n_heads)
    error = (parts.sum_of_terms() - parts.total).abs().max() / parts.total.abs().mean()
    assert error <= 1e-3
    heads, total = reference_terms(refusal_model, PROMPTS[:2], v, layer=16, position=-1)
    torch.testing.assert_close(parts.heads[:2], heads, rtol=1e-4, atol=1e-4)


def test_incomplete_decomposition_is_an_error():
    zeros = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(AttributionError, match="sum to the residual"):
        Decomposition(embed=zeros, heads=torch.zeros(3, 1, 2, dtype=torch.float64),
                      attn_bias=torch.zeros(3, 1, dtype=torch.float64), mlp=torch.zeros(3, 1, dtype=torch.float64),
                      total=torch.ones(3, dtype=torch.float64), layer=1, position=-1)


def test_head_attribution_table(tiny_model):
    v = unit(64)
    table = rl.head_attribution(tiny_model, PROMPTS[:2], v, layer=1, baseline=PROMPTS[1:], n_boot=200)
    assert len(table) == tiny_model.cfg.n_heads
    assert list(table.columns) == ["layer", "head", "harmful", "harmless", "difference", "ci_low", "ci_high"]
    torch.testing.assert_close(
        torch.tensor(table.difference.values), torch.tensor((table.harmful - table.harmless).values)
    )
    assert table.difference.is_monotonic_decreasing
    assert (table.ci_low <= table.difference + 1e-9).all() and (table.difference <= table.ci_high + 1e-9).all()
    expected = decompose(tiny_model, PROMPTS[:2], v, layer=1).heads.mean(0)[0]
    by_head = table.set_index("head").harmful.sort_index()
    torch.testing.assert_close(torch.tensor(by_head.values), expected)


def test_mean_ablation_with_own_mean_changes_nothing_and_unhooks(tiny_model):
    prompt = PROMPTS[:1]
    batch = tiny_model.chat.tokenize(prompt)
    with torch.no_grad():
        before = tiny_model(batch["input_ids"], attention_mask=batch["attention_mask"])
        with mean_ablate_heads(tiny_model, [(0, 1), (1, 2)], prompt):
            same = tiny_model(batch["input_ids"], attention_mask=batch["attention_mask"])
        with mean_ablate_heads(tiny_model, [(0, 1), (1, 2)], PROMPTS[1:]):
            changed = tiny_model(batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(same, before, rtol=1e-5, atol=1e-5)
    assert (changed[0, -1] - before[0, -1]).abs().max() > 1e-4
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())
    with pytest.raises(ValueError, match="do not exist"):
        mean_ablate_heads(tiny_model, [(5, 0)], prompt)


def test_post_norm_architecture_is_refused():
    """Gemma 3 normalizes each sublayer's output before adding it: a per-head split would be inexact."""
    gemma = rl.load_model("gemma-3-270m", device="cpu", chat="gemma3")
    with pytest.raises(AttributionError, match="not a plain per-head sum"):
        decompose(gemma, PROMPTS[:2], unit(gemma.cfg.d_model), layer=4)
