"""Loads the task's items from the JSONL file next to this one (lm-eval ``custom_dataset``)."""

from pathlib import Path


def load(**_metadata):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("refusal_lens_mc.jsonl"))})
