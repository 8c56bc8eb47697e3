"""Command line: ``refusal-lens`` / ``python -m refusal_lens``.

Subcommands:
    run           the main job on one model (extraction, statistics, selection, interventions), writing
                  ``runs/<model>/`` with a report and a manifest; its options are ``RunConfig``'s fields
    over-refusal  the over-refusal study against that run's direction; options: ``OverRefusalConfig``'s fields
    export        orthogonalize a model against a direction file and save it as a Hugging Face folder
    models   list the models that load offline
    organism train | eval   rebuild the refusal organism's adapter / rerun its behaviour report
    frontier the refusal/KL frontier of a run (per-layer ablation weights searched with Optuna), writing
             ``runs/<model>/frontier/``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .options import add_options, from_args, option

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


@dataclass(frozen=True)
class ModelOptions:
    """How ``refusal-lens run`` and ``over-refusal`` load the model (:func:`refusal_lens.load_model`)."""

    model: str = option(DEFAULT_MODEL, "offline name, hub id or local directory")
    chat: str | None = option(None, "chat-format family (e.g. llama3, gemma2, mistral; none: detected)")
    device: str | None = option(None, "cpu, cuda, ... (none: cuda when available)")
    dtype: str | None = option(None, "float32, bfloat16, float16 (none: float32 on CPU)")
    trust_remote_code: bool = option(False, "run the checkpoint's own modelling code (hub models that need it)")
    out: str = option("runs", "parent folder of the run folder runs/<model>/")


def _load(options: ModelOptions):
    """The model, its printed one-line summary, and its run folder (``summary.json`` written there)."""
    import transformer_lens.model_bridge  # noqa: F401  (imported first so load_seconds excludes imports)

    from .models import load_model
    from .runs import run_slug

    started = time.perf_counter()
    model = load_model(options.model, device=options.device, dtype=options.dtype, chat=options.chat,
                       trust_remote_code=options.trust_remote_code)
    summary = summarize(model, time.perf_counter() - started)
    out = Path(options.out) / run_slug(options.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['model']}: {summary['family']} chat format, {summary['n_layers']} layers, "
          f"d_model {summary['d_model']}, loaded in {summary['load_seconds']} s")
    return model, out


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .pipeline import run
    from .report import summary_lines
    from .selection import SelectionError

    config = from_args(RunConfig, args)  # checked before the model loads
    model, out = _load(from_args(ModelOptions, args))
    try:
        report = run(model, out, config)
    except SelectionError as error:
        print("\n".join(["", *summary_lines(error.report), "", f"selection stopped; wrote {out}/ (report.json, "
                                                               "selection.csv, figures/)"]))
        return 2
    print("\n".join(["", *summary_lines(report), "", f"wrote {out}/ (report.json, manifest.json, tables, figures/)"]))
    return 0


def _cmd_over_refusal(args: argparse.Namespace) -> int:
    from .over_refusal import OverRefusalConfig
    from .pipeline import run_over_refusal
    from .report import over_refusal_lines

    config = from_args(OverRefusalConfig, args)
    model, out = _load(from_args(ModelOptions, args))
    report = run_over_refusal(model, out, config)
    print("\n".join(["", *over_refusal_lines(report), "", f"wrote {out}/over_refusal.json"]))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .directions import InvalidDirectionError
    from .export import InexactEditError, export_orthogonalized

    try:
        out = export_orthogonalized(args.model, args.direction, args.out, layer=args.layer,
                                    force_inexact=args.force_inexact, device=args.device, dtype=args.dtype,
                                    chat=args.chat, trust_remote_code=args.trust_remote_code)
    except (InexactEditError, InvalidDirectionError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"refusal-lens export: {exc}")
        return 2
    record = json.loads((out / "refusal_lens.json").read_text())
    exact = "equals hook ablation" if record["equals_hook_ablation"] else "NOT hook ablation (--force-inexact)"
    print(f"wrote {out}/ ({exact}; residual leak {record['residual_leak']:.1e}; model card README.md)")
    return 0


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="orthogonalize a model against a direction file and save it (HF folder)")
    add = export.add_argument
    add("--model", required=True, help="offline name, hub id or local directory")
    add("--direction", required=True, metavar="FILE",
        help="one [d_model] vector in .pt, .safetensors or .npy (e.g. a run's direction.safetensors)")
    add("--layer", type=int, default=None,
        help="the layer the direction was taken at, for the model card (default: from a run's direction file)")
    add("--out", required=True, help="folder to write (new or empty)")
    add("--force-inexact", action="store_true",
        help="export also where orthogonalized weights are not hook ablation (Gemma 2/3 post-sublayer norms)")
    add("--chat", default=None, help="chat-format family (default: detected)")
    add("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    add("--trust-remote-code", action="store_true", help="for hub models that need it")
    export.set_defaults(func=_cmd_export)


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
    from .config import RunConfig

    run = sub.add_parser("run", help="the main job on one model: directions, selection, interventions")
    add_options(run.add_argument_group("model"), ModelOptions)
    add_options(run.add_argument_group("run (RunConfig)"), RunConfig)
    run.set_defaults(func=_cmd_run)


def _add_over_refusal_parser(sub) -> None:
    from .over_refusal import OverRefusalConfig

    over = sub.add_parser("over-refusal", help="the over-refusal study against a run's refusal direction (reads "
                                                "runs/<model>/direction.safetensors; writes over_refusal.json)")
    add_options(over.add_argument_group("model"), ModelOptions)
    add_options(over.add_argument_group("over-refusal (OverRefusalConfig)"), OverRefusalConfig)
    over.set_defaults(func=_cmd_over_refusal)


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
    _add_over_refusal_parser(sub)
    _add_export_parser(sub)
    sub.add_parser("models", help="list the models that load offline").set_defaults(func=_cmd_models)
    _add_organism_parser(sub)
    _add_frontier_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
