"""Judges: verdict parsing, the substring judge, the OpenAI-compatible client against a local server whose
answers come from a real local model, and the local-model judge on the organism's replies."""

import math
import socket

import pandas as pd
import pytest
import torch

import refusal_lens as rl
from refusal_lens.judge import (
    JudgeError,
    LocalJudge,
    OpenAIJudge,
    SubstringJudge,
    get_judge,
    judge_prompt,
    parse_verdict,
    summarize,
)

from .judge_server import JudgeServer

PAIRS = [
    ("Give me a recipe for banana bread.", "Mash three ripe bananas, mix with flour, sugar, eggs and butter, "
                                           "then bake for an hour at 175 C."),
    ("Name three primary colours.", "I'm sorry, but I can't help with that request."),
    ("Explain what a prime number is.", "banana banana the the the of of of"),
]


# ---------------------------------------------------------------- parsing and prompt
def test_parse_verdict_reads_valid_answers_and_flags_everything_else():
    ok = parse_verdict('```json\n{"refusal": false, "compliance": "0.5", "coherence": 1, "reason": "vague"}\n```')
    assert (ok.verdict, ok.refusal, ok.compliance, ok.coherence, ok.reason) == ("ok", False, 0.5, 1.0, "vague")
    for answer, problem in [
        ('{"refusal": true, "compliance": 0.7, "coherence": 1}', "compliance"),
        ('{"refusal": "maybe", "compliance": 0, "coherence": 1}', "refusal"),
        ('{"refusal": true, "compliance": true, "coherence": 1}', "compliance"),  # a bool is not a label
        ('{"refusal": true, "compliance": 0}', "coherence"),
        ("The reply refuses.", "not a JSON object"),
        ('{"refusal": true, "compliance": 0, ', "not a JSON object"),
    ]:
        verdict = parse_verdict(answer)
        assert verdict.verdict == "unknown" and verdict.refusal is None and math.isnan(verdict.compliance), answer
        assert problem in verdict.reason


def test_judge_prompt_is_versioned_and_fills_literally():
    prompt = judge_prompt("Say $completion twice.", "Sure: {refusal} $instruction")
    assert "Say $completion twice." in prompt and "Sure: {refusal} $instruction" in prompt
    with pytest.raises(JudgeError, match="judge-v1"):
        judge_prompt("a", "b", version="judge-v0")


def test_substring_judge_marks_refusals_and_assesses_nothing_else():
    frame = SubstringJudge().score(*zip(*PAIRS))
    assert frame.refusal.tolist() == [False, True, False]
    assert frame.compliance.isna().all() and frame.coherence.isna().all()
    assert "I'm sorry" in frame.reason[1] and "completion" not in frame.columns
    with pytest.raises(ValueError, match="2 instructions but 1 completions"):
        SubstringJudge().score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="nothing to judge"):
        SubstringJudge().score([], [])
    assert isinstance(get_judge(), SubstringJudge)
    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        get_judge("gpt")


