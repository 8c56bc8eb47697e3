"""The models of the GPU guide (docs/gpu.md), followed by hub *name* through the code, offline.

For each checkpoint the guide names, :data:`HUB` holds the values of its published ``config.json`` that decide
what the code does (architecture class, ``model_type``, norms, tying, sliding windows, soft-capping, vocabulary)
and the official chat template of its tokenizer (``tests/data/official_chat_templates``). A tiny random model
(2 layers, d_model 64, a small byte-level vocabulary with the family's special tokens, the template's words and
"As" as single tokens as in the real vocabularies) is built from those values and saved in a folder named as
``hf download --local-dir`` names it. Checked: the family, chat format, refusal tokens and end-of-instruction
positions chosen for the hub name and for the folder; the guide's parameter counts and memory estimates
(from the full-size config, built on the meta device); and that every ``refusal-lens run`` command of the guide,
pointed at the tiny folder at small sizes, completes the main job on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import refusal_lens as rl
from refusal_lens import cli
from refusal_lens.chat import ChatFormatError
from tests.tiny_models import ARCHITECTURES, tiny_tokenizer

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
OFFICIAL = Path(__file__).parent / "data" / "official_chat_templates"
# Words of the chat templates, and the refusal string "As", that the real tokenizers hold as single tokens.
TEMPLATE_WORDS = ("assistant", "model", "user", "As")
# Small sizes appended to each guide command (later flags win): the main job end to end on a random model.
SMALL = ["--device", "cpu", "--n-train", "8", "--n-val", "4", "--n-test", "4", "--n-boot", "20",
         "--max-new-tokens", "4", "--no-filter", "--capability-tasks", "", "--html-only",
         "--pick=-1,1"]


@dataclass(frozen=True)
class Hub:
    """One checkpoint of the guide.

    Attributes:
        name: hub id.
        arch: the tiny-organism architecture whose special tokens its family uses.
        family: the chat family the code must choose.
        template: official chat template file; ``default_system``: it adds a default system prompt (Qwen2.5),
            which our format leaves out on purpose, so only the explicit-system rendering can match.
        refusal: the refusal tokens, decoded.
        eoi: the end-of-instruction tokens, decoded (the run's positions are ``-len(eoi) .. -1``).
        exact: orthogonalized weights equal hook ablation.
        config: values of the published ``config.json``.
    """

    name: str
    arch: str
    family: str
    template: str
    refusal: tuple[str, ...]
    eoi: tuple[str, ...]
    exact: bool
    config: dict = field(default_factory=dict)
    default_system: bool = False


_QWEN_EOI = ("<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")
_GEMMA_EOI = ("<end_of_turn>", "\n", "<start_of_turn>", "model", "\n")
HUB: dict[str, Hub] = {h.name: h for h in [
    Hub("meta-llama/Meta-Llama-3-8B-Instruct", "llama", "llama3", "llama3.jinja", ("I",),
        ("<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"), True,
        dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
             rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
             max_position_embeddings=8192)),
    Hub("mistralai/Mistral-7B-Instruct-v0.2", "mistral", "mistral", "mistral.jinja", (" I",), (" ", "[/INST]"), True,
        dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
             rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
             hidden_act="silu", max_position_embeddings=32768)),
    Hub("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", "qwen", "qwen2_5.jinja", ("I", "As"), _QWEN_EOI, True,
        dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
             num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
             hidden_act="silu", max_position_embeddings=32768), default_system=True),
    Hub("Qwen/Qwen1.5-1.8B-Chat", "qwen2", "qwen", "qwen.jinja", ("I", "As"), _QWEN_EOI, True,
        dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=2048, intermediate_size=5504,
             num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False,
             hidden_act="silu", max_position_embeddings=32768), default_system=True),
    Hub("Qwen/Qwen3-1.7B", "qwen3", "qwen3", "qwen3.jinja", ("I", "As"),
        (*_QWEN_EOI, "<think>", "\n\n", "</think>", "\n\n"), True,
        dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2048, intermediate_size=6144,
             num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
             rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
             max_position_embeddings=40960)),
    Hub("google/gemma-1.1-2b-it", "gemma", "gemma", "gemma.jinja", ("I",), _GEMMA_EOI, True,
        dict(architectures=["GemmaForCausalLM"], model_type="gemma", hidden_size=2048, intermediate_size=16384,
             num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
             max_position_embeddings=8192)),
    Hub("google/gemma-2-2b-it", "gemma2", "gemma2", "gemma.jinja", ("I",), _GEMMA_EOI, False,
        dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=2304, intermediate_size=9216,
             num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, sliding_window=4096,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
             hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192)),
    Hub("google/gemma-3-1b-it", "gemma3", "gemma3", "gemma3.jinja", ("I",), _GEMMA_EOI, False,
        dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152,
             intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
             head_dim=256, vocab_size=262144, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
             tie_word_embeddings=True, sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
             hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768)),
    Hub("microsoft/Phi-3-mini-4k-instruct", "phi3", "phi3", "phi3.jinja", ("I",),
        ("<|end|>", "\n", "<|assistant|>", "\n"), True,
        dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=2047,
             hidden_act="silu", max_position_embeddings=4096)),
]}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)


def build_config(hub: Hub, tiny: dict | None = None):
    """The checkpoint's config from its published values, with ``tiny`` overriding the shape."""
    from transformers import AutoConfig

    values = {k: v for k, v in hub.config.items() if k not in ("model_type", "architectures")}
    if tiny:
        mha = values["num_key_value_heads"] == values["num_attention_heads"]
        values.update(tiny, num_key_value_heads=tiny["num_attention_heads"] if mha else 2)
    if hub.config["model_type"] == "phi3":  # Phi-3 derives head_dim from hidden_size / heads
        values.pop("head_dim", None)
    config = AutoConfig.for_model(hub.config["model_type"], **values)
    config.architectures = list(hub.config["architectures"])
    return config


def n_params(hub: Hub) -> int:
    """Parameters of the full-size model (a tied head counted once), built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(hub))
    return sum(p.numel() for p in model.parameters())


def tiny_folder(hub: Hub, parent: Path, name: str | None = None) -> Path:
    """A tiny random model of ``hub``'s config and tokenizer, in ``parent / name`` (default: the repo's name)."""
    from transformers import AddedToken, AutoModelForCausalLM

    spec = ARCHITECTURES[hub.arch]
    tok = tiny_tokenizer(dataclasses.replace(spec, plain=(*spec.plain, *TEMPLATE_WORDS)))
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in TEMPLATE_WORDS])
    tok.chat_template = (OFFICIAL / hub.template).read_text().rstrip("\n")
    config = build_config(hub, {**TINY, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    path = parent / (name or hub.name.split("/")[1])
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    parent = tmp_path_factory.mktemp("hub")
    return {name: tiny_folder(hub, parent) for name, hub in HUB.items()}


def guide_commands(command: str = "run") -> list[list[str]]:
    """Every ``refusal-lens <command>`` line of the guide, as argv (after ``refusal-lens``)."""
    prefix = f"refusal-lens {command} "
    lines = [line.strip() for line in GUIDE.read_text().splitlines() if line.strip().startswith(prefix)]
    return [shlex.split(line)[1:] for line in lines]


def value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def model_of(argv: list[str]) -> str:
    return f"{value(argv, '--model')}" + ("" if value(argv, "--data") else f" {value(argv, '--harmful')}")


def on_cpu(argv: list[str], replace: dict[str, str]) -> list[str]:
    """``argv`` with flag values replaced (model, files) and ``--dtype``/``--device`` dropped (the tiny models run
    in float32 on CPU, where bf16 is refused)."""
    argv = list(argv)
    for flag, new in replace.items():
        argv[argv.index(flag) + 1] = new
    for flag in ("--dtype", "--device"):
        if flag in argv:
            del argv[argv.index(flag): argv.index(flag) + 2]
    return argv


@pytest.mark.parametrize("name", list(HUB))
def test_name_and_folder_choose_the_family_format_and_tokens(name, folders):
    hub = HUB[name]
    assert rl.detect_family(name) == hub.family
    model = rl.load_model(str(folders[name]), device="cpu")  # family detected from the folder, as `run` does
    assert model.chat.family == hub.family == model.info.family
    assert model.chat == rl.chat_format(name)  # the same format as for the hub name
    tok = model.tokenizer
    assert tuple(tok.decode([t]) for t in model.chat.refusal_tokens) == hub.refusal
    assert tuple(tok.decode([t]) for t in model.chat.eoi_tokens) == hub.eoi
    check = model.chat.check_tokenizer_template()
    if hub.default_system:  # the official template adds a default system prompt; ours has none (the paper's)
        assert check.matches is False and "without a system prompt" in check.detail
        assert "with a system prompt:" not in check.detail
    else:
        assert check.matches, check.detail
    orthogonalized = rl.orthogonalize_weights(model, torch.randn(64, generator=torch.Generator().manual_seed(0)))
    assert orthogonalized.info.edit["equals_hook_ablation"] == hub.exact


def test_a_llama_folder_without_the_name_needs_chat(folders, tmp_path):
    """model_type 'llama' is shared by Llama 2, Llama 3 and SmolLM2 chat formats: a folder whose name does not
    say which is refused with the fix, not guessed; every other family is told by its config."""
    for hub in HUB.values():
        folder = tiny_folder(hub, tmp_path / hub.arch, name="model")
        if hub.config["model_type"] == "llama":
            with pytest.raises(ChatFormatError, match="chat='llama3'"):
                rl.load_model(str(folder), device="cpu")
            assert rl.load_model(str(folder), device="cpu", chat="llama3").chat.family == "llama3"
        else:
            assert rl.detect_family(str(folder), hub.config["model_type"]) == hub.family


def test_guide_names_and_numbers():
    text = GUIDE.read_text()
    paper = [argv for argv in guide_commands() if value(argv, "--data") == "paper"]
    assert sorted(value(argv, "--model") for argv in paper) == sorted(HUB)
    for argv in guide_commands():
        assert value(argv, "--model") in HUB
        for flag, expected in (("--n-train", "128"), ("--n-val", "32"), ("--max-new-tokens", "512")):
            assert value(argv, flag) == expected, f"{model_of(argv)}: {flag} is not the paper's {expected}"
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^\| `([^`]+)` \| (\w+) \| ([^|]+) \| (yes|no)[^|]*\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text,
        flags=re.M)}
    assert sorted(rows) == sorted(HUB)
    for name, hub in HUB.items():
        _, family, positions, exact, billions, weights, kv = rows[name]
        params, config = n_params(hub), build_config(hub)
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head * 2 * 32 * (64 + 512)
        assert (family, exact == "yes") == (hub.family, hub.exact)
        assert (billions, weights, kv) == (f"{params / 1e9:.2f}", f"{2 * params / 1e9:.1f}", f"{kv_bytes / 1e9:.1f}")
        # SentencePiece vocabularies (Mistral, Phi-3) split the template differently from the tiny tokenizers
        assert positions.strip() == ("from the tokenizer" if hub.arch in ("mistral", "phi3") else str(len(hub.eoi)))
    # Notebook sizes that name whole refusal-pairs splits.
    assert "-p N_TRAIN 100 " in text and len(rl.load_contrast("refusal-pairs", split="train").harmful) == 100
    assert "-p N_TEST 75 " in text and len(rl.load_contrast("refusal-pairs", split="test").harmful) == 75


def test_qwen1_is_named_unsupported_with_a_tested_alternative():
    assert rl.detect_family("Qwen/Qwen-1_8B-chat") == "qwen"  # the format would be right; the model is not
    text = GUIDE.read_text()
    section = text[text.index("## Qwen-1"):]
    assert "`Qwen/Qwen-1_8B-chat`" in section and "not supported" in section
    assert "`Qwen/Qwen1.5-1.8B-Chat`" in section  # the stand-in, tested above like every model of the table
    requirements = (GUIDE.parents[1] / "requirements.txt").read_text()
    assert "tiktoken" not in requirements and "transformers==5." in requirements  # the reasons the guide gives


@pytest.mark.parametrize("argv", guide_commands(), ids=model_of)
def test_guide_command_runs_the_main_job_on_the_tiny_folder(argv, folders, tmp_path, monkeypatch):
    """Each command as written, on the tiny folder of its checkpoint, at small sizes. The JailbreakBench command
    gets its folders from the guide's own snippet, run with a stand-in ``jailbreakbench`` module (the real one
    reads the hub) that returns the paper's test split."""
    name = value(argv, "--model")
    monkeypatch.chdir(tmp_path)
    if value(argv, "--harmful"):
        goals = rl.load_contrast("paper", split="test").harmful_texts
        stand_in = types.SimpleNamespace(read_dataset=lambda: types.SimpleNamespace(goals=goals))
        monkeypatch.setitem(sys.modules, "jailbreakbench", stand_in)
        snippet = re.search(r"python - <<'EOF'\n(.*?)\nEOF\n", GUIDE.read_text(), flags=re.S).group(1)
        exec(compile(snippet, "docs/gpu.md", "exec"), {})
        assert json.loads(Path(value(argv, "--harmful"), "test.json").read_text())[0]["instruction"] == goals[0]
    assert cli.main([*on_cpu(argv, {"--model": str(folders[name])}), *SMALL, "--out", "out"]) == 0
    (run,) = (tmp_path / "out").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert summary["family"] == HUB[name].family and report["selected"]["layer"] == 1
    assert report["positions"] == list(range(-len(HUB[name].eoi), 0))  # the candidates' positions
    harmful_train = rl.load_contrast("paper", split="train").harmful[:8]
    assert report["data"]["train"]["harmful_sha256"] == rl.ContrastSet("t", harmful_train, ()).hashes()[
        "harmful_sha256"]
    test = rl.load_contrast("paper", split="test")
    assert report["data"]["test"]["harmless_sha256"] == test.hashes()["harmless_sha256"]
    (export,) = guide_commands("export")
    if name == value(export, "--model") and not value(argv, "--harmful"):  # the guide's export line, on this run
        assert value(export, "--direction").endswith("/direction.safetensors")
        files = {"--model": str(folders[name]), "--direction": str(run / "direction.safetensors"),
                 "--out": str(tmp_path / "exported")}
        assert cli.main(on_cpu(export, files)) == 0
        record = json.loads((tmp_path / "exported" / "refusal_lens.json").read_text())
        assert record["layer"] == 1 and record["equals_hook_ablation"]
