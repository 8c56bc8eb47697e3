"""Run folders: where one model's results live (``runs/<model>/``) and how the main job and notebooks share them.

A run folder holds ``directions.safetensors`` (every candidate), ``selected.json`` (the chosen position and layer,
and the rule that chose it), ``direction.safetensors`` (the chosen raw vector, readable by ``rl.load_direction`` and
``refusal-lens run --direction``), tables (``<name>.csv``), ``report.json``, ``manifest.json`` and ``figures/``;
``refusal-lens over-refusal`` adds ``over_refusal.json`` and, when it picks a false-refusal vector
(:mod:`refusal_lens.over_refusal`), ``false_refusal.safetensors``. :class:`RunFolder` owns this layout: the steps
hand it results and it names the files. ``refusal-lens run`` writes ``runs/<model>/``; notebooks share
``RUNS/<model>/`` (``../runs/notebooks`` by default), so notebook 02's selection feeds notebooks 03-07.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import plots
from .directions import Directions
from .manifest import write_manifest
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

    @classmethod
    def create(cls, path: str | Path) -> RunFolder:
        """The folder ``path`` (created if absent), with its figures in ``path / "figures"``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, path / "figures")

    def save_table(self, table: pd.DataFrame, name: str, *, index: bool = False) -> Path:
        """``<name>.csv`` (with the row index when ``index``)."""
        path = self.path / f"{name}.csv"
        table.to_csv(path, index=index)
        return path

    def write_json(self, name: str, record: dict) -> Path:
        """``<name>.json``, indented (floats from numpy or torch written as numbers)."""
        path = self.path / f"{name}.json"
        path.write_text(json.dumps(record, indent=2, default=float) + "\n")
        return path

    def write_report(self, report: dict) -> Path:
        return self.write_json("report", report)

    def write_manifest(self, **fields) -> Path:
        """``manifest.json``: the given fields, versions, a timestamp and the folder's files (``outputs``)."""
        return write_manifest(self.path, **fields, outputs=sorted(p.name for p in self.path.iterdir()))

    def update_manifest(self, **fields) -> Path:
        """``manifest.json`` with ``fields`` added to what it holds (a later step's record), versions, timestamp and
        ``outputs`` renewed."""
        path = self.path / "manifest.json"
        held = json.loads(path.read_text()) if path.exists() else {}
        held = {k: v for k, v in held.items() if k not in ("created_utc", "versions", "outputs")}
        return self.write_manifest(**{**held, **fields})

    def direction(self) -> tuple[Float[Tensor, " d_model"], int, int | None]:
        """The run's chosen raw vector (``direction.safetensors``) with its layer and position."""
        path = self.path / "direction.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `refusal-lens run` for this model first")
        with safe_open(str(path), "pt") as file:
            meta = file.metadata()
            vector = file.get_tensor(next(iter(file.keys())))
        position = None if meta["position"] == "None" else int(meta["position"])
        return vector, int(meta["layer"]), position

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
