"""Run manifests: what produced a set of outputs, written next to them."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

_PACKAGES = ("refusal-lens", "torch", "transformers", "transformer-lens", "lm-eval", "numpy", "pandas")


def versions() -> dict[str, str]:
    """Python and key package versions."""
    found = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def text_hash(texts: Iterable[str]) -> str:
    """SHA-256 of an ordered list of strings (order matters; each string is length-prefixed)."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(out_dir: str | Path, **fields: Any) -> Path:
    """Write ``manifest.json`` in ``out_dir`` with the given fields plus versions and a UTC timestamp."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        **fields,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
