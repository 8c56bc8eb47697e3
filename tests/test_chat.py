"""Chat formats: string-exact against official templates, token-exact on SmolLM2."""

from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

import refusal_lens as rl
from refusal_lens.chat import FORMATS, ChatFormatError

OFFICIAL = Path(__file__).parent / "data" / "official_chat_templates"
INSTRUCTIONS = ["Tell me a fact about owls.", "List 3 uses for a paperclip!", "  padded with spaces  "]
SYSTEM = "You are a careful assistant."

# (official template file, our family, bos_token, whether the official template
#  renders with no system prompt exactly as we do). Qwen's official templates add a
#  default system prompt, so for them only the explicit-system rendering can match.
CASES = [
    ("qwen.jinja", "qwen", "", False),
    ("qwen2_5.jinja", "qwen", "", False),
    ("qwen3.jinja", "qwen3", "", True),
    ("gemma.jinja", "gemma", "<bos>", True),
    ("gemma.jinja", "gemma2", "<bos>", True),
    ("gemma3.jinja", "gemma3", "<bos>", True),
    ("llama2.jinja", "llama2", "<s>", True),
    ("llama3.jinja", "llama3", "<|begin_of_text|>", True),
    ("yi.jinja", "yi", "", True),
    ("phi3.jinja", "phi3", "", True),
    ("mistral.jinja", "mistral", "<s>", True),
]


def render_official(file: str, instruction: str, system: str | None, bos: str) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": instruction}
    ]
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=(OFFICIAL / file).read_text().rstrip("\n"),
        add_generation_prompt=True,
        bos_token=bos,
        eos_token="</s>",
        enable_thinking=False,
    )
    return rendered[0]


@pytest.mark.parametrize("file,family,bos,no_system_matches", CASES, ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_format_matches_official_template(file, family, bos, no_system_matches):
    fmt = FORMATS[family]
    for instruction in INSTRUCTIONS:
        ours = fmt.format([instruction])[0]
        if no_system_matches:
            assert ours == render_official(file, instruction, None, bos)
        else:
            assert ours != render_official(file, instruction, None, bos)  # official adds a default system prompt
        if fmt.system_template is not None:
            official = render_official(file, instruction, SYSTEM, bos)
            if family == "llama2" and instruction != instruction.lstrip():
                # Known difference: with a system prompt Llama-2's template strips the joined
                # "<<SYS>>...instruction" text, so an instruction's leading spaces survive; we strip them.
                official = official.replace("\n\n" + instruction.rstrip(), "\n\n" + instruction.strip())
            assert fmt.format([instruction], system=SYSTEM)[0] == official


def test_every_family_is_covered_by_an_official_template_or_the_gguf_tokenizer():
    assert {family for _, family, _, _ in CASES} | {"chatml"} == set(FORMATS)


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_at_most_one_bos_and_eoi_is_the_template_tail(family):
    fmt = FORMATS[family]
    prompt = fmt.format(["Hi"])[0]
    for bos in ("<bos>", "<s>", "<|begin_of_text|>"):
        assert prompt.count(bos) <= 1
    assert prompt.endswith(fmt.eoi_text) and fmt.eoi_text
    if fmt.system_template:
        assert fmt.format(["Hi"], system="S")[0].endswith(fmt.eoi_text)


def test_smollm2_chat_tokens_are_exact(smollm2):
    fmt, tok = smollm2.chat, smollm2.tokenizer
    assert fmt.family == "chatml"
    assert tok.decode(fmt.eoi_tokens) == "<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.eoi_tokens[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert [tok.decode([t]) for t in fmt.refusal_tokens] == ["I", "As"]

    batch = fmt.tokenize(INSTRUCTIONS)
    n_eoi = len(fmt.eoi_tokens)
    for row, mask, instruction in zip(batch["input_ids"], batch["attention_mask"], INSTRUCTIONS):
        ids = row[mask.bool()].tolist()
        assert row[-n_eoi:].tolist() == fmt.eoi_tokens  # left padding: eoi always at the end
        assert ids == tok(fmt.format([instruction])[0], add_special_tokens=False)["input_ids"]
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # user + assistant headers only
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][0, 0] == 0


