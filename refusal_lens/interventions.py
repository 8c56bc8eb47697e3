"""Interventions on the refusal direction as hooks: directional ablation and activation addition.

* ``ablate(model, v)`` projects the unit direction (or an orthonormal basis)
  out of every residual-stream write, as the paper does: at ``resid_pre`` of
  every layer and at every attention and MLP output, all positions:
  ``x <- x - alpha * (x . v) v``.
* ``add(model, r, layer=l)`` adds the raw vector ``alpha * r`` at ``resid_pre`` of
  one layer, all positions (``alpha=-1``: the paper's subtraction).

``alpha`` is the one name for an intervention's strength: the share of the component removed by ablation, the
multiple of the vector added by addition.

``ablate`` and ``add`` return an :class:`Intervention`: a context manager that
removes its hooks on exit, also when the body raises, and whose ``.hooks`` can
be passed to ``rl.generate(..., hooks=...)`` or ``model.hooks(...)``. Maths run
in float32 on the activation's device and the result is cast back, so bf16/fp16
models lose nothing to the projection.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .directions import InvalidDirectionError, as_vector
from .models import Model
from .streaming import hook_name

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


def orthonormal_basis(direction_or_basis: Tensor, d_model: int) -> Float[Tensor, "k d_model"]:
    """A float32 orthonormal basis ``[k, d_model]`` for a direction ``[d_model]`` or the span of ``[k, d_model]``
    rows."""
    basis = torch.as_tensor(direction_or_basis).detach()
    if basis.ndim != 2:
        basis = as_vector(basis, d_model)[None]
    elif basis.shape[1] != d_model:
        raise InvalidDirectionError(f"a basis of shape {tuple(basis.shape)} does not fit the model: expected "
                                    f"[k, {d_model}] (k directions of width d_model)")
    basis = torch.stack([as_vector(row, d_model, name=f"basis row {i}") for i, row in enumerate(basis)])
    q, r = torch.linalg.qr(basis.T)  # columns of q span the rows of basis
    rank = int((r.diagonal().abs() > 1e-10 * basis.norm(dim=1).max().clamp_min(1e-300)).sum())
    if rank < basis.shape[0]:
        raise InvalidDirectionError(
            f"the {basis.shape[0]} direction(s) span only {rank} dimension(s): drop zero or dependent vectors"
        )
    return q.T.contiguous().to(torch.float32)


class Intervention:
    """A set of forward hooks; use as a context manager (``with ablate(model, v): ...``) or via ``.hooks``."""

    def __init__(self, model: Model, hooks: list[tuple[str, object]], description: str):
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


def ablate(
    model: Model, direction_or_basis: Tensor, *, alpha: float = 1.0, layers: Sequence[int] | None = None
) -> Intervention:
    """Directional ablation (r <- r - alpha <r, v> v) at resid_pre, attn_out and mlp_out of ``layers`` (default all).

    A 1-D direction need not be unit norm (it is normalized); a ``[k, d_model]``
    basis is orthonormalized and its whole span is removed.
    """
    basis = orthonormal_basis(direction_or_basis, model.cfg.d_model)
    layers = range(model.cfg.n_layers) if layers is None else layers
    fn = _projection_hook(basis, float(alpha))
    hooks = [(hook_name(site, layer), fn) for layer in layers for site in ABLATION_SITES]
    return Intervention(model, hooks, f"ablate rank {basis.shape[0]}, alpha={alpha}")


def add(model: Model, vector: Float[Tensor, " d_model"], *, layer: int, alpha: float = 1.0,
        coeff: float | None = None) -> Intervention:
    """Activation addition: ``resid_pre[layer] += alpha * vector`` at every position (raw vector, not normalized).

    ``coeff`` is the deprecated name of ``alpha``.
    """
    if coeff is not None:
        warnings.warn("add(coeff=...) is deprecated; use alpha=", DeprecationWarning, stacklevel=2)
        alpha = coeff
    vector = as_vector(vector, model.cfg.d_model, name="the vector")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must lie in [0, {model.cfg.n_layers}), got {layer}")
    shift = (alpha * vector.to(torch.float32)).cpu()
    cache: dict[torch.device, Tensor] = {}

    def hook_fn(activation: Tensor, hook) -> Tensor:
        s = cache.get(activation.device)
        if s is None:
            s = cache[activation.device] = shift.to(activation.device)
        return (activation.float() + s).to(activation.dtype)

    return Intervention(model, [(hook_name("resid_pre", layer), hook_fn)], f"add at layer {layer}, alpha={alpha}")
