"""Run folders: where one model's results live (``runs/<model>/``) and how the main job and notebooks share them.

A run folder holds ``directions.safetensors`` (every candidate), ``selected.json`` (the chosen position and
layer, and the rule that chose it), ``direction.safetensors`` (the chosen raw vector, readable by
``rl.load_direction`` and ``refusal-lens run --direction``), ``false_refusal.safetensors`` when the over-refusal
step picked a false-refusal vector (:mod:`refusal_lens.over_refusal`), tables, ``report.json``, ``manifest.json``
and ``figures/``. ``refusal-lens run`` writes ``runs/<model>/``; notebooks share ``RUNS/<model>/``
(``../runs/notebooks`` by default), so notebook 02's selection feeds notebooks 03-07.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from . import plots
from .directions import Directions
from .models import Model


def run_slug(spec: str) -> str:
    """Folder name for a model spec: hub ids keep org and name, local paths their last part."""
    path = Path(spec)
    name = path.name if path.exists() else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name)


@dataclass(frozen=True)
class RunFolder:
    """One model's run folder and where its figures go (``figures``: ``path / "figures"`` unless redirected)."""

    path: Path
    figures: Path

    def save_figure(self, fig, name: str, *, static: bool = True) -> list[Path]:
        """Write ``figures/<name>.html`` (and a PNG unless ``static=False``) with :func:`refusal_lens.plots.save`."""
        return plots.save(fig, name, self.figures, static=static)

    def save_directions(self, directions: Directions) -> Path:
        return directions.save(self.path / "directions.safetensors")

    def directions(self) -> Directions:
        """Every candidate of the run (``directions.safetensors``)."""
        path = self.path / "directions.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run notebook 01_extract (or `refusal-lens run`) first")
        return Directions.load(path)

    def save_selected(self, pos: int, layer: int, how: str) -> Path:
        """Record the chosen candidate next to ``directions.safetensors`` (read back by :meth:`selected`)."""
        path = self.path / "selected.json"
        path.write_text(json.dumps({"pos": int(pos), "layer": int(layer), "how": how}, indent=2) + "\n")
        return path

    def selected(self) -> tuple[Directions, int, int]:
        """The run's candidates and its selected ``(pos, layer)``, from ``refusal-lens run`` or notebook 02."""
        missing = [name for name in ("directions.safetensors", "selected.json") if not (self.path / name).exists()]
        if missing:
            raise FileNotFoundError(f"{self.path} lacks {', '.join(missing)}: run notebook 02_select (or "
                                    "`refusal-lens run`) for this model first")
        chosen = json.loads((self.path / "selected.json").read_text())
        return self.directions(), int(chosen["pos"]), int(chosen["layer"])

    def save_direction(self, vector: Float[Tensor, " d_model"], *, layer: int, position: int | None,
                       source: str, name: str = "direction") -> Path:
        """A raw (unnormalized) vector as ``<name>.safetensors``, one tensor with its layer, position and source
        in the header, which ``rl.load_direction`` and ``refusal-lens run --direction`` (with ``--layer``) read."""
        path = self.path / f"{name}.safetensors"
        meta = {"layer": str(layer), "position": str(position), "source": source}
        save_file({name: vector.detach().to(torch.float64).cpu().contiguous()}, str(path), metadata=meta)
        return path


def open_run(model: Model | str, runs: str | Path = "runs", *, figures: str | Path | None = None,
             create: bool = True) -> RunFolder:
    """The run folder ``runs/<model>/`` of a loaded model (or a model spec), created unless ``create=False``.

    ``figures`` redirects the figures (e.g. ``"../figures"`` to refresh the committed ones); by default they
    go to ``runs/<model>/figures``.
    """
    spec = model if isinstance(model, str) else model.info.spec
    path = Path(runs) / run_slug(spec)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return RunFolder(path, Path(figures) if figures else path / "figures")
