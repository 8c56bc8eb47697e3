"""The end-to-end run behind ``refusal-lens run``: extraction -> statistics -> selection -> interventions.

Data use: directions from the ``train`` split, selection on the ``val`` split,
every reported number on the held-out ``test`` split, of the built-in
``refusal-pairs`` set or of files in the paper's format (``rl.load_splits``). As
in the paper's pipeline (``filter_train`` / ``filter_val``), train and val keep
only the harmful prompts the model refuses and the harmless ones it answers, by
the sign of the refusal score; the test split is never filtered. Selection
follows the paper's rule unless the config names a deviation (``kl_max="null:q"``,
``fallback="lowest-kl"``); when nothing passes, the run writes what it has and
stops, as the paper's code does. A direction from elsewhere (``direction=``) or
a chosen candidate (``pick=``) skips selection. Writes to ``runs/<model>/``:
``directions.safetensors``, ``direction.safetensors`` (the chosen raw vector),
one CSV per table, ``selected.json``, ``report.json``, ``manifest.json`` and
``figures/``. Replies to harmful prompts are stored only as verdicts (and at most
60 characters in examples).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import Tensor

from . import plots, stats
from .data import ContrastSet, load_splits
from .directions import Directions, diff_in_means, load_direction
from .generation import generate
from .interventions import ablate, add, orthogonalize_weights
from .manifest import file_sha256, write_manifest
from .metrics import ce_loss, is_refusal, kl_last_token, refusal_rate, refusal_score, safe_excerpt
from .selection import SelectionError, random_direction_kl, select_direction


@dataclass(frozen=True)
class RunConfig:
    """Data, sizes, rules and seeds of a run; the defaults are the paper's rules at sizes that finish in
    about 10 minutes on 2 CPU cores for the organism (the paper: 128 train, 32 val, 512 new tokens)."""

    harmful: str | None = None  # files or a folder in the refusal_direction format (rl.load_splits); None: refusal-pairs
    harmless: str | None = None
    n_train: int | None = None  # train prompts per side (None: the whole split)
    n_val: int = 24  # validation prompts per side for selection (the paper-size 32 adds ~2 min on 2 CPU cores)
    n_test: int | None = None  # test prompts per side for behaviour (None: the whole test split)
    filter_by_refusal: bool = True  # the paper's train/val filter by refusal-score sign; False for models that do not refuse
    kl_max: float | str = 0.1  # the selection's KL filter: nats, or "null:q" (rl.select_direction)
    fallback: str | None = None  # None: stop when nothing passes (the paper); "lowest-kl" (rl.select_direction)
    max_new_tokens: int = 48  # the paper: 512 (a GPU recipe); 48 keeps CPU runs short
    n_boot: int = 1000
    full_selection_table: bool = True  # score every candidate for the selection figure; False: only what the pick needs
    seed: int = 0
    batch_size: int = 32
    alphas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)  # ablation strengths to sweep
    n_alpha: int = 32  # harmful test prompts per alpha (refusal score only)
    n_padding_check: int = 8  # prompts for the batched-vs-sequential check
    n_null_directions: int = 16  # random directions whose ablation KL is the null for the KL filter
    judge: str | None = None  # "openai", "openai:<model>" or "local:<model spec>" (rl.judge.get_judge); None: skipped
    capability_tasks: tuple[str, ...] = ("refusal_lens_mc",)  # lm-eval tasks; standard ones need hub access
    capability_limit: int | None = None  # documents per task (None: all)
    static_figures: bool = True  # also export PNGs (kaleido + Chromium); False: HTML only
    direction: str | None = None  # a direction file (rl.load_direction formats): skip extraction and selection
    direction_layer: int | None = None  # the layer whose resid_pre gets ``direction`` added (needed with it)
    pick: tuple[int, int] | None = None  # (position, layer) among the run's own candidates: skip selection


MIN_KEPT_SHARE = 0.5  # the filter may drop at most half of a side before the run refuses to go on


def filter_split(model, split: ContrastSet) -> ContrastSet:
    """``split`` with harmful prompts the model refuses and harmless ones it answers (refusal score > 0 / < 0).

    The paper's train/val filter. Raises when a side loses more than half its prompts: the model
    then does not refuse (or over-refuses), and the few prompts left would be a biased sample.
    """
    kept = split.filter_by_refusal(model)
    for side, before, after in (("harmful", split.harmful, kept.harmful), ("harmless", split.harmless, kept.harmless)):
        if len(after) < MIN_KEPT_SHARE * len(before):
            verdict = "refuses" if side == "harmful" else "answers"
            raise ValueError(
                f"the refusal filter kept {len(after)} of {len(before)} {side} prompts of {split.name}: the model "
                f"{verdict} fewer than half of them by refusal score, so it is not a refusing chat model on this data. "
                "Run without the filter (`refusal-lens run --no-filter`, or RunConfig(filter_by_refusal=False)), "
                "as for a base model."
            )
    return kept


def _rate(replies: list[str]) -> float:
    return round(refusal_rate(replies), 4)


def run_slug(spec: str) -> str:
    """Folder name for a model spec: hub ids keep org and name, local paths their last part."""
    path = Path(spec)
    name = path.name if path.exists() else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name)


def save_selected(out: str | Path, pos: int, layer: int, how: str) -> Path:
    """Record the chosen candidate next to ``directions.safetensors`` (read back by :func:`load_selected`)."""
    path = Path(out) / "selected.json"
    path.write_text(json.dumps({"pos": int(pos), "layer": int(layer), "how": how}, indent=2) + "\n")
    return path


def load_selected(run_dir: str | Path) -> tuple[Directions, int, int]:
    """The directions of a run and its selected ``(pos, layer)``, from ``refusal-lens run`` or notebook 02."""
    run_dir = Path(run_dir)
    missing = [name for name in ("directions.safetensors", "selected.json") if not (run_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} lacks {', '.join(missing)}: run notebook 02_select (or `refusal-lens run`) for this model first"
        )
    chosen = json.loads((run_dir / "selected.json").read_text())
    return Directions.load(run_dir / "directions.safetensors"), int(chosen["pos"]), int(chosen["layer"])


def save_direction(out: str | Path, vector: Tensor, *, layer: int, position: int | None, source: str) -> Path:
    """The chosen raw (unnormalized) vector as ``direction.safetensors``, which ``rl.load_direction`` and
    ``refusal-lens run --direction`` read (with ``--layer``)."""
    path = Path(out) / "direction.safetensors"
    meta = {"layer": str(layer), "position": str(position), "source": source}
    save_file({"direction": vector.detach().to(torch.float64).cpu().contiguous()}, str(path), metadata=meta)
    return path


def _load_data(model, config: RunConfig, step) -> tuple[dict[str, ContrastSet], dict]:
    """The run's train/val/test splits (train capped at ``n_train``), train and val filtered as the paper."""
    splits = load_splits(config.harmful, config.harmless, seed=config.seed)
    if config.n_train is not None:
        train = splits["train"]
        splits["train"] = ContrastSet(train.name, train.harmful[: config.n_train], train.harmless[: config.n_train])
    unfiltered = {name: (len(s.harmful), len(s.harmless)) for name, s in splits.items()}
    if config.filter_by_refusal:
        splits.update({name: filter_split(model, splits[name]) for name in ("train", "val")})
        step("filter")
    data = {name: {"n_harmful": len(s.harmful), "n_harmless": len(s.harmless), **s.hashes(),
                   "before_filter": {"n_harmful": unfiltered[name][0], "n_harmless": unfiltered[name][1]}}
            for name, s in splits.items()}
    return splits, data