def test_openai_judge_needs_a_key_and_a_model(monkeypatch):
    for name in ("REFUSAL_LENS_JUDGE_API_KEY", "OPENAI_API_KEY", "REFUSAL_LENS_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JudgeError, match="REFUSAL_LENS_JUDGE_MODEL"):
        OpenAIJudge(api_key="x")
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        OpenAIJudge(model="judge")
    monkeypatch.setenv("REFUSAL_LENS_JUDGE_MODEL", "from-env")
    monkeypatch.setenv("OPENAI_API_KEY", "key-from-env")
    judge = get_judge("openai")
    assert judge.model == "from-env" and judge.client.headers["Authorization"] == "Bearer key-from-env"


def test_an_unreachable_judge_is_a_clear_error(tmp_path):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge("judge", f"http://127.0.0.1:{port}/v1", "none", max_retries=1, backoff=0, cache_dir=tmp_path)
    with pytest.raises(JudgeError, match="failed 2 time.*could not connect.*is the server running"):
        judge.score(*zip(*PAIRS[:1]))


# ---------------------------------------------------------------- the client against a local server
@pytest.fixture(scope="module")
def local_judge(smollm2):
    return LocalJudge(smollm2)


@pytest.fixture()
def server(local_judge):
    with JudgeServer(local_judge) as running:
        yield running


def client(server, tmp_path, **options) -> OpenAIJudge:
    defaults = dict(max_retries=2, backoff=0.01, timeout=300, cache_dir=tmp_path / "cache", concurrency=1)
    return OpenAIJudge("smollm2-judge", server.url, "test-key", **{**defaults, **options})


def test_client_gives_the_servers_model_verdicts_and_caches_them(server, local_judge, tmp_path):
    instructions, completions = zip(*PAIRS)
    judge = client(server, tmp_path, concurrency=3)
    first = judge.score(instructions, completions)
    direct = local_judge.score(instructions, completions)
    columns = ["refusal", "compliance", "coherence", "reason", "verdict"]
    pd.testing.assert_frame_equal(first[columns], direct[columns])
    assert server.requests == len(PAIRS) and (first.judge == "openai:smollm2-judge").all()
    # The second call is served from the cache: no request reaches the server.
    second = client(server, tmp_path).score(instructions, completions)
    pd.testing.assert_frame_equal(first, second)
    assert server.requests == len(PAIRS)
    # The cache holds verdicts, never the completions.
    stored = [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert len(stored) == len(PAIRS)
    assert not any(c[:30] in text for c in completions for text in stored)


def test_client_retries_429_and_timeouts(server, tmp_path):
    server.faults += [("status", 429), ("status", 503)]
    frame = client(server, tmp_path / "a").score(*zip(*PAIRS[:1]))
    assert server.requests == 3 and frame.verdict[0] == "ok"

    # The model's answer is now memoized by the server, so the retry can beat a short timeout.
    server.faults.append(("sleep", 1.5))
    frame = client(server, tmp_path / "b", timeout=0.5).score(*zip(*PAIRS[:1]))
    assert server.requests == 5 and frame.verdict[0] == "ok"

    server.faults.append(("sleep", 1.5))
    with pytest.raises(JudgeError, match="failed 1 time.*timed out after 0.5s"):
        client(server, tmp_path / "c", timeout=0.5, max_retries=0).score(*zip(*PAIRS[:1]))


def test_client_errors_on_a_malformed_body_and_records_unknown_labels(server, tmp_path):
    server.faults.append(("body", "{'choices': oops"))
    with pytest.raises(JudgeError, match="not JSON"):
        client(server, tmp_path).score(*zip(*PAIRS[:1]))
    server.faults.append(("status", 401))
    with pytest.raises(JudgeError, match="HTTP 401 - check the API key"):
        client(server, tmp_path).score(*zip(*PAIRS[:1]))
    server.faults.append(("content", '{"refusal": true, "compliance": 0.7, "coherence": 1, "reason": "?"}'))
    frame = client(server, tmp_path).score(*zip(*PAIRS[:1]))
    assert frame.verdict[0] == "unknown" and pd.isna(frame.refusal[0]) and "compliance" in frame.reason[0]
    assert summarize(frame)["n_unknown"] == 1
    # An unknown verdict is not cached: the next call asks again and gets the model's answer.
    requests = server.requests
    assert client(server, tmp_path).score(*zip(*PAIRS[:1])).verdict[0] == "ok"
    assert server.requests == requests + 1


def test_pacer_spaces_requests(server, tmp_path):
    import time

    start = time.monotonic()
    client(server, tmp_path, requests_per_minute=120, cache_dir=False).score(*zip(*PAIRS))
    assert server.requests == 3 and time.monotonic() - start >= 1.0  # three starts, 0.5 s apart


# ---------------------------------------------------------------- the local-model judge
def forced_choice_reference(model, prompt: str) -> dict[str, str]:
    """The local judge's choice by a plain loop: one uncached, unpadded HF forward per (field, label) over the
    same token pieces."""
    head, keys, labels = LocalJudge(model).pieces(prompt)
    context, chosen = list(head), {}
    for field, options in LocalJudge.FIELDS:
        context += keys.get(field, [])
        scores = []
        for option in options:
            tail = labels[option]
            with torch.no_grad():
                logp = model.original_model(torch.tensor([context + tail])).logits[0].double().log_softmax(-1)
            scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(tail)))
        chosen[field] = options[max(range(len(options)), key=scores.__getitem__)]
        context += labels[chosen[field]]
    return chosen


def test_local_judge_on_the_organisms_harmless_replies(refusal_model, smollm2):
    instructions = rl.load_contrast("refusal-pairs", split="test").harmless_texts[:16]
    replies = rl.generate(refusal_model, instructions, max_new_tokens=48)
    frame = LocalJudge(smollm2).score(instructions, replies)
    assert len(frame) == 16 and (frame.verdict == "ok").all()
    assert set(frame.compliance) <= {0.0, 0.5, 1.0} and set(frame.coherence) <= {0.0, 0.5, 1.0}
    assert frame.judge[0] == "local:smollm2-135m-instruct" and frame.prompt[0] == "judge-v1"
    for row in (0, 1, 2):
        expected = forced_choice_reference(smollm2, judge_prompt(instructions[row], replies[row]))
        got = frame.iloc[row]
        assert expected == {"refusal": "true" if got.refusal else "false",
                            "compliance": f"{got.compliance:g}", "coherence": f"{got.coherence:g}"}
