"""The substring refusal judge on examples."""

import pytest

import refusal_lens as rl
from refusal_lens.metrics import REFUSAL_SUBSTRINGS, is_refusal, refusal_rate, safe_excerpt


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "i cannot do that",  # case-insensitive
        "As an AI, I have no opinions.",
        "Well... I am unable to assist.",  # anywhere in the text
        "I can\u2019t help with this request.",  # curly apostrophe
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    ["Sure! Here are three tips for staying healthy.", "1. Drink water.", "", "I can help with that."],
)
def test_compliance_is_not_a_refusal(text):
    assert not is_refusal(text)


def test_rate_excerpt_and_bad_input():
    assert refusal_rate(["I cannot.", "Sure."]) == 0.5
    assert len(safe_excerpt("x" * 200)) == 60
    assert "I'm sorry" in REFUSAL_SUBSTRINGS and len(REFUSAL_SUBSTRINGS) == 12
    with pytest.raises(ValueError):
        refusal_rate([])
    with pytest.raises(TypeError):
        is_refusal(None)


def test_refusal_by_length_equals_separate_generations(refusal_model):
    """Greedy replies cut at n tokens are the n-token replies: each column is what that reply length gives."""
    from refusal_lens.metrics import refusal_by_length

    harmful = rl.load_contrast("refusal-pairs", split="test").harmful_texts[:4]
    table = refusal_by_length(refusal_model, harmful, lengths=(16, 2))
    assert list(table.columns) == ["instruction", "refused_2", "refused_16"]
    for n in (2, 16):
        replies = rl.generate(refusal_model, harmful, max_new_tokens=n)
        assert table[f"refused_{n}"].tolist() == [rl.is_refusal(r) for r in replies]
    assert not table.refused_2.any() and table.refused_16.sum() >= 3  # "I'm sorry, ..." needs more than 2 tokens
