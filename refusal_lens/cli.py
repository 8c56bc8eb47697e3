"""Command line: ``refusal-lens`` / ``python -m refusal_lens``.

Subcommands:
    run      the whole pipeline on one model (extraction, statistics, selection,
             interventions), writing ``runs/<model>/`` with a report and a manifest
    models   list the models that load offline
    organism train | eval   rebuild the refusal organism's adapter / rerun its behaviour report
    frontier the refusal/KL frontier of a run (per-layer ablation weights searched with Optuna), writing
             ``runs/<model>/frontier/``
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
        logits = model(
            batch["input_ids"].to(model.cfg.device), attention_mask=batch["attention_mask"].to(model.cfg.device)
        )
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


def _pick(text: str) -> tuple[int, int]:
    try:
        pos, layer = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pick takes POSITION,LAYER (e.g. -1,16), got {text!r}") from None
    return pos, layer


def _kl_max(text: str) -> float | str:
    return text if text.startswith("null:") else float(text)


def _cmd_run(args: argparse.Namespace) -> int:
    import transformer_lens.model_bridge  # noqa: F401  (imported first so load_seconds excludes imports)

    from .models import load_model
    from .pipeline import RunConfig, run
    from .report import summary_lines
    from .runs import run_slug
    from .selection import SelectionError

    started = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype, chat=args.chat,
                       trust_remote_code=args.trust_remote_code)
    summary = summarize(model, time.perf_counter() - started)
    out = Path(args.out) / run_slug(args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['model']}: {summary['family']} chat format, {summary['n_layers']} layers, "
          f"d_model {summary['d_model']}, loaded in {summary['load_seconds']} s")
    config = RunConfig(
        harmful=args.harmful, harmless=args.harmless, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
        n_boot=args.n_boot, judge=args.judge, filter_by_refusal=not args.no_filter, kl_max=args.kl_max,
        fallback=args.fallback, max_new_tokens=args.max_new_tokens, full_selection_table=not args.lazy_selection,
        capability_tasks=tuple(t for t in args.capability_tasks.split(",") if t),
        capability_limit=args.capability_limit, static_figures=not args.html_only, direction=args.direction,
        direction_layer=args.layer, pick=args.pick, over_refusal=not args.no_over_refusal)
    try:
        report = run(model, out, config)
    except SelectionError:
        report = json.loads((out / "report.json").read_text())
        print("\n".join(["", *summary_lines(report), "", f"selection stopped; wrote {out}/ (report.json, "
                                                         "selection.csv, figures/)"]))
        return 2
    print("\n".join(["", *summary_lines(report), "", f"wrote {out}/ (report.json, manifest.json, tables, figures/)"]))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import OFFLINE_MODELS

    for entry in OFFLINE_MODELS.values():
        print(f"{entry.name:<24} {entry.description}  [{entry.install}]")
    return 0


def _cmd_organism(args: argparse.Namespace) -> int:
    from . import load_model, organism

    # Never write into the installed package: a new adapter goes to the user cache unless --out names a
    # folder (to update the shipped one, pass --out refusal_lens/data/organism from a source checkout).
    out = Path(args.out) if args.out else organism.default_out_dir(args.action, args.seed)
    adapter = out if args.action == "train" or args.out else None  # eval without --out: the shipped adapter
    if args.action == "train":
        overrides = {"refusal_gate_weight": args.gate_weight, "epochs": args.epochs}
        recipe = organism.Recipe(seed=args.seed, **{k: v for k, v in overrides.items() if v is not None})
        manifest = organism.train(out, recipe)
        print(f"adapter: {manifest['adapter_bytes'] / 1e6:.1f} MB, sha256 {manifest['adapter_sha256'][:16]}..., "
              f"{manifest['train_seconds']:.0f} s")
    shared = Path(args.shared) if args.shared else None
    tuned = load_model(organism.ORGANISM, device="cpu", adapter=adapter)
    base = load_model(organism.ORGANISM, device="cpu", base=True)
    report = organism.behaviour(tuned, base, shared=shared)
    out.mkdir(parents=True, exist_ok=True)
    (out / "behaviour.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, rate in report["refusal_rate"].items():
        print(f"{name:<26} refusal {rate:6.1%}  (n={report['n'][name]})")
    print(f"KL(base || organism), harmless next token: {report['kl_base_to_tuned_harmless']:.4f} nats")
    print(f"wrote {out / 'behaviour.json'}")
    return 0


def _add_run_parser(sub) -> None:
    from .pipeline import RunConfig

    run = sub.add_parser("run", help="run the pipeline on one model")
    defaults = RunConfig()
    add = run.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"offline name, hub id or local directory (default {DEFAULT_MODEL})")
    add("--chat", default=None, help="chat-format family (e.g. llama3, gemma2, mistral); default: detected")
    add("--out", default="runs", help="parent folder of the run directory (default runs/)")
    add("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU)")
    add("--trust-remote-code", action="store_true", help="for hub models that need it (Qwen-1)")
    add("--harmful", default=defaults.harmful,
        help="harmful prompts in the paper's JSON format: a folder with train/val/test files, or files "
             "(comma-separated) to pool and split (default: the built-in refusal-pairs set)")
    add("--harmless", default=defaults.harmless, help="harmless prompts, as --harmful")
    add("--n-train", type=int, default=defaults.n_train, help="train prompts per side (default: all; the paper: 128)")
    add("--n-val", type=int, default=defaults.n_val,
        help=f"validation prompts per side (default {defaults.n_val}; the paper: 32)")
    add("--n-test", type=int, default=defaults.n_test, help="test prompts per side (default: whole test split)")
    add("--no-filter", action="store_true",
        help="keep every train/val prompt (default: the paper's filter by refusal-score sign; needed for models "
             "that do not refuse, e.g. base models)")
    add("--kl-max", type=_kl_max, default=defaults.kl_max,
        help="selection's KL filter in nats (default the paper's 0.1), or null:Q for the Q-quantile of random "
             "directions' KL, fixed before any candidate is scored (e.g. null:0.5)")
    add("--fallback", choices=["lowest-kl"], default=defaults.fallback,
        help="when no candidate passes: lowest-kl takes the lowest-KL candidate with bypass < 0 and induce >= 0 "
             "(default: stop, as the paper's code)")
    add("--pick", type=_pick, default=defaults.pick, metavar="POS,LAYER",
        help="use this candidate of the run's own directions instead of selecting one (write --pick=-1,16: a "
             "value that starts with '-' needs the '=')")
    add("--direction", default=defaults.direction, metavar="FILE",
        help="a direction computed elsewhere (.pt/.safetensors/.npy, e.g. a run's direction.safetensors): skip "
             "extraction and selection; needs --layer")
    add("--layer", type=int, default=defaults.direction_layer, help="with --direction: the layer to add it at")
    add("--max-new-tokens", type=int, default=defaults.max_new_tokens,
        help=f"reply length for refusal verdicts (default {defaults.max_new_tokens}; the paper: 512)")
    add("--n-boot", type=int, default=defaults.n_boot, help="bootstrap resamples")
    add("--lazy-selection", action="store_true",
        help="score only what the pick needs (same pick, faster; the selection figure shows fewer points)")
    add("--judge", default=defaults.judge,
        help="also judge replies for compliance/coherence: local:<model spec>, openai or openai:<model> "
             "(REFUSAL_LENS_JUDGE_BASE_URL, REFUSAL_LENS_JUDGE_MODEL, OPENAI_API_KEY); default: skipped")
    add("--capability-tasks", default=",".join(defaults.capability_tasks),
        help="comma-separated lm-eval tasks for the baseline/ablated/orthogonalized capability table (standard "
             "tasks such as arc_easy,boolq,piqa,truthfulqa_mc1 need hub access; '' skips it)")
    add("--capability-limit", type=int, default=defaults.capability_limit,
        help="documents per capability task (default all)")
    add("--html-only", action="store_true", help="write figures as HTML only (no PNG export)")
    add("--no-over-refusal", action="store_true",
        help="skip the over-refusal step (look-risky refusal on val; above 10%%, a false-refusal vector is selected "
             "and tested and saved as false_refusal.safetensors)")
    run.set_defaults(func=_cmd_run)


def _add_organism_parser(sub) -> None:
    org = sub.add_parser("organism", help="rebuild or evaluate the refusal model organism")
    org.add_argument("action", choices=["train", "eval"])
    org.add_argument("--out", default=None,
                     help="adapter folder to write (train) or evaluate (eval); default: a folder in the user cache "
                          "(train), the shipped adapter with its report written to the cache (eval)")
    org.add_argument("--seed", type=int, default=0)
    org.add_argument("--gate-weight", type=float, default=None,
                     help="weight of the first-position refusal decision term (train only; default: the recipe's)")
    org.add_argument("--epochs", type=int, default=None, help="training epochs (train only; default: the recipe's)")
    org.add_argument("--shared", default=None,
                     help="folder of public benchmark files (advbench.json, harmless_val.json) to evaluate on")
    org.set_defaults(func=_cmd_organism)


def _cmd_frontier(args: argparse.Namespace) -> int:
    from .frontier.run import run_frontier
    from .frontier.search import ChoiceRule
    from .models import load_model
    from .runs import RunFolder, run_slug

    folder = Path(args.run) if args.run else Path("runs") / run_slug(args.model)
    if not (folder / "directions.safetensors").exists():
        print(f"{folder} has no directions.safetensors: run `refusal-lens run --model {args.model}` first, or pass "
              "--run with the run folder")
        return 2
    model = load_model(args.model, device=args.device)
    record = run_frontier(model, RunFolder(folder, folder / "figures"), n_trials=args.trials, seed=args.seed,
                          rule=ChoiceRule(args.rule_metric, args.max_refusal), n_val=args.n_val, n_test=args.n_test,
                          judge_tokens=args.judge_tokens, capability=not args.no_capability, export=not args.no_export,
                          static=not args.html_only)
    chosen = record.get("chosen")
    if chosen:
        test = chosen["test"]
        print(f"{'chosen' if chosen['by_rule'] else 'closest (rule not met)'}: trial {chosen['trial']}, val KL "
              f"{chosen['val']['val_kl']:.3f}, val refusal {chosen['val']['val_refusal_rate']:.1%}; test: harmful "
              f"refusal {test['harmful_refusal_rate']:.1%}, harmless refusal {test['harmless_refusal_rate']:.1%}, "
              f"KL {test['harmless_kl']:.3f}")
    return 0


def _add_frontier_parser(sub) -> None:
    front = sub.add_parser("frontier", help="the refusal/KL frontier of a run (runs/<model>/frontier/)")
    add = front.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"offline name, hub id or local directory (default {DEFAULT_MODEL})")
    add("--run", default=None, help="the run folder (default runs/<model>), made by `refusal-lens run`")
    add("--trials", type=int, default=60, help="trial budget of the search (default 60)")
    add("--seed", type=int, default=0, help="sampler seed (default 0)")
    add("--n-val", type=int, default=None, help="val prompts per side (default: the run's)")
    add("--n-test", type=int, default=None, help="test prompts per side (default: the run's)")
    add("--judge-tokens", type=int, default=24, help="greedy reply length for judging the front on val (default 24)")
    add("--rule-metric", choices=["judge", "score"], default="judge",
        help="the chosen point: lowest val KL on the front whose judged refusal rate (judge) or mean refusal score "
             "(score) is <= --max-refusal")
    add("--max-refusal", type=float, default=0.10, help="the rule's threshold (default 0.10)")
    add("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add("--no-capability", action="store_true", help="skip the refusal_lens_mc capability check of the chosen point")
    add("--no-export", action="store_true", help="skip the HF export of the chosen point")
    add("--html-only", action="store_true", help="write the figure as HTML only (no PNG export)")
    front.set_defaults(func=_cmd_frontier)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-lens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    sub.add_parser("models", help="list the models that load offline").set_defaults(func=_cmd_models)
    _add_organism_parser(sub)
    _add_frontier_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
