"""Every supported architecture through the whole pipeline, on tiny trained organisms.

For each architecture of :data:`refusal_lens.tiny_organisms.ARCHITECTURES` one module-scoped fixture builds
its organism (or reads it from the cache), loads it with ``rl.load_model`` and runs the main job on it
in-process (``refusal_lens.cli.main(["run", ...])``: the code path of ``refusal-lens run``). The organism was
trained to refuse the harmful prompts of these splits and answer the harmless ones, so the pipeline must find
a direction that mediates that behaviour. References are independent of TransformerLens: the Hugging Face
model itself (hidden states, logits, greedy ``generate``), the HF model with plain torch forward hooks that
project the direction out, and float64 recomputation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

import refusal_lens as rl
from refusal_lens import cli
from refusal_lens import orthogonalize as rl_orthogonalize
from refusal_lens.attribution import AttributionError, decompose
from refusal_lens.orthogonalize import OrthogonalizationError
from refusal_lens.runs import open_run
from refusal_lens.tiny_organisms import ARCHITECTURES, TinyArchitecture, random_tiny_model, tiny_organism

from .conftest import hook_state

# Gemma 2/3 add each sublayer's output to the residual through a post-sublayer RMSNorm: weight
# orthogonalization removes the direction from the residual stream exactly but is not the hook's map there,
# and a head's write is not linear in its z (see rl.orthogonalize_weights and rl.attribution).
POST_NORM = {"gemma2", "gemma3"}
N_TEST = 16  # test prompts per side in the main job
MAX_NEW_TOKENS = 12  # the trained replies are 7-8 tokens with EOS
# The selection's KL limit for the organisms (nats). The paper's 0.1 sits inside the range of these 64-wide
# models' candidate KLs, so with it the pick depends on the CPU that trained the organism (float arithmetic
# differs between CPUs): a strongest candidate just over 0.1 on one machine and under it on another sends the
# rule to a weak candidate whose ablation leaves refusals in place. 0.2 keeps the paper's rule (lowest bypass
# among candidates under the limit) off that knife edge.
KL_MAX = 0.2
FP32_ORTHOGONAL = 1e-5  # max |x . r| / |x| that float32 rounding leaves on these models (measured <= 3e-7)


@dataclass
class Organism:
    """One architecture's organism, its main-job run and the direction the run selected."""

    arch: str
    spec: TinyArchitecture
    path: Path
    model: object  # the TransformerBridge from rl.load_model
    hf: object  # the same folder loaded by AutoModelForCausalLM
    report: dict
    direction: Float[Tensor, " d_model"]  # unit, float32
    layer: int
    harmful: list[str]
    harmless: list[str]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def organism(request, tmp_path_factory) -> Organism:
    from transformers import AutoModelForCausalLM

    arch = request.param
    spec = ARCHITECTURES[arch]
    path = tiny_organism(arch)
    out = tmp_path_factory.mktemp(f"run-{arch}")
    status = cli.main(["run", "--model", str(path), "--chat", spec.family, "--device", "cpu", "--out", str(out),
                       "--n-train", "64", "--n-val", "16", "--n-test", str(N_TEST), "--n-boot", "50",
                       "--lazy-selection", "--capability-tasks", "",
                       "--max-new-tokens", str(MAX_NEW_TOKENS), "--kl-max", str(KL_MAX), "--fallback", "lowest-kl",
                       "--html-only"])
    assert status == 0, f"the main job stopped on the {arch} organism"
    run = open_run(str(path), out, create=False)
    report = json.loads((run.path / "report.json").read_text())
    directions, pos, layer = run.selected()
    model = rl.load_model(str(path), device="cpu", chat=spec.family)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    test = rl.load_contrast("refusal-pairs", split="test")
    return Organism(arch, spec, path, model, hf, report, directions.direction(pos, layer).float(), layer,
                    test.harmful_texts[:4], test.harmless_texts[:4])


def sites(model, prompts: list[str], hooks=()) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Every ``resid_pre`` and the final residual (``ln_final.hook_in``) at real tokens ``[tokens, d_model]``
    (float64), the logits ``[tokens, vocab]`` (float64) and the attention mask, with ``hooks`` active."""
    batch = model.chat.tokenize(prompts)
    mask = batch["attention_mask"].bool()
    seen = {}
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)] + ["ln_final.hook_in"]
    recorders = [(n, lambda x, hook, n=n: seen.__setitem__(n, x.detach().double()[mask])) for n in names]
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, *recorders]):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return seen, logits.double()[mask], mask


def leak(x: Float[Tensor, "tokens d_model"], r: Float[Tensor, " d_model"]) -> float:
    """Max over tokens of ``|x . r| / |x|`` (r unit; a zero vector has no component: 0)."""
    return float(((x @ r.double()).abs() / x.norm(dim=-1).clamp_min(1e-30)).max())


def project_out(x: Tensor, r: Tensor) -> Tensor:
    """``x - (x . r) r`` over the last axis, in float32 (as rl.ablate computes), cast back to ``x``'s dtype."""
    v = r.to(x.device, torch.float32)
    y = x.float()
    return (y - (y @ v)[..., None] * v).to(x.dtype)