def _statistics(model, directions: Directions, train: ContrastSet, harmful_test, harmless_test, config: RunConfig,
                out: Path, figures: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out Cohen's d, cross-layer cosines, batched vs sequential and split-half stability (CSVs + figures)."""
    separability = stats.cohens_d(model, directions, harmful_test, harmless_test, n_boot=config.n_boot,
                                  seed=config.seed, batch_size=config.batch_size)
    separability.to_csv(out / "cohens_d.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer 0 is a known zero-norm candidate; its cosines are NaN
        cosines = stats.layer_cosines(directions, -1)
    cosines.to_csv(out / "layer_cosines_pos-1.csv")
    padding = stats.batched_vs_sequential(model, harmful_test[: config.n_padding_check], batch_size=config.batch_size)
    padding.to_csv(out / "batched_vs_sequential.csv", index=False)
    figures.update(cohens_d=plots.cohens_d(separability), layer_cosines=plots.cosine_heatmap(cosines),
                   batched_vs_sequential=plots.batched_vs_sequential(padding))
    stability = stats.split_half_stability(model, train.harmful_texts, train.harmless_texts, seed=config.seed,
                                           batch_size=config.batch_size)
    stability.to_csv(out / "split_half.csv", index=False)
    return separability, stability


def _null_summary(null_kl: Tensor) -> dict:
    return {"n": len(null_kl), "median": round(float(null_kl.median()), 5),
            "min": round(float(null_kl.min()), 5), "max": round(float(null_kl.max()), 5),
            "share_below_0.1": round(float((null_kl < 0.1).double().mean()), 4),
            "values": [round(float(x), 5) for x in null_kl]}


def run(model, out: str | Path, config: RunConfig = RunConfig(), log=print) -> dict:
    """Run the pipeline on a loaded model and write its outputs to ``out``; returns the report.

    Raises :class:`~refusal_lens.selection.SelectionError` after writing the report, the tables and the
    manifest when no candidate passes the selection rule (the paper's code stops there too).
    """
    if config.direction is not None and config.direction_layer is None:
        raise ValueError("an external direction needs the layer to add it at: pass direction_layer (--layer)")
    if config.direction is not None and config.pick is not None:
        raise ValueError("pass either an external direction (--direction) or a candidate (--pick), not both")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    timings: dict[str, float] = {}

    def step(name: str):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log(f"[{time.perf_counter() - started:6.0f} s] {name} done")

    splits, data = _load_data(model, config, step)
    train, val, test = splits["train"], splits["val"], splits["test"]
    harmful_test, harmless_test = test.harmful_texts[: config.n_test], test.harmless_texts[: config.n_test]
    harmful_val, harmless_val = val.harmful_texts[: config.n_val], val.harmless_texts[: config.n_val]
    report = {"model": asdict(model.info), "config": asdict(config), "data": data, "selected": None}
    if config.direction is not None:
        vector = load_direction(config.direction, model, normalize=False)
        pos, layer, note = None, config.direction_layer, f"given: {config.direction} (--direction, --layer)"
        report["direction_source"] = {"file": str(config.direction), "sha256": file_sha256(config.direction),
                                      "layer": layer}
        null_kl = random_direction_kl(model, harmless_val, n_directions=config.n_null_directions, seed=config.seed,
                                      batch_size=config.batch_size)
        report["kl_random_directions"] = _null_summary(null_kl)
        selected = {"pos": None, "layer": layer, "how": note}
    else:
        directions = diff_in_means(model, train.harmful_texts, train.harmless_texts, batch_size=config.batch_size)
        directions.save(out / "directions.safetensors")
        report["positions"] = directions.positions
        step("extraction")
        separability, stability = _statistics(model, directions, train, harmful_test, harmless_test, config, out,
                                              figures)
        peak = separability[separability.valid].sort_values("d", ascending=False).iloc[0]
        report["cohens_d_peak"] = {"pos": int(peak.pos), "layer": int(peak.layer), "d": round(float(peak.d), 3),
                                   "ci": [round(float(peak.ci_low), 3), round(float(peak.ci_high), 3)]}
        step("statistics")
        selected, failure = _choose_candidate(model, directions, harmful_val, harmless_val, config, out, report, figures)
        step("selection")
        if failure is not None:
            _finish(model, out, report, figures, config, timings, step)
            raise failure
        pos, layer = selected["pos"], selected["layer"]
        vector = directions.direction(pos, layer, unit=False)
        save_selected(out, pos, layer, selected["how"])
        at = lambda table: table[(table.pos == pos) & (table.layer == layer)]  # noqa: E731
        report["cohens_d_selected"] = round(float(at(separability).d.iloc[0]), 3)
        report["split_half_cosine_selected"] = round(float(at(stability).cosine.iloc[0]), 4)
    save_direction(out, vector, layer=layer, position=pos, source=selected["how"])
    report["selected"] = selected
    report.update(_interventions(model, vector, layer, harmful_test, harmless_test, config, out, log))
    sweep = alpha_sweep(model, vector, harmful_test[: config.n_alpha], config.alphas, batch_size=config.batch_size)
    sweep.to_csv(out / "alpha_sweep.csv", index=False)
    report["alpha_sweep"] = sweep.round(4).to_dict(orient="list")
    figures.update(refusal_rates=plots.refusal_rates(report["refusal_rate"]), alpha_sweep=plots.alpha_sweep(sweep))
    step("interventions")
    return _finish(model, out, report, figures, config, timings, step)


def _choose_candidate(model, directions: Directions, harmful_val, harmless_val, config: RunConfig, out: Path,
                      report: dict, figures: dict) -> tuple[dict | None, SelectionError | None]:
    """The candidate to intervene with: ``config.pick``, or the selection rule's; with the selection table,
    figure and KL null in the report. Returns ``(selected, None)`` or ``(None, the SelectionError)``."""
    if config.pick is not None:
        pos, layer = config.pick
        directions.direction(pos, layer)  # raises for a candidate that does not exist or has zero norm
        null_kl = random_direction_kl(model, harmless_val, n_directions=config.n_null_directions, seed=config.seed,
                                      batch_size=config.batch_size)
        report["kl_random_directions"] = _null_summary(null_kl)
        return {"pos": pos, "layer": layer, "how": "given: --pick"}, None
    selection = select_direction(model, directions, harmful_val, harmless_val, kl_max=config.kl_max,
                                 fallback=config.fallback, n_null=config.n_null_directions, n_boot=config.n_boot,
                                 seed=config.seed, batch_size=config.batch_size, full_table=config.full_selection_table)
    selection.table.to_csv(out / "selection.csv", index=False)
    figures["selection"] = plots.selection_scores(selection.table)
    # The KL filter's null: ablating random unit directions on the same val harmless prompts.
    report["kl_random_directions"] = _null_summary(selection.null_kl)
    report["selection_rule"] = {**asdict(selection.thresholds), "rule": selection.rule}
    if selection.best is None:
        report["selection_failed"] = selection.failure_message()
        return None, SelectionError(report["selection_failed"])
    row = selection.best_row
    return {"pos": selection.best[0], "layer": selection.best[1], "bypass": row.bypass, "induce": row.induce,
            "kl": row.kl, "how": selection.rule, "bootstrap_win_rate": selection.win_rate,
            "baseline_scores": selection.baseline}, None


def _finish(model, out: Path, report: dict, figures: dict, config: RunConfig, timings: dict, step) -> dict:
    """Write the figures, ``report.json`` and ``manifest.json``; returns the report."""
    for name, fig in figures.items():
        plots.save(fig, name, out / "figures", static=config.static_figures)
    report["figures"] = sorted(figures)
    step("figures")
    report["seconds"] = timings
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_manifest(out, model=asdict(model.info), data=report["data"], positions=report.get("positions"),
                   seed=config.seed, config=asdict(config), outputs=sorted(p.name for p in out.iterdir()))
    return report


def alpha_sweep(model, direction, harmful, alphas, *, batch_size: int = 32):
    """Mean refusal score on ``harmful`` when ``alpha`` times the direction's component is removed, per alpha."""
    scores = [float(refusal_score(model, harmful, hooks=ablate(model, direction, alpha=a).hooks,
                                  batch_size=batch_size).mean()) for a in alphas]
    return pd.DataFrame({"alpha": list(alphas), "refusal_score": scores})


def _interventions(model, vector: Tensor, layer: int, harmful_test, harmless_test, config: RunConfig, out: Path,
                   log) -> dict:
    """Refusal under ablation, subtraction (coefficient -1, the paper's jailbreak "actadd") and addition;
    KL; CE on the model's own harmless replies (reply tokens only) under each; the orthogonalization check;
    the judge step and the capability table, for one direction (``vector``: the raw vector)."""
    direction = vector / vector.norm()
    gen = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, progress=True)
    hooks = {"ablated": ablate(model, direction).hooks, "subtracted": add(model, vector, layer=layer, coeff=-1.0).hooks,
             "added": add(model, vector, layer=layer).hooks}
    log("interventions: generating replies to harmful test prompts (baseline, ablated, subtracted)")
    harmful = {name: generate(model, harmful_test, hooks=hooks.get(name, ()), **gen)
               for name in ("baseline", "ablated", "subtracted")}
    log("interventions: generating replies to harmless test prompts (baseline, added)")
    harmless = {name: generate(model, harmless_test, hooks=hooks.get(name, ()), **gen) for name in ("baseline", "added")}
    log("interventions: KL and CE on harmless prompts")
    kl = kl_last_token(model, harmless_test, hooks=hooks["ablated"], batch_size=config.batch_size)
    # CE of the model's own replies to harmless prompts, on the reply tokens (full text is fine: harmless).
    answered = [(i, r) for i, r in zip(harmless_test, harmless["baseline"]) if r.strip()]
    ce = {name: round(ce_loss(model, [i for i, _ in answered], [r for _, r in answered], hooks=hooks.get(name, ())), 4)
          for name in ("baseline", "ablated", "subtracted", "added")} if answered else \
        {"skipped": "every baseline reply to the harmless test prompts is empty: no reply tokens to score"}
    log("interventions: weight orthogonalization and capability table")
    probe = model.chat.tokenize(harmless_test[:8]).to(model.cfg.device)
    edited = orthogonalize_weights(model, direction)
    with torch.no_grad():
        with model.hooks(fwd_hooks=hooks["ablated"]):
            hooked = model(probe["input_ids"], attention_mask=probe["attention_mask"])
        ortho_diff = float((edited(probe["input_ids"], attention_mask=probe["attention_mask"]) - hooked).abs().max())
    capability = _capability_step({"baseline": (model, ()), "ablated": (model, hooks["ablated"]),
                                   "orthogonalized": (edited, ())}, config, out)
    del edited
    judged = _judge_step(config, out, {
        **{f"harmful/{name}": (harmful_test, replies) for name, replies in harmful.items()},
        **{f"harmless/{name}": (harmless_test, replies) for name, replies in harmless.items()}})
    return {
        "refusal_rate": {**{f"harmful_{name}": _rate(r) for name, r in harmful.items()},
                         **{f"harmless_{name}": _rate(r) for name, r in harmless.items()}},
        "n_test": {"harmful": len(harmful_test), "harmless": len(harmless_test)},
        "kl_ablation_harmless_mean": round(float(kl.mean()), 5),
        "ce_harmless_replies": {**ce, "n_replies": len(answered)},
        "orthogonalized_vs_hooks_max_logit_diff": ortho_diff,
        "judge": judged,
        "capability": capability,
        "examples": {
            **{f"harmful_{name}": [{"instruction": i, "reply_first_60": safe_excerpt(r), "refused": is_refusal(r)}
                                   for i, r in zip(harmful_test[:3], harmful[name][:3])]
               for name in ("ablated", "subtracted")},
            "harmless_added": [{"instruction": i, "reply": r, "refused": is_refusal(r)}
                               for i, r in zip(harmless_test[:3], harmless["added"][:3])],
        },
    }


def _judge_step(config: RunConfig, out: Path, conditions: dict) -> dict:
    """Compliance/coherence verdicts per condition (``judge.csv``: verdicts only), or why it was skipped."""
    from .judge import condition_table, get_judge, judge_conditions

    if not config.judge:
        return {"skipped": "no judge configured: pass --judge local:<model> or --judge openai (with "
                           "REFUSAL_LENS_JUDGE_MODEL, REFUSAL_LENS_JUDGE_BASE_URL and an API key in the environment)"}
    frame = judge_conditions(get_judge(config.judge), conditions, harmful=[c for c in conditions if c.startswith("harmful")])
    frame.to_csv(out / "judge.csv", index=False)
    return {"judge": frame.judge.iloc[0], "prompt": frame.prompt.iloc[0],
            "table": condition_table(frame).round(4).to_dict(orient="records")}


def _capability_step(conditions: dict, config: RunConfig, out: Path) -> dict:
    """lm-eval accuracy per condition (``capability.csv``), with the tasks that could not run and why."""
    try:
        from . import evals
    except ImportError as error:
        return {"skipped": {task: str(error) for task in config.capability_tasks}}
    table, skipped = evals.capability_table(conditions, config.capability_tasks, limit=config.capability_limit,
                                            batch_size=config.batch_size)
    if len(table):
        table.to_csv(out / "capability.csv", index=False)
    return {"table": table.round(4).to_dict(orient="records"), "skipped": skipped}


def summary_lines(report: dict) -> list[str]:
    """A short human-readable table of a report."""
    head = [f"model                     {report['model']['spec']}", _data_line(report)]
    null = [_null_line(report["kl_random_directions"])] if "kl_random_directions" in report else []
    if report["selected"] is None:
        return [*head, f"selection                 {report['selection_failed']}", *null]
    rates, sel, ce = report["refusal_rate"], report["selected"], report["ce_harmless_replies"]
    lines = [*head, f"direction                 pos {sel['pos']}, layer {sel['layer']} ({sel['how']})"]
    if "bypass" in sel:
        win = sel["bootstrap_win_rate"]
        lines.append(f"  bypass / induce / KL    {sel['bypass']:.2f} / {sel['induce']:.2f} / {sel['kl']:.4f} (val; "
                     f"{report['selection_rule']['kl_rule']} KL threshold {report['selection_rule']['kl_max']:.4g}; "
                     f"bootstrap win rate {win})")
    if "cohens_d_peak" in report:
        peak = report["cohens_d_peak"]
        lines.append(f"Cohen's d peak (test)     {peak['d']} at pos {peak['pos']}, layer {peak['layer']}")
    return [
        *lines, *null,
        f"harmful refusal           {rates['harmful_baseline']:.1%} -> {rates['harmful_ablated']:.1%} with ablation, "
        f"{rates['harmful_subtracted']:.1%} with subtraction",
        f"harmless refusal          {rates['harmless_baseline']:.1%} -> {rates['harmless_added']:.1%} with addition",
        f"KL on harmless (ablation) {report['kl_ablation_harmless_mean']:.4f} nats",
        "CE harmless replies       " + (f"skipped: {ce['skipped']}" if "skipped" in ce else
                                         f"{ce['baseline']:.3f} baseline, {ce['ablated']:.3f} ablated, "
                                         f"{ce['subtracted']:.3f} subtracted, {ce['added']:.3f} added (nats/token)"),
        f"orthogonalized vs hooks   max logit diff {report['orthogonalized_vs_hooks_max_logit_diff']:.2e}",
        *_capability_lines(report["capability"]),
        *_judge_lines(report["judge"]),
    ]


def _data_line(report: dict) -> str:
    """Harmful/harmless prompts used from train and val, out of how many before the refusal filter."""
    used = ", ".join(f"{name} {d['n_harmful']}/{d['n_harmless']} of {d['before_filter']['n_harmful']}/"
                     f"{d['before_filter']['n_harmless']}" for name, d in report["data"].items() if name != "test")
    how = "after the refusal filter" if report["config"]["filter_by_refusal"] else "unfiltered"
    return f"prompts (harmful/harmless) {used} ({how})"


def _null_line(null: dict) -> str:
    return (f"  KL, random directions   median {null['median']:.4f} (range {null['min']:.4f}-{null['max']:.4f}, "
            f"{null['share_below_0.1']:.0%} below 0.1; {null['n']} directions, val)")


def _capability_lines(capability: dict) -> list[str]:
    lines = [f"capability {row['task']:<14} {row['condition']:<15} acc {row['acc']:.3f} ± {row['acc_stderr']:.3f}"
             for row in capability.get("table", []) if "acc" in row]
    return lines + [f"capability {task}: skipped ({why})" for task, why in capability["skipped"].items()]


def _judge_lines(judged: dict) -> list[str]:
    if "skipped" in judged:
        return [f"judge                     skipped: {judged['skipped']}"]
    return [f"judge {judged['judge']} ({judged['prompt']}):"] + [
        f"  {row['condition']:<18} refusal {row['refusal_rate']:.1%}, compliance {row['compliance']:.2f}, "
        f"coherence {row['coherence']:.2f}, unknown {row['n_unknown']}/{row['n']}" for row in judged["table"]]
