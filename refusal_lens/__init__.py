"""refusal_lens: refusal directions in chat models, on TransformerLens.

Replicates and extends Arditi et al., "Refusal in Language Models Is Mediated
by a Single Direction" (NeurIPS 2024). See README.md for usage.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from . import judge, stats
from .attribution import head_attribution
from .activations import SITES, activations, eoi_positions, hook_name, mean_activations, projections
from .chat import FORMATS, ChatFormat, ChatFormatError, TemplateCheck, chat_format, detect_family
from .data import ContrastSet, Instruction, load_contrast, load_splits
from .directions import Directions, InvalidDirectionError, diff_in_means, load_direction
from .generation import generate
from .interventions import Intervention, ablate, add, orthogonalize_weights
from .metrics import ce_loss, is_refusal, kl_last_token, refusal_score
from .models import OFFLINE_MODELS, ORGANISMS, ModelInfo, ModelLoadError, cache_dir, load_model
from .selection import Selection, SelectionError, random_direction_kl, select_direction

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
    "FORMATS", "OFFLINE_MODELS", "ORGANISMS", "SITES",
    "ChatFormat", "ChatFormatError", "ContrastSet", "Directions", "Instruction", "Intervention",
    "InvalidDirectionError", "ModelInfo", "ModelLoadError", "Selection", "TemplateCheck",
    "ablate", "activations", "add", "cache_dir", "ce_loss", "chat_format", "detect_family", "diff_in_means",
    "eoi_positions", "generate", "head_attribution", "hook_name", "is_refusal", "kl_last_token", "load_contrast", "load_direction",
    "load_splits", "SelectionError",
    "load_model", "mean_activations", "orthogonalize_weights", "projections", "refusal_score",
    "judge", "random_direction_kl", "select_direction", "stats",
]
