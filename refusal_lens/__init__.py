"""refusal_lens: refusal directions in chat models, on TransformerLens.

Replicates and extends Arditi et al., "Refusal in Language Models Is Mediated
by a Single Direction" (NeurIPS 2024). See README.md for usage.
"""

from . import stats
from .activations import SITES, activations, eoi_positions, hook_name, mean_activations, projections
from .chat import FORMATS, ChatFormat, ChatFormatError, TemplateCheck, chat_format, detect_family
from .directions import Directions, InvalidDirectionError, diff_in_means, load_direction
from .models import OFFLINE_MODELS, ModelInfo, ModelLoadError, cache_dir, load_model

__all__ = [
    "FORMATS",
    "OFFLINE_MODELS",
    "SITES",
    "ChatFormat",
    "ChatFormatError",
    "Directions",
    "InvalidDirectionError",
    "ModelInfo",
    "ModelLoadError",
    "TemplateCheck",
    "activations",
    "cache_dir",
    "chat_format",
    "detect_family",
    "diff_in_means",
    "eoi_positions",
    "hook_name",
    "load_direction",
    "load_model",
    "mean_activations",
    "projections",
    "stats",
]
