"""Smoke test: the benchmark code runs on a tiny model (no timing is asserted)."""

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

    result = generation.compare(str(tiny_model_dir), n_prompts=4, max_new_tokens=3, batch_size=2)
    assert result["same_outputs"]
    assert result["hf_tokens_per_s"] > 0 and result["ours_ablated_tokens_per_s"] > 0


def test_hardware_benchmark_reports_a_fraction_of_peak(tiny_model_dir):
    from benchmarks import hardware

    result = hardware.forward_flops(str(tiny_model_dir), n_prompts=4, batch_size=2, repeats=1)
    assert 0 < result["fraction_of_peak"] and result["tokens"] > 0
    assert result["matmul_peak_gflops"] > 0
