"""refusal_lens: refusal directions in chat models, on TransformerLens.

Replicates and extends Arditi et al., "Refusal in Language Models Is Mediated
by a Single Direction" (NeurIPS 2024). See README.md for usage.
"""

from .chat import FORMATS, ChatFormat, ChatFormatError, TemplateCheck, chat_format, detect_family
from .models import OFFLINE_MODELS, ModelInfo, ModelLoadError, cache_dir, load_model

__all__ = [
    "FORMATS",
    "OFFLINE_MODELS",
    "ChatFormat",
    "ChatFormatError",
    "ModelInfo",
    "ModelLoadError",
    "TemplateCheck",
    "cache_dir",
    "chat_format",
    "detect_family",
    "load_model",
]
