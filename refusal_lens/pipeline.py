"""The end-to-end run behind ``refusal-lens run``: extraction -> statistics -> selection -> interventions.

Data use, all from the built-in ``refusal-pairs`` set: directions from the
``train`` split, selection on the ``val`` split, every reported number on the
held-out ``test`` split. As in the paper's pipeline (``filter_train`` /
``filter_val``), train and val keep only the harmful prompts the model refuses
and the harmless ones it answers, by the sign of the refusal score; the test
split is never filtered. Writes to ``runs/<model>/``: ``directions.safetensors``,
one CSV per table, ``selected.json``, ``report.json``, ``manifest.json`` and
``figures/`` (HTML + PNG; also copied to ``figures_dir`` when given). Replies to
harmful prompts are stored only as verdicts (and at most 60 characters in examples).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import plots, stats
from .data import ContrastSet, load_contrast
from .directions import Directions, diff_in_means
from .generation import generate
from .interventions import ablate, add, orthogonalize_weights
from .manifest import write_manifest
from .metrics import ce_loss, is_refusal, kl_last_token, refusal_rate, refusal_score, safe_excerpt
from .selection import random_direction_kl, select_direction


@dataclass(frozen=True)
class RunConfig:
    """Sizes and seeds of a run; the defaults finish in about 10 minutes on 2 CPU cores for the organism."""

    n_val: int = 24  # validation prompts per side for selection (the paper-size 32 adds ~2 min on 2 CPU cores)
    filter_by_refusal: bool = True  # the paper's train/val filter by refusal-score sign; False for models that do not refuse
    n_test: int | None = None  # test prompts per side for behaviour (None: the whole test split)
    max_new_tokens: int = 48
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


def run(model, out: str | Path, config: RunConfig = RunConfig(), log=print, figures_dir: str | Path | None = None) -> dict:
    """Run the pipeline on a loaded model and write its outputs to ``out``; returns the report."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    timings = {}

    def step(name: str):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log(f"[{time.perf_counter() - started:6.0f} s] {name} done")

    splits = {name: load_contrast("refusal-pairs", split=name) for name in ("train", "val", "test")}
    unfiltered = {name: (len(s.harmful), len(s.harmless)) for name, s in splits.items()}
    if config.filter_by_refusal:
        splits.update({name: filter_split(model, splits[name]) for name in ("train", "val")})
        step("filter")
    train, val, test = splits["train"], splits["val"], splits["test"]
    harmful_test = test.harmful_texts[: config.n_test]
    harmless_test = test.harmless_texts[: config.n_test]

    directions = diff_in_means(model, train.harmful_texts, train.harmless_texts, batch_size=config.batch_size)
    directions.save(out / "directions.safetensors")
    step("extraction")

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
    step("statistics")

    selection = select_direction(model, directions, val.harmful_texts[: config.n_val], val.harmless_texts[: config.n_val],
                                 n_boot=config.n_boot, seed=config.seed, batch_size=config.batch_size,
                                 full_table=config.full_selection_table)
    selection.table.to_csv(out / "selection.csv", index=False)
    figures["selection"] = plots.selection_scores(selection.table)
    null_kl = random_direction_kl(model, val.harmless_texts[: config.n_val], n_directions=config.n_null_directions,
                                  seed=config.seed, batch_size=config.batch_size)
    step("selection")
    peak = separability[separability.valid].sort_values("d", ascending=False).iloc[0]
    report = {
        "model": asdict(model.info),
        "config": asdict(config),
        "data": {name: {"n_harmful": len(s.harmful), "n_harmless": len(s.harmless), **s.hashes(),
                        "before_filter": {"n_harmful": unfiltered[name][0], "n_harmless": unfiltered[name][1]}}
                 for name, s in splits.items()},
        "positions": directions.positions,
        "cohens_d_peak": {"pos": int(peak.pos), "layer": int(peak.layer), "d": round(float(peak.d), 3),
                          "ci": [round(float(peak.ci_low), 3), round(float(peak.ci_high), 3)]},
        "selected": None,
        # The KL filter's null: ablating random unit directions on the same val harmless prompts.
        "kl_random_directions": {"n": len(null_kl), "median": round(float(null_kl.median()), 5),
                                 "min": round(float(null_kl.min()), 5), "max": round(float(null_kl.max()), 5),
                                 "share_below_0.1": round(float((null_kl < 0.1).double().mean()), 4),
                                 "values": [round(float(x), 5) for x in null_kl]},
        "seconds": timings,
    }
    # Without a passing candidate the run falls back, flagged in the report, to the lowest-bypass
    # candidate that still induces refusal, so it shows what the direction does.
    candidate, note = selection.pick()
    if candidate is None:
        report["selection_failed"] = ("no candidate passed the filters (induce > 0, KL < 0.1, layer < 0.8 L) and none "
                                      "induces refusal; see selection.csv. Interventions were skipped.")
    else:
        save_selected(out, *candidate, note)
        report.update(_interventions(model, selection, candidate, note, separability, stability, harmful_test,
                                     harmless_test, config, out))
        sweep = alpha_sweep(model, selection.directions.direction(*candidate), harmful_test[: config.n_alpha],
                            config.alphas, batch_size=config.batch_size)
        sweep.to_csv(out / "alpha_sweep.csv", index=False)
        report["alpha_sweep"] = sweep.round(4).to_dict(orient="list")
        figures.update(refusal_rates=plots.refusal_rates(report["refusal_rate"]), alpha_sweep=plots.alpha_sweep(sweep))
        step("interventions")
    written = [path for name, fig in figures.items() for path in plots.save(fig, name, out / "figures")]
    if figures_dir:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
        for path in [*written, out / "figures" / "plotly.min.js"]:
            shutil.copy2(path, Path(figures_dir) / path.name)
    report["figures"] = sorted(figures)
    step("figures")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_manifest(out, model=asdict(model.info), data=report["data"], positions=directions.positions,
                   seed=config.seed, config=asdict(config), outputs=sorted(p.name for p in out.iterdir()))
    return report