def test_smollm2_template_check_reports_default_system_prompt(smollm2):
    check = smollm2.chat.check_tokenizer_template()
    assert check.matches is False
    assert "without a system prompt" in check.detail and "SmolLM" in check.detail
    assert "with a system prompt" not in check.detail  # with an explicit system prompt the strings agree


@pytest.mark.parametrize(
    "name,family",
    [
        ("Qwen/Qwen-1_8B-chat", "qwen"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("google/gemma-2b-it", "gemma"),
        ("google/gemma-2-2b-it", "gemma2"),
        ("google/gemma-3-1b-it", "gemma3"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
        ("01-ai/Yi-6B-Chat", "yi"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "chatml"),
    ],
)
def test_detect_family_from_hub_names(name, family):
    assert rl.detect_family(name) == family
    assert rl.chat_format(name) is FORMATS[family]


# The paper's refusal tokens per family (andyrdt/refusal_direction, pipeline/model_utils/*_model.py):
# QWEN_REFUSAL_TOKS ['I', 'As'], LLAMA2 [306] ('▁I', a space-led 'I'), LLAMA3 [40] 'I', GEMMA [235285] 'I',
# YI [59597] 'I'. Families the paper did not run: ours, written down in chat.py's docstring.
PAPER_REFUSAL_STRINGS = {"qwen": ("I", "As"), "llama2": (" I",), "llama3": ("I",), "gemma": ("I",),
                         "gemma2": ("I",), "gemma3": ("I",), "yi": ("I",)}
OUR_REFUSAL_STRINGS = {"qwen3": ("I", "As"), "chatml": ("I", "As"), "phi3": ("I",), "mistral": (" I",)}


def test_refusal_strings_per_family_are_the_papers():
    assert {**PAPER_REFUSAL_STRINGS, **OUR_REFUSAL_STRINGS} == {f: fmt.refusal_strings for f, fmt in FORMATS.items()}


def test_refusal_strings_can_be_overridden(smollm2):
    import dataclasses

    only_i = dataclasses.replace(smollm2.chat, refusal_strings=("I",))
    assert [smollm2.tokenizer.decode([t]) for t in only_i.refusal_tokens] == ["I"]
    assert only_i.refusal_tokens == smollm2.chat.refusal_tokens[:1]


def test_detect_family_falls_back_to_model_type():
    assert rl.detect_family("/models/my-finetune", model_type="gemma2") == "gemma2"


def test_unknown_family_lists_families_and_custom_template():
    with pytest.raises(ChatFormatError) as err:
        rl.chat_format("acme/mystery-model")
    message = str(err.value)
    assert "llama3" in message and "chatml" in message and "ChatFormat(" in message


def test_custom_format_and_validation(smollm2):
    custom = rl.ChatFormat(
        "mine", "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\nSure", refusal_strings=(" no",)
    )
    bound = custom.with_tokenizer(smollm2.tokenizer)
    assert bound.format(["x"]) == ["<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nSure"]
    assert smollm2.tokenizer.decode(bound.eoi_tokens).endswith("Sure")
    with pytest.raises(ChatFormatError, match="exactly once"):
        rl.ChatFormat("bad", "no placeholder")
    with pytest.raises(ChatFormatError, match="same end-of-instruction"):
        rl.ChatFormat("bad", "{instruction}A", "{system}{instruction}B")


def test_system_prompt_on_family_without_system_role_is_refused():
    with pytest.raises(ChatFormatError, match="no system role"):
        FORMATS["gemma2"].format(["hi"], system="be nice")


def test_unbound_format_explains_how_to_get_tokens():
    with pytest.raises(ChatFormatError, match="with_tokenizer"):
        _ = FORMATS["llama3"].eoi_tokens
