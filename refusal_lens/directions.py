"""Candidate refusal directions: difference in means, per position and layer.

``diff_in_means`` returns the paper's candidates r[p, l] = mean(harmful) -
mean(harmless) at every end-of-instruction position p and layer l, in float64.
A candidate whose norm is (numerically) zero carries no direction: at
``resid_pre`` of layer 0 every prompt ends with the same template tokens, so
both means are the same embedding. Such candidates are marked invalid in
``Directions.valid`` and never normalized into NaNs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from .chat import check_instructions
from .manifest import text_hash
from .models import Model
from .streaming import mean_activations

# A candidate is invalid when its norm is below this fraction of the mean activations' norm.
_ZERO_NORM_RTOL = 1e-8
_METADATA_KEY = "refusal_lens"


class InvalidDirectionError(ValueError):
    """A direction that cannot be used: zero norm, NaN, or the wrong width."""


def as_vector(vector: Tensor, d_model: int, *, name: str = "the direction") -> Float[Tensor, " d_model"]:
    """``vector`` as a float64 CPU tensor ``[d_model]``, or :class:`InvalidDirectionError` naming what is wrong."""
    vector = torch.as_tensor(vector).detach()
    if vector.shape != (d_model,):
        raise InvalidDirectionError(f"{name} has shape {tuple(vector.shape)}, which does not fit the model: expected "
                                    f"[{d_model}] (d_model); a different width means it comes from another model")
    vector = vector.to(torch.float64).cpu()
    if not torch.isfinite(vector).all():
        raise InvalidDirectionError(f"{name} contains NaN or infinite values")
    return vector


def unit_direction(direction: Tensor, d_model: int, *, name: str = "the direction") -> Float[Tensor, " d_model"]:
    """``direction / |direction|`` in float64 on CPU, sign kept; refuses a wrong width, NaN/inf and the zero vector."""
    vector = as_vector(direction, d_model, name=name)
    norm = vector.norm()
    if norm == 0:
        raise InvalidDirectionError(f"{name} is the zero vector; it has no direction")
    return vector / norm


@dataclass
class Directions:
    """Candidate directions with their provenance.

    Attributes:
        vectors: ``[pos, layer, d_model]`` float64 raw difference-in-means vectors
            (not normalized; their norm is meaningful for activation addition).
        positions: negative offsets from the prompt end, one per ``pos``.
        layers: layer numbers, one per ``layer``.
        hook: activation site, e.g. ``"resid_pre"``.
        model: the model spec the directions come from.
        metadata: data hashes, prompt counts and anything else worth keeping.
        valid: ``[pos, layer]`` bool, False where the candidate has (numerically) zero norm.
    """

    vectors: Float[Tensor, "pos layer d_model"]
    positions: list[int]
    layers: list[int]
    hook: str
    model: str
    metadata: dict = field(default_factory=dict)
    valid: Bool[Tensor, "pos layer"] | None = None

    def __post_init__(self) -> None:
        if self.vectors.ndim != 3 or self.vectors.shape[:2] != (len(self.positions), len(self.layers)):
            raise ValueError(
                f"vectors of shape {tuple(self.vectors.shape)} do not match {len(self.positions)} positions "
                f"x {len(self.layers)} layers x d_model"
            )
        if not torch.isfinite(self.vectors).all():
            raise InvalidDirectionError("direction vectors contain NaN or infinite values")
        if self.valid is None:
            self.valid = self.vectors.norm(dim=-1) > 0

    @property
    def d_model(self) -> int:
        return self.vectors.shape[-1]

    def index(self, position: int, layer: int) -> tuple[int, int]:
        """Tensor indices of a (position offset, layer number) pair."""
        if position not in self.positions or layer not in self.layers:
            raise KeyError(f"no candidate at position {position}, layer {layer}; have positions "
                           f"{self.positions} and layers {self.layers[0]}..{self.layers[-1]}")
        return self.positions.index(position), self.layers.index(layer)

    def subset(self, *, positions: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> Directions:
        """The candidates at some positions and/or layers only (same metadata)."""
        positions = self.positions if positions is None else [int(p) for p in positions]
        layers = self.layers if layers is None else [int(l) for l in layers]
        p_index = [self.index(p, self.layers[0])[0] for p in positions]
        l_index = [self.index(self.positions[0], l)[1] for l in layers]
        grid = (torch.tensor(p_index)[:, None], torch.tensor(l_index)[None, :])
        return replace(self, vectors=self.vectors[grid], positions=positions, layers=layers,
                                   valid=self.valid[grid])

    def valid_layers(self, position: int) -> list[int]:
        """The layers whose candidate at ``position`` has a direction (non-zero norm)."""
        p = self.positions.index(position)
        return [layer for l, layer in enumerate(self.layers) if self.valid[p, l]]

    def unit(self) -> Float[Tensor, "pos layer d_model"]:
        """Unit-norm candidates; invalid (zero-norm) candidates are zero vectors, see ``valid``."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        return torch.where(self.valid[..., None], self.vectors / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)

    def direction(self, position: int, layer: int, *, unit: bool = True) -> Float[Tensor, " d_model"]:
        """One candidate's unit direction (float64); raises for an invalid one.

        A *direction* is unit norm (what ablation removes); a *vector* is the raw difference in means
        (what addition adds): :meth:`vector`. ``unit=False`` is the deprecated spelling of :meth:`vector`.
        """
        if not unit:
            warnings.warn("Directions.direction(unit=False) is deprecated; use Directions.vector(position, layer)",
                          DeprecationWarning, stacklevel=2)
            return self.vector(position, layer)
        vector = self.vector(position, layer)
        return vector / vector.norm()

    def vector(self, position: int, layer: int) -> Float[Tensor, " d_model"]:
        """One candidate's raw difference-in-means vector (float64, a copy); raises for an invalid one."""
        p, l = self.index(position, layer)
        if not self.valid[p, l]:
            raise InvalidDirectionError(
                f"the candidate at position {position}, layer {layer} has zero norm (the harmful and harmless "
                "means coincide there, e.g. resid_pre of layer 0); pick another layer"
            )
        return self.vectors[p, l].clone()

    def cosine_matrix(self, position: int = -1) -> Float[Tensor, "layer layer"]:
        """Cosine similarity between the candidates of every pair of layers at one position (float64).

        Entries involving an invalid candidate are NaN, and a warning names those layers.
        """
        p = self.positions.index(position)
        unit = self.unit()[p]
        cos = unit @ unit.T
        invalid = ~self.valid[p]
        if invalid.any():
            warnings.warn(
                f"layers {[self.layers[i] for i in invalid.nonzero().flatten().tolist()]} have zero-norm "
                f"candidates at position {position}; their cosines are NaN",
                stacklevel=2,
            )
            cos[invalid, :] = float("nan")
            cos[:, invalid] = float("nan")
        return cos

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file with the vectors, validity mask and JSON metadata in its header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "positions": self.positions, "layers": self.layers, "hook": self.hook,
            "model": self.model, "metadata": self.metadata,
        }
        save_file(
            {"vectors": self.vectors.contiguous(), "valid": self.valid.to(torch.uint8).contiguous()},
            str(path),
            metadata={_METADATA_KEY: json.dumps(header, default=str)},
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Directions:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(_METADATA_KEY)
        if header is None:
            raise ValueError(f"{path} was not written by Directions.save (no {_METADATA_KEY!r} metadata)")
        tensors = load_file(str(path))
        info = json.loads(header)
        return cls(tensors["vectors"], info["positions"], info["layers"], info["hook"], info["model"],
                   info["metadata"], tensors["valid"].bool())


def diff_in_means(
    model: Model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
    system: str | None = None,
) -> Directions:
    """Difference-in-means candidates: mean over ``harmful`` minus mean over ``harmless`` (float64).

    Both lists are instructions (the model's chat format wraps them). Use the
    training split here and held-out prompts for statistics.
    """
    harmful, harmless = check_instructions(harmful, model.chat), check_instructions(harmless, model.chat)
    overlap = set(harmful) & set(harmless)
    if overlap:
        raise ValueError(f"{len(overlap)} prompt(s) are in both sets, e.g. {next(iter(overlap))[:60]!r}")
    kwargs = dict(positions=positions, layers=layers, hook=hook, batch_size=batch_size, system=system)
    mean_harmful = mean_activations(model, harmful, **kwargs)
    mean_harmless = mean_activations(model, harmless, **kwargs)
    vectors = mean_harmful - mean_harmless
    scale = torch.maximum(mean_harmful.norm(dim=-1), mean_harmless.norm(dim=-1))
    valid = vectors.norm(dim=-1) > _ZERO_NORM_RTOL * scale
    n_eoi = len(model.chat.eoi_tokens)
    return Directions(
        vectors=vectors,
        positions=list(range(-n_eoi, 0)) if positions is None else [int(p) for p in positions],
        layers=list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers],
        hook=hook,
        model=model.info.spec,
        metadata={
            "harmful_sha256": text_hash(harmful), "harmless_sha256": text_hash(harmless),
            "n_harmful": len(harmful), "n_harmless": len(harmless),
            "chat_family": model.chat.family, "system": system, "dtype": model.info.dtype,
        },
        valid=valid,
    )