def alpha_sweep(model, direction, harmful, alphas, *, batch_size: int = 32):
    """Mean refusal score on ``harmful`` when ``alpha`` times the direction's component is removed, per alpha."""
    import pandas as pd

    scores = [float(refusal_score(model, harmful, hooks=ablate(model, direction, alpha=a).hooks,
                                  batch_size=batch_size).mean()) for a in alphas]
    return pd.DataFrame({"alpha": list(alphas), "refusal_score": scores})


def _interventions(model, selection, candidate, note, separability, stability, harmful_test, harmless_test,
                   config, out: Path) -> dict:
    """Refusal with ablation and addition, KL, CE, the orthogonalization check, the judge step and the
    capability table for one candidate."""
    pos, layer = candidate
    direction = selection.directions.direction(pos, layer)
    vector = selection.directions.direction(pos, layer, unit=False)
    gen = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    ablation = ablate(model, direction).hooks
    harmful_base = generate(model, harmful_test, **gen)
    harmful_ablated = generate(model, harmful_test, hooks=ablation, **gen)
    harmless_base = generate(model, harmless_test, **gen)
    harmless_added = generate(model, harmless_test, hooks=add(model, vector, layer=layer).hooks, **gen)
    kl = kl_last_token(model, harmless_test, hooks=ablation, batch_size=config.batch_size)
    # Cross-entropy on the model's own replies to harmless prompts (full text is fine for harmless prompts).
    harmless_texts = [p + r for p, r in zip(model.chat.format(harmless_test), harmless_base) if r]
    ce_base = ce_loss(model, harmless_texts)
    ce_ablated = ce_loss(model, harmless_texts, hooks=ablation)

    probe = model.chat.tokenize(harmless_test[:8])
    edited = orthogonalize_weights(model, direction)
    with torch.no_grad():
        with model.hooks(fwd_hooks=ablation):
            hooked = model(probe["input_ids"], attention_mask=probe["attention_mask"])
        ortho_diff = float((edited(probe["input_ids"], attention_mask=probe["attention_mask"]) - hooked).abs().max())
    capability = _capability_step({"baseline": (model, ()), "ablated": (model, ablation),
                                   "orthogonalized": (edited, ())}, config, out)
    del edited
    judged = _judge_step(config, out, {
        "harmful/baseline": (harmful_test, harmful_base), "harmful/ablated": (harmful_test, harmful_ablated),
        "harmless/baseline": (harmless_test, harmless_base), "harmless/added": (harmless_test, harmless_added)})

    at = lambda table: table[(table.pos == pos) & (table.layer == layer)]  # noqa: E731
    row = at(selection.table).iloc[0]
    return {
        "selected": {"pos": pos, "layer": layer, "bypass": row.bypass, "induce": row.induce, "kl": row.kl,
                     "how": note, "bootstrap_win_rate": selection.win_rate if selection.best else None,
                     "baseline_scores": selection.baseline},
        "cohens_d_selected": round(float(at(separability).d.iloc[0]), 3),
        "split_half_cosine_selected": round(float(at(stability).cosine.iloc[0]), 4),
        "refusal_rate": {
            "harmful_baseline": _rate(harmful_base), "harmful_ablated": _rate(harmful_ablated),
            "harmless_baseline": _rate(harmless_base), "harmless_added": _rate(harmless_added),
        },
        "n_test": {"harmful": len(harmful_test), "harmless": len(harmless_test)},
        "kl_ablation_harmless_mean": round(float(kl.mean()), 5),
        "ce_harmless_replies": {"baseline": round(ce_base, 4), "ablated": round(ce_ablated, 4)},
        "orthogonalized_vs_hooks_max_logit_diff": ortho_diff,
        "judge": judged,
        "capability": capability,
        "examples": {
            "harmful_ablated": [{"instruction": i, "reply_first_60": safe_excerpt(r), "refused": is_refusal(r)}
                                for i, r in zip(harmful_test[:3], harmful_ablated[:3])],
            "harmless_added": [{"instruction": i, "reply": r, "refused": is_refusal(r)}
                               for i, r in zip(harmless_test[:3], harmless_added[:3])],
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
    if report["selected"] is None:
        return [f"model                     {report['model']['spec']}", _data_line(report),
                f"selection                 {report['selection_failed']}", _null_line(report["kl_random_directions"])]
    rates, sel = report["refusal_rate"], report["selected"]
    return [
        f"model                     {report['model']['spec']}",
        _data_line(report),
        f"selected direction        pos {sel['pos']}, layer {sel['layer']} ({sel['how']}; "
        + (f"bootstrap win rate {sel['bootstrap_win_rate']})" if sel["bootstrap_win_rate"] is not None
           else "no bootstrap win rate: nothing passed)"),
        f"  bypass / induce / KL    {sel['bypass']:.2f} / {sel['induce']:.2f} / {sel['kl']:.4f} (val)",
        _null_line(report["kl_random_directions"]),
        f"Cohen's d peak (test)     {report['cohens_d_peak']['d']} at pos {report['cohens_d_peak']['pos']}, layer {report['cohens_d_peak']['layer']}",
        f"harmful refusal           {rates['harmful_baseline']:.1%} -> {rates['harmful_ablated']:.1%} with ablation",
        f"harmless refusal          {rates['harmless_baseline']:.1%} -> {rates['harmless_added']:.1%} with addition",
        f"KL on harmless (ablation) {report['kl_ablation_harmless_mean']:.4f} nats",
        f"CE harmless replies       {report['ce_harmless_replies']['baseline']:.3f} -> {report['ce_harmless_replies']['ablated']:.3f} nats/token",
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
