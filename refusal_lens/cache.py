"""Where refusal_lens keeps what it builds once: dequantized models, tiny organisms, judge verdicts."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "REFUSAL_LENS_CACHE"


def cache_dir() -> Path:
    """Root of refusal_lens's cache: ``$REFUSAL_LENS_CACHE``, else ``$XDG_CACHE_HOME/refusal_lens``, else
    ``~/.cache/refusal_lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "refusal_lens"
