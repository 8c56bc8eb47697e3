"""Weight profiles over depth: which direction is removed, from which residual writers, how strongly, and how.

A :class:`Profile` names a direction (a candidate ``(position, layer)`` of a run's ``directions.safetensors``,
or a fractional layer index that interpolates between the unit candidates of two adjacent layers at one
position, as heretic's ``direction_index`` does), a weight :class:`Kernel` over depth for the attention
writers and one for the MLP writers, a weight for the token embedding (``resid_pre`` of layer 0, which the
paper's ablation also projects), the edit, and whether the direction is first made orthogonal to the
harmless mean at its layer (heretic's ``orthogonalize_direction``).

Edits, for a writer ``x = W h + b`` of block ``l`` with weight ``w_l`` and unit direction ``v``:

* ``"project"``: ``x <- x - w_l (x . v) v``; at weight 1 in every layer (and the embedding) this is the
  paper's directional ablation (:func:`~refusal_lens.interventions.ablate`). The weight edit
  ``W <- (I - w_l v v^T) W`` (bias likewise) is the same map on models without post-sublayer norms.
* ``"norm-preserving"`` (heretic's ``row_normalization = "full"``, after grimjim's biprojected
  abliteration): the rows of ``W`` (one per residual coordinate, as heretic stores ``o_proj`` /
  ``down_proj``) are normalized, the direction is projected out with weight ``w_l``, the rows are
  normalized again and their original norms restored. That is a fixed linear map of the write,
  ``x <- s * x - w_l a (b . x)`` with ``b = v / |W_i|``, ``a = |W_i| v / n_i``, ``s = 1 / n_i`` and ``n_i``
  the row norms after projecting (:func:`norm_preserving_map`), so it runs as a hook during the search
  and as a weight edit for export; heretic stores its rank-3 SVD approximation of the same delta in a
  LoRA adapter, here it is exact. The embedding's rows (one per token) get the same treatment: the
  projection, then each vector's norm restored.

Weights are per layer: ``Kernel(peak_weight, peak_position, floor_weight, width).weights(n_layers)`` is
heretic's kernel: ``peak_weight`` at ``peak_position``, falling linearly to ``floor_weight`` at ``width``
layers away, zero beyond.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..directions import Directions, InvalidDirectionError
from ..models import Model
from ..streaming import hook_name

EDITS = ("project", "norm-preserving")
WRITERS = ("attn", "mlp")


class ProfileError(ValueError):
    """A profile that does not fit the run or the model; the message names the fix."""


@dataclass(frozen=True)
class Kernel:
    """Per-layer weights: ``peak_weight`` at layer ``peak_position`` (fractional), falling linearly to
    ``floor_weight`` at ``width`` layers from it and zero beyond (heretic's ``max_weight``,
    ``max_weight_position``, ``min_weight``, ``min_weight_distance``)."""

    peak_weight: float
    peak_position: float
    floor_weight: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ProfileError(f"a kernel's width must be > 0 layers, got {self.width}")

    def weights(self, n_layers: int) -> Float[np.ndarray, " n_layers"]:
        """The weight of each of ``n_layers`` layers (float64)."""
        distance = np.abs(np.arange(n_layers, dtype=np.float64) - self.peak_position)
        ramp = self.peak_weight + distance / self.width * (self.floor_weight - self.peak_weight)
        return np.where(distance <= self.width, ramp, 0.0)

    @classmethod
    def constant(cls, weight: float, n_layers: int) -> Kernel:
        """The same ``weight`` in every layer."""
        return cls(weight, 0.0, weight, float(max(n_layers, 1)))


@dataclass(frozen=True)
class Profile:
    """One parameterised ablation (see the module docstring).

    Attributes:
        position: the candidates' position offset (e.g. -1).
        direction_index: a layer number; a fractional one interpolates between the unit candidates of
            ``floor(index)`` and ``floor(index) + 1`` and renormalizes.
        attn, mlp: weight kernels for the attention and MLP output writers.
        embed_weight: weight of the edit on the token embedding (``resid_pre`` of layer 0).
        edit: ``"project"`` or ``"norm-preserving"``.
        orthogonalize: make each candidate orthogonal to the harmless mean at its layer first.
    """

    position: int
    direction_index: float
    attn: Kernel
    mlp: Kernel
    embed_weight: float = 1.0
    edit: str = "project"
    orthogonalize: bool = False

    def __post_init__(self) -> None:
        if self.edit not in EDITS:
            raise ProfileError(f"edit must be one of {EDITS}, got {self.edit!r}")

    @classmethod
    def full(cls, position: int, layer: int, n_layers: int) -> Profile:
        """The paper's ablation of candidate ``(position, layer)``: weight 1 everywhere."""
        one = Kernel.constant(1.0, n_layers)
        return cls(position, float(layer), one, one, 1.0, "project", False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Profile:
        fields = {k: record[k] for k in ("position", "direction_index", "embed_weight", "edit", "orthogonalize")}
        return cls(attn=Kernel(**record["attn"]), mlp=Kernel(**record["mlp"]), **fields)


@dataclass(frozen=True)
class Resolved:
    """A profile made concrete for one model: unit direction (float64) and weights per writer and layer."""

    direction: Float[Tensor, " d_model"]
    attn: Float[np.ndarray, " n_layers"]
    mlp: Float[np.ndarray, " n_layers"]
    embed: float
    edit: str

    def writer_weights(self, writer: str) -> np.ndarray:
        return self.attn if writer == "attn" else self.mlp


def profile_direction(directions: Directions, profile: Profile,
                      harmless_means: Float[Tensor, "pos layer d_model"] | None = None) -> Float[Tensor, " d_model"]:
    """The profile's unit direction (float64): the candidate, or the renormalized interpolation between two
    adjacent layers' unit candidates, each first orthogonalized against the harmless mean at its layer when
    ``profile.orthogonalize`` (``harmless_means`` aligned with ``directions``' positions and layers)."""
    if profile.position not in directions.positions:
        raise ProfileError(f"no candidates at position {profile.position}; the run has {directions.positions}")
    if profile.orthogonalize and harmless_means is None:
        raise ProfileError("orthogonalize=True needs harmless_means (rl.mean_activations of harmless train prompts "
                           "at the run's positions and layers)")
    p = directions.positions.index(profile.position)
    low = math.floor(profile.direction_index)
    frac = profile.direction_index - low
    layers = [low] if frac == 0 else [low, low + 1]
    units = []
    for layer in layers:
        if layer not in directions.layers:
            raise ProfileError(f"direction index {profile.direction_index} needs layer {layer}, which the run's "
                               f"directions lack (layers {directions.layers[0]}..{directions.layers[-1]})")
        u = directions.direction(profile.position, layer)
        if profile.orthogonalize:
            g = harmless_means[p, directions.layers.index(layer)].double()
            g = g / g.norm()
            u = u - (u @ g) * g
            u = u / u.norm()
        units.append(u)
    v = units[0] if frac == 0 else torch.lerp(units[0], units[1], frac)
    norm = v.norm()
    if not norm > 1e-12:
        raise InvalidDirectionError(f"the interpolated direction at index {profile.direction_index} is zero")
    return v / norm


def resolve(directions: Directions, profile: Profile, n_layers: int,
            harmless_means: Tensor | None = None) -> Resolved:
    """The profile's direction and per-layer weights for a model of ``n_layers`` layers."""
    return Resolved(profile_direction(directions, profile, harmless_means), profile.attn.weights(n_layers),
                    profile.mlp.weights(n_layers), float(profile.embed_weight), profile.edit)


def _writer(model: Model, layer: int, writer: str):
    block = model.blocks[layer]
    return (block.attn.o if writer == "attn" else block.mlp.out).original_component


def norm_preserving_map(weight: Tensor, v: Tensor, w: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, a, b)``, float32 ``[d_model]`` each, such that the norm-preserving edit of ``weight``
    ``[d_model, d_in]`` with weight ``w`` is ``W' = diag(s) W - w a (b^T W)`` (see the module docstring).

    Rows of zero norm stay zero (``s = 1``, ``a = 0`` there)."""
    W = weight.detach().float()
    v = v.to(W.device, torch.float32)
    norms = W.norm(dim=1)
    live = norms > 0
    safe = torch.where(live, norms, torch.ones_like(norms))
    b = torch.where(live, v / safe, torch.zeros_like(v))
    c = b @ W  # v^T W_normalized, [d_in]
    g = (W @ c) / safe  # W_normalized c, [d_model]
    after = (1 - 2 * w * v * g + (w * v) ** 2 * (c @ c)).clamp_min(1e-30).sqrt()
    s = torch.where(live, 1 / after, torch.ones_like(after))
    a = torch.where(live, safe * v / after, torch.zeros_like(after))
    return s, a, b


def _writer_hook(transform: tuple[Tensor, ...], edit: str, w: float):
    cache: dict[torch.device, tuple[Tensor, ...]] = {}

    def hook_fn(activation: Tensor, hook) -> Tensor:
        on_device = cache.get(activation.device)
        if on_device is None:
            on_device = cache[activation.device] = tuple(t.to(activation.device) for t in transform)
        x = activation.float()
        if edit == "project":
            (v,) = on_device
            out = x - w * (x @ v)[..., None] * v
        else:
            s, a, b = on_device
            out = x * s - w * (x @ b)[..., None] * a
        return out.to(activation.dtype)

    return hook_fn


def _embed_hook(v: Tensor, edit: str, w: float):
    cache: dict[torch.device, Tensor] = {}

    def hook_fn(activation: Tensor, hook) -> Tensor:
        u = cache.get(activation.device)
        if u is None:
            u = cache[activation.device] = v.to(activation.device)
        return _edit_vectors(activation.float(), u, edit, w).to(activation.dtype)

    return hook_fn


def _edit_vectors(x: Tensor, v: Tensor, edit: str, w: float) -> Tensor:
    """Each vector (last axis) projected with weight ``w``; with ``norm-preserving``, its norm then restored."""
    y = x - w * (x @ v)[..., None] * v
    if edit == "norm-preserving":
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    return y


def _transform(model: Model, resolved: Resolved, layer: int, writer: str) -> tuple[Tensor, ...]:
    v = resolved.direction.to(torch.float32)
    if resolved.edit == "project":
        return (v,)
    weight = _writer(model, layer, writer).weight
    return tuple(t.cpu() for t in norm_preserving_map(weight, v, float(resolved.writer_weights(writer)[layer])))


def profile_hooks(model: Model, resolved: Resolved) -> list[tuple[str, object]]:
    """Forward hooks that apply the edit: ``hook_attn_out`` / ``hook_mlp_out`` of every block with a non-zero
    weight, and ``hook_resid_pre`` of layer 0 for the embedding. Maths in float32, cast back."""
    hooks: list[tuple[str, object]] = []
    if resolved.embed != 0:
        hooks.append((hook_name("resid_pre", 0), _embed_hook(resolved.direction.to(torch.float32), resolved.edit,
                                                             resolved.embed)))
    for layer in range(model.cfg.n_layers):
        for writer in WRITERS:
            w = float(resolved.writer_weights(writer)[layer])
            if w != 0:
                hooks.append((hook_name(f"{writer}_out", layer),
                              _writer_hook(_transform(model, resolved, layer, writer), resolved.edit, w)))
    return hooks


def weight_edit_exact(model: Model) -> str | None:
    """``None`` when a weight edit of this architecture equals the hooks, else why not."""
    if any(getattr(block, "ln1_post", None) is not None or getattr(block, "ln2_post", None) is not None
           for block in model.blocks):
        return ("its blocks pass each sublayer's output through a post-sublayer norm (Gemma 2/3), so an edit of the "
                "output projection is not the hook's map; use the hooks")
    pos_embed = getattr(model, "pos_embed", None)
    if pos_embed is not None and hasattr(pos_embed, "original_component"):
        return ("it adds a positional embedding before layer 0, so the embedding's edit would act on the token "
                "embedding alone; use the hooks")
    return None


def apply_profile(model: Model, resolved: Resolved, *, provenance: dict | None = None) -> Model:
    """A copy of ``model`` whose weights carry the edit: the same map as :func:`profile_hooks`.

    The token embedding (untied from the unembedding first) gets the embedding's edit row by row; each
    writer ``W`` and its bias get ``T``, the edit's linear map. Raises :class:`ProfileError` where the weight
    edit is not the hooks' map (:func:`weight_edit_exact`); weights offloaded by accelerate cannot be edited.
    """
    reason = weight_edit_exact(model)
    if reason is not None:
        raise ProfileError(f"apply_profile: a weight edit of {type(model.original_model).__name__} is not exact: "
                           f"{reason}")
    if any(p.device.type == "meta" for p in model.original_model.parameters()):
        raise ProfileError("apply_profile: some weights are offloaded (device_map with disk/CPU offload); load the "
                           "model with every weight in memory, or use the hooks")
    edited = copy.deepcopy(model)
    embed = edited.embed.original_component
    unembed = getattr(getattr(edited, "unembed", None), "original_component", None)
    if unembed is not None and unembed.weight is embed.weight:
        unembed.weight = torch.nn.Parameter(unembed.weight.detach().clone(), requires_grad=False)
    v = resolved.direction.to(torch.float32)
    with torch.no_grad():
        if resolved.embed != 0:
            e = embed.weight
            e.data.copy_(_edit_vectors(e.data.float(), v.to(e.device), resolved.edit, resolved.embed).to(e.dtype))
        for layer in range(edited.cfg.n_layers):
            for writer_name in WRITERS:
                w = float(resolved.writer_weights(writer_name)[layer])
                if w == 0:
                    continue
                writer = _writer(edited, layer, writer_name)
                transform = [t.to(writer.weight.device) for t in _transform(edited, resolved, layer, writer_name)]

                def apply(x: Tensor, transform=transform, w=w) -> Tensor:  # x: [d_model, ...] writes as columns
                    if resolved.edit == "project":
                        (u,) = transform
                        return x - w * torch.outer(u, u @ x) if x.ndim == 2 else x - w * (u @ x) * u
                    s, a, b = transform
                    return (s[:, None] * x - w * torch.outer(a, b @ x) if x.ndim == 2
                            else s * x - w * (b @ x) * a)

                writer.weight.data.copy_(apply(writer.weight.data.float()).to(writer.weight.dtype))
                if writer.bias is not None:
                    writer.bias.data.copy_(apply(writer.bias.data.float()).to(writer.bias.dtype))
    card = {"edit": "refusal_frontier profile", **(provenance or {}), "equals_hooks": True,
            "direction": [float(x) for x in resolved.direction],
            "weights": {"embed": resolved.embed, "attn": resolved.attn.tolist(), "mlp": resolved.mlp.tolist()},
            "weight_edit": resolved.edit}
    edited.info = dataclasses.replace(model.info, spec=f"{model.info.spec} (frontier edit)", edit=card)
    return edited
