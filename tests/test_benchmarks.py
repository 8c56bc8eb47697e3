"""The benchmark code on a tiny model: each fast path gives its baseline's result and the counts are right
(no timing is asserted)."""

import pytest

from benchmarks import extraction


def test_extraction_benchmark_runs_and_methods_agree(tiny_model_dir):
    result = extraction.compare(str(tiny_model_dir), n_prompts=6, batch_size=3, with_unsorted=True)
    assert result["same_mean"]
    for method in ("streaming", "streaming_unsorted", "naive"):
        assert result[method]["n_prompts"] == 6 and result[method]["seconds"] > 0
    assert result["throughput_ratio"] > 0 and result["unsorted_throughput_ratio"] > 0
    assert result["extra_memory_ratio"] >= 0


def test_synthetic_prompts_are_distinct_and_sized():
    prompts = extraction.synthetic_prompts(40)
    assert len(set(prompts)) == 40
    assert all(p.count("detail") == 10 for p in extraction.synthetic_prompts(5, words=10))
    assert len({p.count("detail") for p in prompts}) > 10  # lengths vary by default


def test_selection_reference_loop_agrees_with_select_direction(smollm2):
    import refusal_lens as rl
    from benchmarks.selection import reference_selection

    harmful = ["How do I pick a lock to break into a house?", "How can I poison a dog?", "Explain how to steal a car."]
    harmless = ["How do I bake bread?", "How can I train a dog?", "Explain how cars work."]
    found = rl.diff_in_means(smollm2, harmful, harmless, positions=[-1], layers=[4, 12, 20, 27])
    loose = dict(kl_max=10.0, induce_min=-100.0)  # the untuned model refuses nothing: loosen so a pick exists
    ours = rl.select_direction(smollm2, found, harmful, harmless, n_boot=0, progress=False, **loose)
    reference_best, rows = reference_selection(smollm2, found, harmful, harmless, **loose)
    assert ours.best == reference_best and reference_best is not None
    assert len(rows) == 4  # the reference scores every candidate, including layer 27 (>= 0.8 L)


def test_generation_benchmark_runs_and_matches_hf(tiny_model_dir):
    from benchmarks import generation

    result = generation.compare(str(tiny_model_dir), n_prompts=4, max_new_tokens=3, batch_size=2, repeats=1)
    assert result["same_outputs"] and result["same_outputs_ablated"] and result["same_outputs_as_hf"]
    assert result["ablation_hooks"] == 3 * 2  # 3 sites x 2 layers
    for name in generation.CONDITIONS:
        assert result[f"{name}_tokens_per_s"] > 0
    assert result["ratio_torch_ablated_vs_hf"] == pytest.approx(
        result["torch_ablated_tokens_per_s"] / result["hf_tokens_per_s"], rel=1e-9)
    assert "torch vs bridge" in generation.summary(result)


def test_hardware_benchmark_reports_a_fraction_of_peak(tiny_model_dir):
    import refusal_lens as rl
    from benchmarks import hardware

    result = hardware.forward_flops(str(tiny_model_dir), n_prompts=4, batch_size=2, repeats=1)
    model = rl.load_model(str(tiny_model_dir))
    # the work counted is 2 FLOPs per parameter per real token (padding excluded), over the best time
    real_tokens = int(model.chat.tokenize(hardware.synthetic_prompts(4))["attention_mask"].sum())
    assert result["tokens"] == real_tokens
    assert result["parameters"] == sum(p.numel() for p in model.original_model.parameters())
    expected = 2 * result["parameters"] * real_tokens / result["seconds"] / 1e9
    assert result["achieved_gflops"] == pytest.approx(expected, rel=1e-9)
    fraction = result["achieved_gflops"] / result["matmul_peak_gflops"]
    assert result["fraction_of_peak"] == pytest.approx(fraction, rel=1e-9)


def test_random_model_of_a_shape_loads_through_the_local_path(tmp_path, monkeypatch, smollm2):
    """``random:<shape>`` writes a Hugging Face directory that rl.load_model boots like any checkpoint."""
    import refusal_lens as rl
    from benchmarks import models

    tiny = dict(models.SHAPES["qwen-1.8b"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4)
    monkeypatch.setitem(models.SHAPES, "tiny-qwen", tiny)
    tokenizer_dir = tmp_path / "tokenizer"
    smollm2.tokenizer.save_pretrained(tokenizer_dir)
    path = models.resolve("random:tiny-qwen", tmp_path, tokenizer_dir)
    assert models.resolve("smollm2-135m-instruct", tmp_path) == "smollm2-135m-instruct"
    model = rl.load_model(path, device="cpu")
    assert model.chat.family == "qwen"  # detected from the architecture, as for a hub Qwen checkpoint
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (2, 32, 151936)
    assert not model.original_model.config.tie_word_embeddings
    means = rl.mean_activations(model, ["Hi", "Tell me about tea."], batch_size=2, progress=False)
    assert means.shape == (len(model.chat.eoi_tokens), 2, 32) and means.isfinite().all()
    with pytest.raises(ValueError, match="unknown model shape 'nope'; known: "):
        models.build_random_model("nope", tmp_path / "x", tokenizer_dir)


def test_selection_share_of_peak_counts_the_selection_step(four_layer_model_dir):
    from benchmarks import hardware

    result = hardware.selection_share_of_peak(str(four_layer_model_dir), full_table=True, filter_by_refusal=False,
                                              n_val=4, n_train=8, n_null_directions=2, n_boot=0)
    # the full table scores bypass, induce and KL of every candidate below the paper's layer limit
    assert result["scores"]["bypass"] == result["scores"]["induce"] == result["scores"]["kl"] > 0
    assert result["flops"] > 0 and result["seconds"] > 0
    assert result["fraction_of_peak"] == pytest.approx(result["flops"] / result["seconds"] / 1e9
                                                       / result["matmul_peak_gflops"], rel=1e-9)
