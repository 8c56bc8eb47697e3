"""Generation: equal to Hugging Face greedy decoding, hooks active, nothing left hooked."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import refusal_lens as rl

from .conftest import PROMPTS, hook_state


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


@pytest.mark.parametrize("engine", ["bridge", "torch"])
def test_hooks_fire_during_generation_and_are_removed_after_an_error(tiny_model, engine):
    with torch.no_grad():  # blocks wire their own capture hooks on the first bridge forward
        tiny_model(tiny_model.chat.tokenize(PROMPTS[:1])["input_ids"])
    before, seen = hook_state(tiny_model), []
    rl.generate(
        tiny_model,
        PROMPTS[:2],
        max_new_tokens=3,
        hooks=[("blocks.1.hook_resid_pre", lambda x, hook: seen.append((x.shape[1], hook.name)))],
        engine=engine,
    )
    # the prompt once, then one new position per step (KV cache); fn gets the bridge's HookPoint on both engines
    assert seen[0][0] > 1 and [n for n, _ in seen[1:]] == [1, 1]
    assert {name for _, name in seen} == {tiny_model.blocks[1].hook_resid_pre.name}

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        rl.generate(tiny_model, PROMPTS[:1], max_new_tokens=2, hooks=[("blocks.0.hook_resid_pre", boom)],
                    engine=engine)
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())
    assert hook_state(tiny_model) == before  # also: every bridge component back in place (names and classes)


def test_auto_engine_falls_back_to_the_bridge_for_hooks_already_active(tiny_model):
    """Inside ``with rl.add(...)`` / ``with rl.ablate(...)`` the bridge's hooks must fire: auto takes the bridge,
    torch refuses."""
    from refusal_lens.torch_engine import choose_engine

    r = torch.nn.functional.normalize(torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    steer = rl.add(tiny_model, 200 * r, layer=1)
    kwargs = dict(max_new_tokens=4, batch_size=2)
    plain = rl.generate(tiny_model, PROMPTS[:2], **kwargs)
    steered = rl.generate(tiny_model, PROMPTS[:2], hooks=steer.hooks, engine="bridge", **kwargs)
    assert steered != plain  # so the equality below shows the context's hooks fired
    with steer:
        assert choose_engine(tiny_model, [], "auto") == "bridge"
        assert rl.generate(tiny_model, PROMPTS[:2], **kwargs) == steered
        with pytest.raises(ValueError, match="already active on the bridge"):
            rl.generate(tiny_model, PROMPTS[:2], engine="torch", **kwargs)
    assert choose_engine(tiny_model, steer.hooks, "auto") == "torch"
    ablation = rl.ablate(tiny_model, r)
    with ablation:
        inside = rl.generate(tiny_model, PROMPTS[:2], **kwargs)
    assert inside == rl.generate(tiny_model, PROMPTS[:2], hooks=ablation.hooks, engine="bridge", **kwargs)
    assert rl.generate(tiny_model, PROMPTS[:2], hooks=steer.hooks, **kwargs) == steered


def test_torch_engine_refuses_a_hook_it_cannot_translate(tiny_model, monkeypatch):
    from refusal_lens import torch_engine
    from refusal_lens.torch_engine import UntranslatableHookError, choose_engine

    pattern = [("blocks.0.attn.hook_pattern", lambda x, hook: None)]
    for hooks in (pattern, [("blocks.0.hook_nope", lambda x, hook: None)], [(lambda name: True, print)]):
        with pytest.raises(UntranslatableHookError, match='engine="bridge"'):
            rl.generate(tiny_model, PROMPTS[:1], max_new_tokens=1, hooks=hooks, engine="torch")
    assert choose_engine(tiny_model, pattern, "auto") == "bridge"
    assert choose_engine(tiny_model, [], "auto") == "torch"
    monkeypatch.setattr(torch_engine, "UNWRAP_CHECKED", torch_engine.UNWRAP_CHECKED - {"LinearBridge"})
    assert choose_engine(tiny_model, [], "auto") == "bridge"  # a wrapper the engine was not checked against
    with pytest.raises(ValueError, match=r"not checked against this model's bridge wrappers \(LinearBridge\)"):
        choose_engine(tiny_model, [], "torch")
    with pytest.raises(ValueError, match="engine must be one of"):
        rl.generate(tiny_model, PROMPTS[:1], max_new_tokens=1, engine="fast")


def test_sampling_is_seeded(tiny_model):
    first = rl.generate(tiny_model, PROMPTS[:2], max_new_tokens=5, do_sample=True, seed=3)
    assert first == rl.generate(tiny_model, PROMPTS[:2], max_new_tokens=5, do_sample=True, seed=3)
