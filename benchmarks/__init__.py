"""Benchmarks for refusal_lens: ratios against baselines measured in the same run."""
