"""Smoke test: the benchmark code runs on a tiny model (no timing is asserted)."""

from benchmarks import extraction


def test_extraction_benchmark_runs_and_methods_agree(tiny_model_dir):
    result = extraction.compare(str(tiny_model_dir), n_prompts=6, batch_size=3)
    assert result["same_mean"]
    for method in ("streaming", "naive"):
        assert result[method]["n_prompts"] == 6 and result[method]["seconds"] > 0
    assert result["throughput_ratio"] > 0 and result["extra_memory_ratio"] >= 0


def test_synthetic_prompts_are_distinct_and_sized():
    prompts = extraction.synthetic_prompts(40)
    assert len(set(prompts)) == 40
    assert all(p.count("detail") == 10 for p in extraction.synthetic_prompts(5, words=10))
    assert len({p.count("detail") for p in prompts}) > 10  # lengths vary by default