def load_direction(path: str | Path, model, *, normalize: bool = True) -> Float[Tensor, " d_model"]:
    """Load an external direction vector and return it as a float32 unit vector of the model's width
    (``normalize=False``: the vector as stored, in float64, e.g. a raw difference in means for addition).

    Accepts ``.pt``/``.pth`` (read with ``weights_only=True``), ``.safetensors`` and
    ``.npy``/``.npz``, holding one vector (``[d_model]`` or ``[1, d_model]``) or a dict
    with exactly one tensor (or a ``"direction"`` entry).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        loaded = load_file(str(path))
    elif suffix in (".npy", ".npz"):
        array = np.load(path, allow_pickle=False)
        loaded = dict(array) if suffix == ".npz" else array
    else:
        raise ValueError(f"unsupported direction file {path.name!r}: use .pt, .safetensors, .npy or .npz")
    if isinstance(loaded, dict):
        if "direction" in loaded:
            loaded = loaded["direction"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise ValueError(f"{path.name} holds {sorted(loaded)}; store one tensor or a 'direction' entry")
    vector = torch.as_tensor(loaded).squeeze()
    if vector.ndim != 1:
        raise InvalidDirectionError(f"{path.name} holds a tensor of shape {tuple(vector.shape)}; expected one vector")
    if normalize:
        return unit_direction(vector, model.cfg.d_model, name=path.name).to(torch.float32)
    return as_vector(vector, model.cfg.d_model, name=path.name)
