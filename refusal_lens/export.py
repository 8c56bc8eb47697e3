"""Exporting a model as a plain Hugging Face directory, with a record and a model card of what was edited.

:func:`save_hf` writes any loaded (possibly edited) model; :func:`export_orthogonalized` is ``refusal-lens
export``: a model and a direction file in, the orthogonalized model out, refused where the edit is not the same
model as hook ablation unless asked for.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .directions import load_direction
from .manifest import file_sha256, versions
from .models import Model, load_model
from .orthogonalize import orthogonalize_weights


class InexactEditError(ValueError):
    """Orthogonalized weights would not be the same model as hook ablation for this architecture."""


def post_norm_writers(model: Model) -> int:
    """How many attention/MLP outputs pass through a post-sublayer norm before the residual (Gemma 2/3: all).

    Where this is 0, orthogonalized weights equal hook ablation; otherwise they do not
    (see :func:`refusal_lens.orthogonalize_weights`).
    """
    return sum(getattr(block, name, None) is not None for block in model.blocks for name in ("ln1_post", "ln2_post"))


def _header(path: Path) -> dict[str, str]:
    """A ``.safetensors`` file's metadata (a run's ``direction.safetensors`` holds layer, position, source)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def export_orthogonalized(model: Model | str, direction: str | Path, out: str | Path, *, layer: int | None = None,
                          force_inexact: bool = False, **load_kwargs) -> Path:
    """Orthogonalize ``model``'s weights against the direction in a file and save the result as an HF folder.

    Args:
        model: a loaded model, or a spec for :func:`~refusal_lens.load_model` (offline name, hub id, folder).
        direction: ``.pt``/``.safetensors``/``.npy``/``.npz`` holding one ``[d_model]`` vector
            (:func:`~refusal_lens.load_direction`; a different width raises
            :class:`~refusal_lens.InvalidDirectionError`).
        out: the folder to write (must not exist, or be empty): config, safetensors, tokenizer,
            ``refusal_lens.json`` and a model card ``README.md`` recording the direction file, its SHA-256, the
            layer and what is exact.
        layer: the layer the direction was taken at, for the record (the edit removes it at every layer);
            default: the ``layer`` in a run's ``direction.safetensors`` header, if any.
        force_inexact: export also where the edit is not hook ablation (post-sublayer norms: Gemma 2/3).
        load_kwargs: passed to :func:`~refusal_lens.load_model` when ``model`` is a spec.

    Raises:
        InexactEditError: the architecture has post-sublayer norms and ``force_inexact`` is False; nothing
            is loaded into the edit or written.
        FileExistsError: ``out`` holds files.
    """
    direction, out = Path(direction), Path(out)
    if not direction.is_file():
        raise FileNotFoundError(f"no direction file {direction}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the exported model")
    if isinstance(model, str):
        model = load_model(model, **load_kwargs)
    vector = load_direction(direction, model)  # unit float32, width-checked
    n_post_norm = post_norm_writers(model)
    if n_post_norm and not force_inexact:
        raise InexactEditError(
            f"{type(model.original_model).__name__} adds each sublayer's output through a post-sublayer norm "
            f"({n_post_norm} writers), so orthogonalized weights are not the same model as hook ablation: the "
            "residual stream never holds the direction, but the logits differ from rl.ablate's (Gemma 2/3). Export "
            "anyway with --force-inexact (force_inexact=True), or use hook ablation (rl.ablate) in Python."
        )
    header = _header(direction)
    if layer is None and header.get("layer", "None") != "None":
        layer = int(header["layer"])
    provenance = {"direction_file": direction.name, "direction_sha256": file_sha256(direction), "layer": layer,
                  "position": None if header.get("position", "None") == "None" else int(header["position"]),
                  "direction_source": header.get("source"), "force_inexact": bool(force_inexact)}
    edited = orthogonalize_weights(model, vector, provenance=provenance)
    return save_hf(edited, out)


