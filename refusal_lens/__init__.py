"""refusal_lens: refusal directions in chat models, on TransformerLens.

Replicates and extends Arditi et al., "Refusal in Language Models Is Mediated
by a Single Direction" (NeurIPS 2024). See README.md for usage.
"""

from . import stats
from .attribution import head_attribution
from .activations import SITES, activations, eoi_positions, hook_name, mean_activations, projections
from .chat import FORMATS, ChatFormat, ChatFormatError, TemplateCheck, chat_format, detect_family
from .data import ContrastSet, Instruction, load_contrast
from .directions import Directions, InvalidDirectionError, diff_in_means, load_direction
from .generation import generate
from .interventions import Intervention, ablate, add, orthogonalize_weights
from .metrics import ce_loss, is_refusal, kl_last_token, refusal_score
from .models import OFFLINE_MODELS, ORGANISMS, ModelInfo, ModelLoadError, cache_dir, load_model
from .selection import Selection, select_direction

__all__ = [
    "FORMATS", "OFFLINE_MODELS", "ORGANISMS", "SITES",
    "ChatFormat", "ChatFormatError", "ContrastSet", "Directions", "Instruction", "Intervention",
    "InvalidDirectionError", "ModelInfo", "ModelLoadError", "Selection", "TemplateCheck",
    "ablate", "activations", "add", "cache_dir", "ce_loss", "chat_format", "detect_family", "diff_in_means",
    "eoi_positions", "generate", "head_attribution", "hook_name", "is_refusal", "kl_last_token", "load_contrast", "load_direction",
    "load_model", "mean_activations", "orthogonalize_weights", "projections", "refusal_score",
    "select_direction", "stats",
]
