"""Weight orthogonalization: a copy of a model whose residual-stream writers cannot write along a direction.

The paper's third intervention (its ``get_orthogonalized_matrix``): edit the weights that write to the
residual stream (token embedding, positional embedding, attention output, MLP output, and their biases) so
that no write has a component along ``v``. On architectures whose blocks add their sublayer outputs straight
into the residual stream this is the same model as hook ablation (:func:`~refusal_lens.interventions.ablate`),
and it exports as a plain Hugging Face checkpoint (:func:`~refusal_lens.export.save_hf`).
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


def _remove_from_rows(weight: Tensor, v: Tensor) -> None:
    """In place: W <- W - v (v^T W) for an output-side weight [d_model, d_in] (so W x has no v component)."""
    w = weight.data.float()
    weight.data.copy_((w - torch.outer(v, v @ w)).to(weight.dtype))


def _remove_from_vectors(matrix: Tensor, v: Tensor) -> None:
    """In place: each row x of [n, d_model] becomes x - (x . v) v."""
    m = matrix.data.float()
    matrix.data.copy_((m - torch.outer(m @ v, v)).to(matrix.dtype))


def orthogonalize_weights(
    model: Model, direction: Float[Tensor, " d_model"], *, provenance: dict | None = None
) -> Model:
    """A copy of ``model`` whose residual-stream writers cannot write along ``direction``.

    Edits the token embedding (untied from the unembedding first, which stays
    unchanged), positional embedding if any, and each block's attention output
    and MLP output projections with their biases. The copy keeps ``.chat`` and
    records the edit in ``.info.edit`` (the direction, and ``provenance`` such as
    ``{"position": -1, "layer": 16, "data": {...hashes}}``), which
    ``rl.save_hf(edited, path)`` writes to ``refusal_lens.json`` and a model card.
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
                    writer.bias.data.copy_(
                        (writer.bias.float() - (writer.bias.float() @ v_here) * v_here).to(writer.bias.dtype)
                    )
    card = {"edit": "orthogonalize_weights", **(provenance or {}), "direction": [float(x) for x in basis[0]]}
    edited.info = dataclasses.replace(model.info, spec=f"{model.info.spec} (orthogonalized)", edit=card)
    return edited
