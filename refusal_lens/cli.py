"""Command line: ``refusal-lens`` / ``python -m refusal_lens``.

Subcommands:
    run      load a model and write ``runs/<model>/summary.json`` with a manifest
             (the full extraction → selection → intervention pipeline lands here
             as those stages are built)
    models   list the models that load offline
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
# A harmless prompt: its full completion may be shown.
_SUMMARY_PROMPT = "Give three tips for staying healthy."


def run_slug(spec: str) -> str:
    """Folder name for a model spec: hub ids keep org and name, local paths their last part."""
    path = Path(spec)
    name = path.name if path.exists() else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name)


def summarize(model, load_seconds: float) -> dict:
    """A short description of a loaded model and its chat format, with the next-token top 5 for a harmless prompt."""
    import torch

    chat = model.chat
    tokenizer = model.tokenizer
    batch = chat.tokenize([_SUMMARY_PROMPT])
    with torch.no_grad():
        logits = model(batch["input_ids"].to(model.cfg.device), attention_mask=batch["attention_mask"].to(model.cfg.device))
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    check = chat.check_tokenizer_template()
    return {
        "model": model.info.spec,
        "source": model.info.source,
        "family": chat.family,
        "dtype": model.info.dtype,
        "device": model.info.device,
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "n_heads": model.cfg.n_heads,
        "d_vocab": model.cfg.d_vocab,
        "n_params": sum(p.numel() for p in model.original_model.parameters()),
        "load_seconds": round(load_seconds, 2),
        "eoi_tokens": [tokenizer.decode([t]) for t in chat.eoi_tokens],
        "refusal_tokens": [tokenizer.decode([t]) for t in chat.refusal_tokens],
        "template_matches_tokenizer": check.matches,
        "template_check": check.detail,
        "probe_prompt": _SUMMARY_PROMPT,
        "probe_top5": [
            {"token": tokenizer.decode([int(i)]), "prob": round(float(p), 4)} for p, i in zip(top.values, top.indices)
        ],
    }


def _cmd_run(args: argparse.Namespace) -> int:
    import transformer_lens.model_bridge  # noqa: F401  (imported first so load_seconds excludes imports)

    from . import load_model
    from .manifest import write_manifest

    started = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - started
    summary = summarize(model, load_seconds)
    out = Path(args.out) / run_slug(args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_manifest(out, model=model.info.__dict__, command=" ".join(sys.argv), stage="load-and-summarize")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print(f"\nwrote {out / 'summary.json'} and {out / 'manifest.json'}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import OFFLINE_MODELS

    for entry in OFFLINE_MODELS.values():
        print(f"{entry.name:<24} {entry.description}  [{entry.install}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline on one model")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"offline name, hub id or local directory (default {DEFAULT_MODEL})")
    run.add_argument("--out", default="runs", help="parent folder of the run directory (default runs/)")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    run.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU)")
    run.set_defaults(func=_cmd_run)
    models = sub.add_parser("models", help="list the models that load offline")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
