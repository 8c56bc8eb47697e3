"""Interventions on the refusal direction: directional ablation, activation addition, weight orthogonalization.

* ``ablate(model, v)`` projects the unit direction (or an orthonormal basis)
  out of every residual-stream write, as the paper does: at ``resid_pre`` of
  every layer and at every attention and MLP output, all positions:
  ``x <- x - alpha * (x . v) v``.
* ``add(model, r, layer=l)`` adds the raw vector ``coeff * r`` at ``resid_pre`` of
  one layer, all positions.
* ``orthogonalize_weights(model, v)`` returns a copy whose weights that write
  to the residual stream (embedding, positional embedding, attention output,
  MLP output, and their biases) cannot write along ``v``; on architectures
  without post-sublayer norms it equals hook ablation.

``ablate`` and ``add`` return an :class:`Intervention`: a context manager that
removes its hooks on exit, also when the body raises, and whose ``.hooks`` can
be passed to ``rl.generate(..., hooks=...)`` or ``model.hooks(...)``. Maths run
in float32 on the activation's device and the result is cast back, so bf16/fp16
models lose nothing to the projection.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import hook_name
from .directions import InvalidDirectionError
from .models import save_hf

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


def orthonormal_basis(direction_or_basis: Tensor, d_model: int) -> Float[Tensor, "k d_model"]:
    """A float32 orthonormal basis ``[k, d_model]`` for a direction ``[d_model]`` or the span of ``[k, d_model]`` rows."""
    basis = torch.as_tensor(direction_or_basis).detach().to(torch.float64).cpu()
    if basis.ndim == 1:
        basis = basis[None]
    if basis.ndim != 2 or basis.shape[1] != d_model:
        raise InvalidDirectionError(
            f"direction of shape {tuple(torch.as_tensor(direction_or_basis).shape)} does not fit the model: "
            f"expected [d_model] or [k, d_model] with d_model = {d_model}"
        )
    if not torch.isfinite(basis).all():
        raise InvalidDirectionError("the direction contains NaN or infinite values")
    q, r = torch.linalg.qr(basis.T)  # columns of q span the rows of basis
    rank = int((r.diagonal().abs() > 1e-10 * basis.norm(dim=1).max().clamp_min(1e-300)).sum())
    if rank < basis.shape[0]:
        raise InvalidDirectionError(
            f"the {basis.shape[0]} direction(s) span only {rank} dimension(s): drop zero or dependent vectors"
        )
    return q.T.contiguous().to(torch.float32)


class Intervention:
    """A set of forward hooks; use as a context manager (``with ablate(model, v): ...``) or via ``.hooks``."""

    def __init__(self, model, hooks: list[tuple[str, object]], description: str):
        self.model = model
        self.hooks = hooks
        self.description = description
        self._context = None

    def __enter__(self) -> Intervention:
        self._context = self.model.hooks(fwd_hooks=self.hooks)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc)

    def __iter__(self):
        return iter(self.hooks)

    def __repr__(self) -> str:
        return f"Intervention({self.description}, {len(self.hooks)} hooks)"


def _projection_hook(basis: Tensor, alpha: float):
    cache: dict[torch.device, Tensor] = {}

    def hook_fn(activation: Tensor, hook) -> Tensor:
        v = cache.get(activation.device)
        if v is None:
            v = cache[activation.device] = basis.to(activation.device)
        x = activation.float()
        return (x - alpha * (x @ v.T) @ v).to(activation.dtype)

    return hook_fn


def ablate(model, direction_or_basis: Tensor, *, alpha: float = 1.0, layers: Sequence[int] | None = None) -> Intervention:
    """Directional ablation (r <- r - alpha <r, v> v) at resid_pre, attn_out and mlp_out of ``layers`` (default all).

    A 1-D direction need not be unit norm (it is normalized); a ``[k, d_model]``
    basis is orthonormalized and its whole span is removed.
    """
    basis = orthonormal_basis(direction_or_basis, model.cfg.d_model)
    layers = range(model.cfg.n_layers) if layers is None else layers
    fn = _projection_hook(basis, float(alpha))
    hooks = [(hook_name(site, layer), fn) for layer in layers for site in ABLATION_SITES]
    return Intervention(model, hooks, f"ablate rank {basis.shape[0]}, alpha={alpha}")


def add(model, vector: Float[Tensor, "d_model"], *, layer: int, coeff: float = 1.0) -> Intervention:
    """Activation addition: ``resid_pre[layer] += coeff * vector`` at every position (raw vector, not normalized)."""
    vector = torch.as_tensor(vector).detach()
    if vector.shape != (model.cfg.d_model,):
        raise InvalidDirectionError(
            f"vector of shape {tuple(vector.shape)} does not fit the model: expected [{model.cfg.d_model}]"
        )
    if not torch.isfinite(vector).all():
        raise InvalidDirectionError("the vector contains NaN or infinite values")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must lie in [0, {model.cfg.n_layers}), got {layer}")
    shift = (coeff * vector.to(torch.float32)).cpu()
    cache: dict[torch.device, Tensor] = {}

    def hook_fn(activation: Tensor, hook) -> Tensor:
        s = cache.get(activation.device)
        if s is None:
            s = cache[activation.device] = shift.to(activation.device)
        return (activation.float() + s).to(activation.dtype)

    return Intervention(model, [(hook_name("resid_pre", layer), hook_fn)], f"add at layer {layer}, coeff={coeff}")


# ------------------------------------------------------------ weight editing
def _remove_from_rows(weight: Tensor, v: Tensor) -> None:
    """In place: W <- W - v (v^T W) for an output-side weight [d_model, d_in] (so W x has no v component)."""
    w = weight.data.float()
    weight.data.copy_((w - torch.outer(v, v @ w)).to(weight.dtype))


def _remove_from_vectors(matrix: Tensor, v: Tensor) -> None:
    """In place: each row x of [n, d_model] becomes x - (x . v) v."""
    m = matrix.data.float()
    matrix.data.copy_((m - torch.outer(m @ v, v)).to(matrix.dtype))


def orthogonalize_weights(model, direction: Float[Tensor, "d_model"], *, provenance: dict | None = None):
    """A copy of ``model`` whose residual-stream writers cannot write along ``direction``.

    Edits the token embedding (untied from the unembedding first, which stays
    unchanged), positional embedding if any, and each block's attention output
    and MLP output projections with their biases. The copy keeps ``.chat``,
    records the edit in ``.info`` and has ``.save_hf(path)`` to export it as a
    Hugging Face directory with a model card (``README.md``) and the direction in
    ``refusal_lens.json``. ``provenance`` (e.g. ``{"position": -1, "layer": 16,
    "data": {...hashes}}``) is recorded in both.
    """
    basis = orthonormal_basis(direction, model.cfg.d_model)
    if basis.shape[0] != 1:
        raise InvalidDirectionError("orthogonalize_weights takes a single direction")
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
        for block in edited.blocks:
            for writer in (block.attn.o.original_component, block.mlp.out.original_component):
                v_here = v.to(writer.weight.device)
                _remove_from_rows(writer.weight, v_here)
                if writer.bias is not None:
                    writer.bias.data.copy_((writer.bias.float() - (writer.bias.float() @ v_here) * v_here).to(writer.bias.dtype))
    edited.info = dataclasses.replace(model.info, spec=f"{model.info.spec} (orthogonalized)")
    card = {"edit": "orthogonalize_weights", **(provenance or {}), "direction": [float(x) for x in basis[0]]}
    edited.save_hf = lambda path, card=card: save_hf(edited, path, card=card)  # noqa: E731
    return edited