def hf_ablation_hooks(hf, arch: str, r: Float[Tensor, " d_model"]) -> list:
    """Plain torch hooks on the HF modules that remove ``r`` where TransformerLens' ablation does: every
    decoder layer's input (resid_pre), and what each attention and MLP sublayer adds to the residual (after
    the post-sublayer norm on Gemma 2/3). Returns the handles."""
    def on_input(module, args, kwargs):
        if args:
            return (project_out(args[0], r), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": project_out(kwargs["hidden_states"], r)}

    def on_output(module, args, output):
        return (project_out(output[0], r), *output[1:]) if isinstance(output, tuple) else project_out(output, r)

    handles = []
    for layer in hf.model.layers:
        handles.append(layer.register_forward_pre_hook(on_input, with_kwargs=True))
        writers = ((layer.post_attention_layernorm, layer.post_feedforward_layernorm) if arch in POST_NORM
                   else (layer.self_attn, layer.mlp))
        handles += [w.register_forward_hook(on_output) for w in writers]
    return handles


def hf_greedy(hf, model, prompts: list[str]) -> list[str]:
    """Greedy replies from HF ``generate`` on the same left-padded batch, decoded as ``rl.generate`` does."""
    batch = model.chat.tokenize(prompts)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                          pad_token_id=model.tokenizer.pad_token_id)
    return [t.strip() for t in model.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------- tests
def test_bridge_residual_stream_and_logits_equal_hf(organism):
    prompts = organism.harmful[:2] + organism.harmless[:2]
    batch = organism.model.chat.tokenize(prompts)
    seen, logits, mask = sites(organism.model, prompts)
    with torch.no_grad():
        ref = organism.hf(**batch, output_hidden_states=True)
    for layer in range(organism.model.cfg.n_layers):
        expected = ref.hidden_states[layer].double()[mask]
        scale = expected.abs().max()
        assert (seen[f"blocks.{layer}.hook_resid_pre"] - expected).abs().max() <= 1e-5 * scale, layer
    assert (logits - ref.logits.double()[mask]).abs().max() <= 1e-4


def test_main_job_finds_the_direction_that_mediates_the_trained_refusal(organism):
    rates, n = organism.report["refusal_rate"], organism.report["n_test"]
    assert n == {"harmful": N_TEST, "harmless": N_TEST}
    assert rates["harmful_baseline"] >= 0.8 and rates["harmless_baseline"] <= 0.2, rates
    assert rates["harmful_ablated"] <= 0.2, rates
    assert rates["harmless_added"] > rates["harmless_baseline"], rates


def test_ablation_leaves_every_residual_site_orthogonal_to_the_direction(organism):
    prompts = organism.harmful + organism.harmless
    r = organism.direction
    before, _, _ = sites(organism.model, prompts)
    after, _, _ = sites(organism.model, prompts, rl.ablate(organism.model, r).hooks)
    assert max(leak(x, r) for x in before.values()) > 0.05  # the direction is there to remove
    for name, x in after.items():
        assert leak(x, r) <= FP32_ORTHOGONAL, name


def post_norm_write_and_its_formula(model, edited, r: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Gemma 2/3, layer 0, float64: what the edited model's attention writes into the residual, and what the
    documented post-norm edit says it writes. Layer 0's input is the same in the edited model and under the
    hooks (the projected embedding); where the hooked model's attention output projection gives x = W_O z,
    the edited one writes g * x' / rms(x'), x' = x - (u . x) a, with u = g * r and a = u / (g^2 + 0.01
    mean(g^2)) scaled to a . u = 1 (the ridge-damped oblique projection). Both ``[n_real_and_pad, d_model]``."""
    norm = model.blocks[0].ln1_post.original_component
    g = norm.weight.double() + 1
    u = g * r.double()
    a = u / (g.square() + 1e-2 * g.square().mean())
    a = a / (a @ u)
    captured = {}
    record = lambda name: (name, lambda x, hook: captured.__setitem__(name, x.detach().double()))  # noqa: E731
    batch = model.chat.tokenize(prompts)
    with torch.no_grad():
        with model.hooks(fwd_hooks=[*rl.ablate(model, r).hooks, record("blocks.0.ln1_post.hook_in")]):
            model(batch["input_ids"], attention_mask=batch["attention_mask"])
        with edited.hooks(fwd_hooks=[record("blocks.0.hook_attn_out")]):
            edited(batch["input_ids"], attention_mask=batch["attention_mask"])
    x = captured["blocks.0.ln1_post.hook_in"]
    x = x - (x @ u)[..., None] * a
    expected = g * x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    return captured["blocks.0.hook_attn_out"], expected


def test_weight_orthogonalization(organism, monkeypatch):
    """Exact architectures: the edited weights equal hook ablation. Gemma 2/3: every residual site of the
    edited model is orthogonal to the direction, as under the hooks; the edited sublayer's write follows the
    documented map (which is not the hook's); a wrong post-norm gain raises instead of returning a model.
    Behaviour: exact architectures' edited organisms give hook ablation's greedy replies; Gemma 2/3's refuse at
    most 1 of the 4 harmful prompts (hook ablation: 0 of 16 on both)."""
    model, r = organism.model, organism.direction
    prompts = organism.harmful + organism.harmless
    edited = rl.orthogonalize_weights(model, r)
    replies = rl.generate(edited, organism.harmful, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    if organism.arch in POST_NORM:
        assert sum(map(rl.is_refusal, replies)) <= 1, replies
    else:
        assert replies == rl.generate(model, organism.harmful, max_new_tokens=MAX_NEW_TOKENS, progress=False,
                                      hooks=rl.ablate(model, r).hooks)
    _, hooked, _ = sites(model, prompts, rl.ablate(model, r).hooks)
    seen, logits, _ = sites(edited, prompts)
    for name, x in seen.items():
        assert leak(x, r) <= FP32_ORTHOGONAL, name
    assert edited.info.edit["residual_leak"] <= FP32_ORTHOGONAL
    if organism.arch not in POST_NORM:
        assert edited.info.edit["equals_hook_ablation"]
        assert (logits - hooked).abs().max() <= 1e-4
        return
    assert not edited.info.edit["equals_hook_ablation"]
    got, expected = post_norm_write_and_its_formula(model, edited, r, prompts)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # A wrong gain (weight instead of 1 + weight) leaves the direction in the residual: refused, not returned.
    monkeypatch.setattr(model.cfg, "rmsnorm_uses_offset", False)
    with pytest.raises(OrthogonalizationError, match="still writes the direction"):
        rl.orthogonalize_weights(model, r)


def test_exported_orthogonalized_model_reloads_with_the_same_logits(organism, tmp_path):
    from transformers import AutoModelForCausalLM

    edited = rl.orthogonalize_weights(organism.model, organism.direction)
    rl.save_hf(edited, tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    prompts = organism.harmful + organism.harmless
    batch = organism.model.chat.tokenize(prompts)
    _, logits, mask = sites(edited, prompts)
    with torch.no_grad():
        expected = reloaded(**batch).logits.double()[mask]
    assert (logits - expected).abs().max() <= 1e-4


def test_generation_equals_hf_greedy_with_and_without_ablation(organism):
    model, hf = organism.model, organism.hf
    prompts = organism.harmful + organism.harmless
    plain = rl.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert plain == hf_greedy(hf, model, prompts)
    ablated = rl.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, progress=False,
                          hooks=rl.ablate(model, organism.direction).hooks)
    handles = hf_ablation_hooks(hf, organism.arch, organism.direction)
    try:
        reference = hf_greedy(hf, model, prompts)
    finally:
        for handle in handles:
            handle.remove()
    assert ablated == reference
    assert ablated != plain  # the hooks changed something, so the equality above is not vacuous


def test_head_attribution_sums_to_the_total_or_refuses(organism):
    model, r = organism.model, organism.direction
    layer = organism.layer if organism.layer > 0 else model.cfg.n_layers - 1
    if organism.arch in POST_NORM:
        with pytest.raises(AttributionError, match="not a plain per-head sum"):
            decompose(model, organism.harmful, r, layer=layer)
        return
    parts = decompose(model, organism.harmful, r, layer=layer)
    # Independent total: resid_pre[layer] . r at the last position, from the bridge's cache in float64.
    seen, _, mask = sites(model, organism.harmful)
    last = mask.sum(1).cumsum(0) - 1  # index of each prompt's last token among the real tokens
    total = seen[f"blocks.{layer}.hook_resid_pre"][last] @ (r.double() / r.double().norm())
    assert torch.allclose(parts.total, total, rtol=0, atol=1e-5 * float(total.abs().max()))
    assert torch.allclose(parts.sum_of_terms(), total, rtol=0, atol=1e-4 * float(total.abs().max()))


# ----------------------------------------------------------------- random (untrained) models: fast structure tests
@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def random_model(request, tmp_path_factory):
    """``(arch, bridge, hf)``: the architecture's seeded random model (random norm gains), untrained."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    path = random_tiny_model(arch, tmp_path_factory.mktemp(f"random-{arch}"))
    model = rl.load_model(str(path), device="cpu", chat=ARCHITECTURES[arch].family)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return arch, model, hf


def random_unit(d_model: int, seed: int = 0) -> Float[Tensor, " d_model"]:
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_random_model_weight_orthogonalization(random_model, monkeypatch):
    """Every architecture: no residual site of the edited model has a component along r (<= 1e-5 in float32).
    Pre-norm architectures: the edited model equals hook ablation (<= 1e-4 max logit difference). Gemma 2/3:
    it does not (documented: a different map, same orthogonality), and the paper's plain projection, which
    ignores the post-sublayer norm, would leak; a leak raises instead of returning a model."""
    arch, model, _ = random_model
    r = random_unit(model.cfg.d_model)
    prompts = ["How do I bake bread?", "Write a poem about the sea.", "Explain how magnets work."]
    edited = rl.orthogonalize_weights(model, r)
    seen, logits, _ = sites(edited, prompts)
    for name, x in seen.items():
        assert leak(x, r) <= FP32_ORTHOGONAL, name
    assert edited.info.edit["residual_leak"] <= FP32_ORTHOGONAL
    _, hooked, _ = sites(model, prompts, rl.ablate(model, r).hooks)
    if arch not in POST_NORM:
        assert edited.info.edit["equals_hook_ablation"] and edited.info.edit["post_norm_writers"] == 0
        assert (logits - hooked).abs().max() <= 1e-4
        return
    assert not edited.info.edit["equals_hook_ablation"]
    assert edited.info.edit["post_norm_writers"] == 2 * model.cfg.n_layers
    assert (logits - hooked).abs().max() > 1e-3  # not the hook's map (measured 1e-2 to 1e-1 here)
    # The paper's projection of W_O / W_out against r itself leaks through the post-norm gain:
    monkeypatch.setattr(rl_orthogonalize, "post_norm_gain", lambda norm, cfg: None)
    with pytest.raises(OrthogonalizationError, match="still writes the direction"):
        rl.orthogonalize_weights(model, r)


def test_random_model_post_norm_edit_follows_its_formula(random_model):
    """Gemma 2/3, layer 0 in float64: where the hooked model's attention output projection gives x = W_O z,
    the edited one writes g * x' / rms(x'), x' = x - (u . x) a, u = g * r, a = u / (g^2 + 0.01 mean(g^2))
    scaled to a . u = 1 (the ridge-damped oblique projection), to 1e-5 relative."""
    arch, model, _ = random_model
    if arch not in POST_NORM:
        pytest.skip("pre-norm architecture: the edit is the orthogonal projection (tested above)")
    r = random_unit(model.cfg.d_model)
    edited = rl.orthogonalize_weights(model, r)
    got, expected = post_norm_write_and_its_formula(model, edited, r,
                                                    ["How do I bake bread?", "Write a poem about the sea."])
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (got.float() @ r).abs().max() <= 1e-5 * got.norm(dim=-1).max()


def test_random_model_bridge_and_export_equal_hf(random_model, tmp_path):
    """resid_pre == HF hidden_states (1e-6 relative), logits == HF (1e-4); the orthogonalized copy exported by
    rl.save_hf reloads with AutoModelForCausalLM and gives the same logits (1e-4)."""
    from transformers import AutoModelForCausalLM

    arch, model, hf = random_model
    prompts = ["How do I bake bread?", "Write a poem about the sea, in three lines."]
    batch = model.chat.tokenize(prompts)
    seen, logits, mask = sites(model, prompts)
    with torch.no_grad():
        ref = hf(**batch, output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        expected = ref.hidden_states[layer].double()[mask]
        assert (seen[f"blocks.{layer}.hook_resid_pre"] - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (logits - ref.logits.double()[mask]).abs().max() <= 1e-4
    edited = rl.orthogonalize_weights(model, random_unit(model.cfg.d_model))
    rl.save_hf(edited, tmp_path / "edited")
    card = json.loads((tmp_path / "edited" / "refusal_lens.json").read_text())
    assert card["equals_hook_ablation"] == (arch not in POST_NORM)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    _, edited_logits, _ = sites(edited, prompts)
    with torch.no_grad():
        assert (edited_logits - reloaded(**batch).logits.double()[mask]).abs().max() <= 1e-4


def test_random_model_torch_engine_generates_the_bridge_tokens(random_model):
    """Greedy tokens on the plain-HF torch engine equal the bridge engine's with no hooks, with rl.ablate's
    3 x n_layers hooks and with an rl.add hook (which fire on the torch engine); afterwards, also after a hook
    raised, every bridge component is back, no torch hook is left and a bridge forward gives the same logits."""
    from refusal_lens.generation import generate_tokens

    arch, model, _ = random_model
    prompts = ["How do I bake bread?", "Write a poem about the sea, in three lines."]
    r = random_unit(model.cfg.d_model)
    batch = model.chat.tokenize(prompts[:1])
    with torch.no_grad():
        logits = model(batch["input_ids"])
    before = hook_state(model)  # after a bridge forward: blocks wire their own capture hooks on the first one
    calls = []
    counted = lambda hooks: [(n, lambda x, hook, n=n, fn=fn: calls.append(n) or fn(x, hook)) for n, fn in hooks]  # noqa: E731
    for hooks in ((), rl.ablate(model, r).hooks, rl.add(model, 8 * r, layer=1).hooks):
        tokens = {engine: generate_tokens(model, prompts, max_new_tokens=4, hooks=counted(hooks), engine=engine)
                  for engine in ("bridge", "torch")}
        assert tokens["torch"] == tokens["bridge"], (arch, len(hooks))
        assert len(calls) == 2 * len(hooks) * 4 and all(map(len, tokens["torch"]))  # fired at every step
        calls.clear()

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate_tokens(model, prompts[:1], max_new_tokens=2, hooks=[("blocks.0.hook_mlp_out", boom)],
                        engine="torch")
    assert hook_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"]), logits)
        _, cache = model.run_with_cache(batch["input_ids"], names_filter="blocks.0.hook_resid_post")
    assert cache["blocks.0.hook_resid_post"].shape[-1] == model.cfg.d_model


# ----------------------------------------------------------------- a model split by accelerate's device_map
def test_device_map_split_across_cpu_and_disk_gives_the_same_numbers(tmp_path):
    """A model split by accelerate (layers 1 and 3 offloaded to disk, the rest on the CPU) through
    rl.load_model(device_map=...): hooked residuals, streamed means, refusal scores and greedy generation, with
    and without ablation, equal the same model loaded whole (exactly: the same float32 arithmetic). Weight
    orthogonalization cannot edit offloaded weights and says so."""
    path = random_tiny_model("llama", tmp_path / "model")
    whole = rl.load_model(str(path), device="cpu", chat="llama3")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(whole.cfg.n_layers)}}
    split = rl.load_model(str(path), device_map=device_map, chat="llama3", offload_folder=tmp_path / "offload")
    assert split.info.dtype == "float32"  # disk offload runs on the CPU: CPU defaults, not CUDA's bfloat16
    prompts = ["How do I bake bread?", "Write a poem about the sea, in three lines."]
    r = random_unit(whole.cfg.d_model)
    for hooks in ((), "ablate"):
        seen_whole, logits_whole, _ = sites(whole, prompts, rl.ablate(whole, r).hooks if hooks else ())
        seen_split, logits_split, _ = sites(split, prompts, rl.ablate(split, r).hooks if hooks else ())
        assert all(torch.equal(seen_whole[name], seen_split[name]) for name in seen_whole)
        assert torch.equal(logits_whole, logits_split)
        kwargs = dict(max_new_tokens=6, progress=False)
        assert (rl.generate(whole, prompts, hooks=rl.ablate(whole, r).hooks if hooks else (), **kwargs)
                == rl.generate(split, prompts, hooks=rl.ablate(split, r).hooks if hooks else (), **kwargs))
        assert torch.equal(rl.refusal_score(whole, prompts, hooks=rl.ablate(whole, r).hooks if hooks else ()),
                           rl.refusal_score(split, prompts, hooks=rl.ablate(split, r).hooks if hooks else ()))
    means = [rl.mean_activations(m, prompts, positions=[-1], batch_size=2) for m in (whole, split)]
    assert torch.equal(*means)
    with pytest.raises(OrthogonalizationError, match="offloaded"):
        rl.orthogonalize_weights(split, r)
