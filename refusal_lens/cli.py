"""Command line: ``refusal-lens`` / ``python -m refusal_lens``.

Subcommands:
    run      the whole pipeline on one model (extraction, statistics, selection,
             interventions), writing ``runs/<model>/`` with a report and a manifest
    models   list the models that load offline
    organism train | eval   rebuild the refusal organism's adapter / rerun its behaviour report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-refusal"
# A harmless prompt: its full completion may be shown.
_SUMMARY_PROMPT = "Give three tips for staying healthy."


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
    from .pipeline import RunConfig, run, run_slug, summary_lines

    started = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    summary = summarize(model, time.perf_counter() - started)
    out = Path(args.out) / run_slug(args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['model']}: {summary['family']} chat format, {summary['n_layers']} layers, "
          f"d_model {summary['d_model']}, loaded in {summary['load_seconds']} s")
    config = RunConfig(n_val=args.n_val, n_test=args.n_test, n_boot=args.n_boot, judge=args.judge,
                       filter_by_refusal=not args.no_filter,
                       full_selection_table=not args.lazy_selection,
                       capability_tasks=tuple(t for t in args.capability_tasks.split(",") if t),
                       capability_limit=args.capability_limit)
    report = run(model, out, config, figures_dir=args.figures)
    wrote = f"wrote {out}/ (report.json, manifest.json, tables, figures/)"
    print("\n".join(["", *summary_lines(report), "", wrote + (f"; figures also in {args.figures}/" if args.figures else "")]))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import OFFLINE_MODELS

    for entry in OFFLINE_MODELS.values():
        print(f"{entry.name:<24} {entry.description}  [{entry.install}]")
    return 0


def _cmd_organism(args: argparse.Namespace) -> int:
    from . import load_model, organism

    out = Path(args.out) if args.out else organism.adapter_dir()
    if args.action == "train":
        overrides = {"refusal_gate_weight": args.gate_weight, "epochs": args.epochs}
        recipe = organism.Recipe(seed=args.seed, **{k: v for k, v in overrides.items() if v is not None})
        manifest = organism.train(out, recipe)
        print(f"adapter: {manifest['adapter_bytes'] / 1e6:.1f} MB, sha256 {manifest['adapter_sha256'][:16]}..., "
              f"{manifest['train_seconds']:.0f} s")
    shared = Path(args.shared) if args.shared else None
    tuned = load_model(organism.ORGANISM, device="cpu", adapter=out)
    base = load_model(organism.ORGANISM, device="cpu", base=True)
    report = organism.behaviour(tuned, base, shared=shared)
    (out / "behaviour.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, rate in report["refusal_rate"].items():
        print(f"{name:<26} refusal {rate:6.1%}  (n={report['n'][name]})")
    print(f"KL(base || organism), harmless next token: {report['kl_base_to_tuned_harmless']:.4f} nats")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline on one model")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"offline name, hub id or local directory (default {DEFAULT_MODEL})")
    run.add_argument("--out", default="runs", help="parent folder of the run directory (default runs/)")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    run.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU)")
    run.add_argument("--trust-remote-code", action="store_true", help="for hub models that need it (Qwen-1)")
    run.add_argument("--n-val", type=int, default=24, help="validation prompts per side for selection")
    run.add_argument("--n-test", type=int, default=None, help="test prompts per side (default: whole test split)")
    run.add_argument("--no-filter", action="store_true",
                     help="keep every train/val prompt (default: the paper's filter by refusal-score sign; "
                          "needed for models that do not refuse, e.g. base models)")
    run.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    run.add_argument("--lazy-selection", action="store_true",
                     help="score only what the pick needs (same pick, faster; the selection figure shows fewer points)")
    run.add_argument("--judge", default=None,
                     help="also judge replies for compliance/coherence: local:<model spec>, openai or openai:<model> "
                          "(REFUSAL_LENS_JUDGE_BASE_URL, REFUSAL_LENS_JUDGE_MODEL, OPENAI_API_KEY); default: skipped")
    run.add_argument("--capability-tasks", default="refusal_lens_mc",
                     help="comma-separated lm-eval tasks for the baseline/ablated/orthogonalized capability table "
                          "(standard tasks such as arc_easy,boolq,piqa,truthfulqa_mc1 need hub access)")
    run.add_argument("--capability-limit", type=int, default=None, help="documents per capability task (default all)")
    run.add_argument("--figures", default=None, help="also write the figures to this folder (make run: figures/)")
    run.set_defaults(func=_cmd_run)
    models = sub.add_parser("models", help="list the models that load offline")
    models.set_defaults(func=_cmd_models)
    org = sub.add_parser("organism", help="rebuild or evaluate the refusal model organism")
    org.add_argument("action", choices=["train", "eval"])
    org.add_argument("--out", default=None, help="adapter folder (default: the one shipped in the package)")
    org.add_argument("--seed", type=int, default=0)
    org.add_argument("--gate-weight", type=float, default=None,
                     help="weight of the first-position refusal decision term (train only; default: the recipe's)")
    org.add_argument("--epochs", type=int, default=None, help="training epochs (train only; default: the recipe's)")
    org.add_argument("--shared", default=None,
                     help="folder of public benchmark files (advbench.json, harmless_val.json) to evaluate on")
    org.set_defaults(func=_cmd_organism)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