def save_hf(model: Model, path: str | Path, *, card: dict | None = None) -> Path:
    """Save a bridge's weights as a plain Hugging Face model directory (config, safetensors, tokenizer).

    The bridge wraps HF modules in place; this builds a clean HF model from the config on the
    ``meta`` device (no memory, no random init), gives it host copies of the unwrapped weights
    strictly (every expected tensor must be found; one copy per tensor, so a tied head stays tied
    and a model on a GPU costs one model's worth of host memory), unties the output head if the
    bridge's copy was untied (as ``orthogonalize_weights`` does), and writes ``refusal_lens.json``
    with ``card`` (default: the edit recorded in ``model.info.edit``, e.g. the orthogonalized
    direction and its provenance) and a model card ``README.md``.
    """
    from transformers import AutoModelForCausalLM

    hf = model.original_model
    host: dict[int, torch.Tensor] = {}  # id(parameter) -> its CPU copy
    weights = {}
    for name, tensor in hf.state_dict(keep_vars=True).items():
        if id(tensor) not in host:
            host[id(tensor)] = tensor.detach().to("cpu")
        weights[name.replace("._original_component", "")] = host[id(tensor)]
    config = copy.deepcopy(hf.config)
    embed, head = model.embed.original_component.weight, model.unembed.original_component.weight
    # data_ptr() is 0 for tensors without storage of their own (meta, lazy): identity settles those
    config.tie_word_embeddings = embed is head or embed.data_ptr() == head.data_ptr() != 0
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=hf.dtype)
    expected = clean.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise RuntimeError(f"cannot map the bridge's weights back to {type(clean).__name__}: missing {missing[:5]}")
    clean.load_state_dict({k: weights[k] for k in expected}, strict=True, assign=True)
    if config.tie_word_embeddings:
        clean.tie_weights()
    path = Path(path)
    clean.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    card = model.info.edit if card is None else card
    info = {k: v for k, v in dataclasses.asdict(model.info).items() if k != "edit"}
    record = {"model": info, **(card or {}), "versions": versions()}
    (path / "refusal_lens.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (path / "README.md").write_text(model_card(record))
    return path


def model_card(record: dict) -> str:
    """A Hugging Face model card (YAML front matter + markdown) for an exported, edited model."""
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
    if record.get("direction_file"):
        lines.append(f"| direction file | `{record['direction_file']}` (SHA-256 `{record.get('direction_sha256')}`) |")
    if record.get("direction_source"):
        lines.append(f"| direction source | {record['direction_source']} |")
    for key in ("position", "layer", "hook"):
        if record.get(key) is not None:
            lines.append(f"| direction {key} | {record[key]} |")
    if record.get("edit") == "orthogonalize_weights":
        exact = record.get("equals_hook_ablation", True)
        lines.append(f"| equals hook ablation | {'yes' if exact else 'no (post-sublayer norms)'}"
                     f"{' - exported with --force-inexact' if record.get('force_inexact') else ''} |")
    for name, digest in (record.get("data") or {}).items():
        lines.append(f"| data `{name}` | `{digest}` |")
    lines += [f"| refusal_lens | {record['versions'].get('refusal-lens')} |",
              f"| torch / transformers / transformer-lens | {record['versions'].get('torch')} / "
              f"{record['versions'].get('transformers')} / {record['versions'].get('transformer-lens')} |", "",
              "Load with `AutoModelForCausalLM.from_pretrained(<this folder>)`; " + _equivalence(record), ""]
    return "\n".join(lines)


def _equivalence(record: dict) -> str:
    """The model card's sentence on how the edited model relates to hook ablation of the base model."""
    if record.get("edit") != "orthogonalize_weights" or record.get("equals_hook_ablation", True):
        return ("its logits equal those of the base model under `refusal_lens.ablate(model, direction)` (checked to "
                "1e-3 by the package's tests).")
    return ("its residual stream has no component along the direction (checked on a probe: max |x.v|/|x| = "
            f"{record.get('residual_leak', float('nan')):.1e}), as under `refusal_lens.ablate(model, direction)`, "
            "but it is not the same map: this architecture passes each sublayer's output through a post-sublayer "
            "RMSNorm, so the output projections were edited against the norm-weighted direction (see "
            "`refusal_lens.orthogonalize_weights`).")
