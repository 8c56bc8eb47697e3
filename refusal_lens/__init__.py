"""refusal_lens: refusal directions in chat models, on TransformerLens.

Replicates and extends Arditi et al., "Refusal in Language Models Is Mediated
by a Single Direction" (NeurIPS 2024). ``import refusal_lens as rl`` gives every
public function and class below, and the submodules ``rl.stats``, ``rl.plots``,
``rl.attribution``, ``rl.subspace``, ``rl.suffix``, ``rl.base_vs_chat``,
``rl.metrics``, ``rl.selection``, ``rl.judge``, ``rl.runs``, ``rl.pipeline``, ``rl.organism``, ``rl.over_refusal``,
``rl.torch_engine``, ``rl.frontier`` and ``rl.evals``
(imported on first use). The docs' API reference (``docs/api.md``) documents each name in ``__all__`` from
its docstring (a test keeps the two in step).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import (
    attribution,
    base_vs_chat,
    frontier,
    judge,
    metrics,
    organism,
    over_refusal,
    pipeline,
    plots,
    runs,
    selection,
    stats,
    subspace,
    suffix,
    torch_engine,
)
from .attribution import head_attribution
from .base_vs_chat import compare_twins
from .cache import cache_dir
from .chat import FORMATS, ChatFormat, ChatFormatError, TemplateCheck, chat_format, check_instructions, detect_family
from .data import ContrastSet, Instruction, load_contrast, load_splits
from .directions import Directions, InvalidDirectionError, diff_in_means, load_direction, unit_direction
from .effects import InterventionEffects, alpha_sweep, intervention_effects
from .export import save_hf
from .frontier import refusal_frontier
from .generation import generate
from .interventions import Intervention, ablate, add
from .metrics import ce_loss, is_refusal, kl_last_token, refusal_by_length, refusal_score
from .models import OFFLINE_MODELS, ORGANISMS, Model, ModelInfo, ModelLoadError, load_model
from .orthogonalize import OrthogonalizationError, orthogonalize_weights
from .over_refusal import false_refusal_direction
from .runs import RunFolder, open_run
from .selection import Selection, SelectionError, random_direction_kl, select_direction
from .streaming import SITES, activations, eoi_positions, hook_name, mean_activations, projections

try:
    __version__ = _version("refusal-lens")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    """``rl.evals`` is imported on first use: it needs lm-evaluation-harness, which is slow to import."""
    if name == "evals":
        import importlib

        return importlib.import_module(".evals", __name__)
    raise AttributeError(f"module 'refusal_lens' has no attribute {name!r}")


__all__ = [
    # loading
    "load_model", "Model", "ModelInfo", "ModelLoadError", "OFFLINE_MODELS", "ORGANISMS", "cache_dir",
    # chat formats
    "ChatFormat", "ChatFormatError", "TemplateCheck", "FORMATS", "chat_format", "detect_family", "check_instructions",
    # data
    "ContrastSet", "Instruction", "load_contrast", "load_splits",
    # activations and directions
    "SITES", "hook_name", "eoi_positions", "mean_activations", "activations", "projections",
    "Directions", "InvalidDirectionError", "diff_in_means", "load_direction", "unit_direction",
    # selection
    "select_direction", "Selection", "SelectionError", "random_direction_kl",
    # interventions and their effects
    "ablate", "add", "Intervention", "orthogonalize_weights", "OrthogonalizationError", "save_hf",
    "intervention_effects", "InterventionEffects", "alpha_sweep",
    # metrics and generation
    "refusal_score", "kl_last_token", "ce_loss", "is_refusal", "refusal_by_length", "generate",
    # run folders
    "open_run", "RunFolder",
    # mechanism
    "head_attribution", "compare_twins",
    # over-refusal
    "false_refusal_direction",
    # the refusal/KL frontier
    "refusal_frontier",
    # submodules
    "attribution", "base_vs_chat", "frontier", "judge", "metrics", "organism", "over_refusal", "pipeline", "plots",
    "runs", "selection", "stats", "subspace", "suffix", "torch_engine",
]
