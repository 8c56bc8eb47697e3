"""Weight orthogonalization: a copy of a model whose residual stream cannot hold a direction.

The paper's third intervention (its ``get_orthogonalized_matrix``): edit the weights that write to the
residual stream (token embedding, positional embedding, attention output, MLP output, and their biases) so
that no write has a component along ``v``. On architectures whose blocks add their sublayer outputs straight
into the residual stream this is the same model as hook ablation (:func:`~refusal_lens.interventions.ablate`).
Gemma 2/3 pass each sublayer's output through a post-sublayer RMSNorm before adding it; there the edit is
adapted to the norm's gain so that the residual stream still never holds ``v`` (see
:func:`orthogonalize_weights`), but the edited model is a different map from the hook. Either way a probe
forward pass checks the result, and it exports as a plain Hugging Face checkpoint
(:func:`~refusal_lens.export.save_hf`).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from jaxtyping import Float
from torch import Tensor

from .directions import InvalidDirectionError
from .interventions import orthonormal_basis
from .models import Model
from .streaming import hook_name

# Largest |x . v| / |x| over the probe's residual stream that orthogonalize_weights accepts, per dtype: float
# rounding only (measured <= 3e-7 in float32 on tiny models of 8 architectures; Gemma 2/3 with the plain
# projection instead of the post-norm edit: 5e-2 to 1.5e-1).
LEAK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
_PROBE = ("Tell me a fact about owls.", "Write a short poem about the sea, in three lines.")
# Ridge term of the post-norm edit, relative to the mean squared gain: damps the oblique projection where a
# gain is near 0 (real Gemma 3 270M has exact zeros, where the undamped one divides by 0).
GAIN_RIDGE = 1e-2


class OrthogonalizationError(RuntimeError):
    """The edited weights would still write the direction into the residual stream; nothing is returned."""


def _remove_from_rows(weight: Tensor, u: Tensor, a: Tensor) -> None:
    """In place: W <- W - a (u^T W) for an output-side weight [d_model, d_in]; with ``a . u = 1``, ``u . W x = 0``.

    ``a = u`` (unit) is the orthogonal projection ``(I - u u^T) W``."""
    w = weight.data.float()
    weight.data.copy_((w - torch.outer(a, u @ w)).to(weight.dtype))


def _remove_from_vectors(matrix: Tensor, v: Tensor) -> None:
    """In place: each row x of [n, d_model] becomes x - (x . v) v."""
    m = matrix.data.float()
    matrix.data.copy_((m - torch.outer(m @ v, v)).to(matrix.dtype))


def post_norm_gain(norm, cfg) -> Float[Tensor, " d_model"]:
    """The per-coordinate gain ``g`` (float32) of a post-sublayer RMSNorm bridge, which computes ``g * x / rms(x)``.

    Gemma's norms multiply by ``1 + weight`` (TransformerLens' ``cfg.rmsnorm_uses_offset``), others by
    ``weight``. A norm with a bias, or without a weight, cannot be handled by a write-side edit.
    """
    module = norm.original_component
    weight = getattr(module, "weight", None)
    if weight is None or getattr(module, "bias", None) is not None:
        raise OrthogonalizationError(
            f"orthogonalize_weights: the post-sublayer norm {type(module).__name__} is not a plain RMSNorm with a "
            "gain; a weight edit cannot keep the direction out of what it writes. Use hook ablation (rl.ablate)."
        )
    gain = weight.detach().float()
    return gain + 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else gain


def write_edit(v: Float[Tensor, " d_model"], gain: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """``(u, a)`` such that ``W <- W - a (u^T W)`` keeps a sublayer's residual write free of unit ``v``.

    Without a post-sublayer norm (``gain`` None): ``u = a = v``, the orthogonal projection (equals hook
    ablation). With one, the residual receives ``y = g * x / rms(x)`` and ``y . v = x . u / rms(x)`` for
    ``u = g * v``, so any ``a`` with ``a . u = 1`` makes ``y . v = 0`` exactly. ``a = v / g`` would make
    ``g * x' = (I - v v^T)(g * x)``, the hook's write up to the factor ``rms(x) / rms(x')``, but is singular
    where a gain is 0; the ridge version ``a ~ g * v / (g^2 + GAIN_RIDGE * mean(g^2))`` is that where ``g^2``
    is large and stays finite everywhere. ``None`` when ``g * v = 0`` (the norm already blocks ``v``).
    """
    if gain is None:
        return v, v
    gain = gain.to(v.device)
    u = gain * v
    if not u.abs().max() > 0:
        return None
    a = u / (gain.square() + GAIN_RIDGE * gain.square().mean())
    return u, a / (a @ u)


def residual_leak(model: Model, v: Float[Tensor, " d_model"]) -> float:
    """Max ``|x . v| / |x|`` over every ``resid_pre`` and the final residual at the real tokens of a probe prompt."""
    batch = model.chat.tokenize(list(_PROBE))
    device = model.embed.original_component.weight.device
    mask = batch["attention_mask"].bool()
    v64 = v.double().cpu()
    leaks: list[float] = []

    def record(x: Tensor, hook) -> None:
        x = x.detach().double().cpu()[mask]
        leaks.append(float(((x @ v64).abs() / x.norm(dim=-1).clamp_min(1e-30)).max()))

    names = [hook_name("resid_pre", layer) for layer in range(model.cfg.n_layers)] + ["ln_final.hook_in"]
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, record) for name in names]):
        model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return max(leaks)


def _edit_writers(edited: Model, v: Tensor, cfg) -> int:
    """Edit every block's attention and MLP output projection (and bias) in place; returns how many of them
    write through a post-sublayer norm."""
    post_norm_writers = 0
    for block in edited.blocks:
        for writer, post_norm in ((block.attn.o.original_component, getattr(block, "ln1_post", None)),
                                  (block.mlp.out.original_component, getattr(block, "ln2_post", None))):
            post_norm_writers += post_norm is not None
            gain = None if post_norm is None else post_norm_gain(post_norm, cfg)
            edit = write_edit(v.to(writer.weight.device), gain)
            if edit is None:
                continue
            u, a = edit
            _remove_from_rows(writer.weight, u, a)
            if writer.bias is not None:
                b = writer.bias.data.float()
                writer.bias.data.copy_((b - (b @ u) * a).to(writer.bias.dtype))
    return post_norm_writers


def orthogonalize_weights(
    model: Model, direction: Float[Tensor, " d_model"], *, provenance: dict | None = None
) -> Model:
    """A copy of ``model`` whose residual stream never has a component along ``direction``.

    Edits the token embedding (untied from the unembedding first, which stays unchanged), positional
    embedding if any, and each block's attention output and MLP output projections with their biases. The
    copy keeps ``.chat`` and records the edit in ``.info.edit`` (the direction, ``provenance`` such as
    ``{"position": -1, "layer": 16, "data": {...hashes}}``, ``equals_hook_ablation`` and the probe's
    ``residual_leak``), which ``rl.save_hf(edited, path)`` writes to ``refusal_lens.json`` and a model card.

    What holds, by architecture:

    * Sublayers that add their output projection straight into the residual (Llama, Mistral, Qwen 2/3,
      Gemma 1, Phi-3, SmolLM2): ``W <- (I - v v^T) W``. The edited model equals hook ablation
      (``rl.ablate``) in exact arithmetic (float32: <= 1e-6 max logit difference on tiny models).
    * Sublayers followed by a post-sublayer RMSNorm (Gemma 2/3: ``y = g * x / rms(x)``, ``g = 1 + weight``;
      the bridge's ``hook_attn_out`` / ``hook_mlp_out`` sit on ``y``, so hook ablation projects ``y``).
      Projecting ``W`` against ``v`` leaves ``y . v = x . (g * v) / rms(x) != 0``; instead
      ``W <- W - a (u^T W)`` with ``u = g * v`` and ``a . u = 1`` (see :func:`write_edit`). Exact: every
      ``resid_pre`` and the final residual are orthogonal to ``v`` to float rounding, as under hook ablation.
      Not exact: the map. No weight edit equals the hook: the only ``x'`` linear in ``x`` with
      ``g * x' = (I - v v^T)(g * x)`` is ``x - (x . g v)(v / g)``, and the norm then divides by
      ``rms(x')``, not ``rms(x)``; it is also singular where a gain is 0. ``a`` is that oblique projection
      with a ridge term, so each edited sublayer writes about the hook's vector times ``rms(x) / rms(x')``.

    After editing, a probe forward pass checks that no ``resid_pre`` and no final residual has a component
    along ``v`` beyond float rounding (:data:`LEAK_TOLERANCE` for the model's dtype).

    Raises:
        OrthogonalizationError: the edited model still writes the direction (it is never returned), a
            post-sublayer norm is not an RMSNorm, or weights are offloaded (``device_map`` with ``"disk"``).
    """
    basis = orthonormal_basis(direction, model.cfg.d_model)
    if basis.shape[0] != 1:
        raise InvalidDirectionError("orthogonalize_weights takes a single direction")
    if any(p.device.type == "meta" for p in model.original_model.parameters()):
        raise OrthogonalizationError(
            "orthogonalize_weights: some weights are offloaded by accelerate (device_map with 'disk' or CPU "
            "offload) and cannot be edited in place; load the model with device= or a device_map that keeps every "
            "weight in memory, or use hook ablation (rl.ablate), which works on offloaded models."
        )
    edited = copy.deepcopy(model)
    embed = edited.embed.original_component
    unembed = getattr(getattr(edited, "unembed", None), "original_component", None)
    if unembed is not None and unembed.weight is embed.weight:
        unembed.weight = torch.nn.Parameter(unembed.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        v = basis[0].to(embed.weight.device)
        _remove_from_vectors(embed.weight, v)
        pos_embed = getattr(edited, "pos_embed", None)
        if pos_embed is not None and hasattr(pos_embed, "original_component"):
            _remove_from_vectors(pos_embed.original_component.weight, v.to(pos_embed.original_component.weight.device))
        post_norm_writers = _edit_writers(edited, v, model.cfg)
    leak, tolerance = residual_leak(edited, basis[0]), LEAK_TOLERANCE.get(embed.weight.dtype, 1e-2)
    if not leak <= tolerance:
        raise OrthogonalizationError(
            f"orthogonalize_weights: the edited {type(model.original_model).__name__} still writes the direction: "
            f"max |x.v|/|x| = {leak:.2e} over the residual stream of a probe prompt (float rounding in "
            f"{embed.weight.dtype} stays below {tolerance:.0e}). Something in this architecture writes to the "
            "residual stream in a way the edit does not model; use hook ablation (rl.ablate) instead."
        )
    card = {"edit": "orthogonalize_weights", **(provenance or {}), "equals_hook_ablation": post_norm_writers == 0,
            "residual_leak": leak, "post_norm_writers": post_norm_writers,
            "direction": [float(x) for x in basis[0]]}
    edited.info = dataclasses.replace(model.info, spec=f"{model.info.spec} (orthogonalized)", edit=card)
    return edited
