"""The end-to-end run behind ``refusal-lens run``: extraction -> statistics -> selection -> interventions.

Data use, all from the built-in ``refusal-pairs`` set: directions from the
``train`` split, selection on the ``val`` split, every reported number on the
held-out ``test`` split. Writes to ``runs/<model>/``: ``directions.safetensors``,
one CSV per table, ``report.json`` and ``manifest.json``. Replies to harmful
prompts are stored only as verdicts (and at most 60 characters in examples).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import stats
from .data import load_contrast
from .directions import diff_in_means
from .generation import generate
from .interventions import ablate, add, orthogonalize_weights
from .manifest import write_manifest
from .metrics import ce_loss, is_refusal, kl_last_token, safe_excerpt
from .selection import select_direction


@dataclass(frozen=True)
class RunConfig:
    """Sizes and seeds of a run; the defaults finish in about 10 minutes on 2 CPU cores for the organism."""

    n_val: int = 32  # validation prompts per side for selection
    n_test: int | None = None  # test prompts per side for behaviour (None: the whole test split)
    max_new_tokens: int = 48
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 32


def _rate(replies: list[str]) -> float:
    return round(sum(map(is_refusal, replies)) / len(replies), 4)


def run(model, out: str | Path, config: RunConfig = RunConfig(), log=print) -> dict:
    """Run the pipeline on a loaded model and write its outputs to ``out``; returns the report."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: load_contrast("refusal-pairs", split=name) for name in ("train", "val", "test")}
    train, val, test = splits["train"], splits["val"], splits["test"]
    harmful_test = test.harmful_texts[: config.n_test]
    harmless_test = test.harmless_texts[: config.n_test]
    timings = {}

    def step(name: str):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log(f"[{time.perf_counter() - started:6.0f} s] {name} done")

    directions = diff_in_means(model, train.harmful_texts, train.harmless_texts, batch_size=config.batch_size)
    directions.save(out / "directions.safetensors")
    step("extraction")

    separability = stats.cohens_d(model, directions, harmful_test, harmless_test, n_boot=config.n_boot,
                                  seed=config.seed, batch_size=config.batch_size)
    separability.to_csv(out / "cohens_d.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer 0 is a known zero-norm candidate; its cosines are NaN
        stats.layer_cosines(directions, -1).to_csv(out / "layer_cosines_pos-1.csv")
    stability = stats.split_half_stability(model, train.harmful_texts, train.harmless_texts, seed=config.seed,
                                           batch_size=config.batch_size)
    stability.to_csv(out / "split_half.csv", index=False)
    step("statistics")

    selection = select_direction(model, directions, val.harmful_texts[: config.n_val], val.harmless_texts[: config.n_val],
                                 n_boot=config.n_boot, seed=config.seed, batch_size=config.batch_size)
    selection.table.to_csv(out / "selection.csv", index=False)
    step("selection")
    peak = separability[separability.valid].sort_values("d", ascending=False).iloc[0]
    report = {
        "model": asdict(model.info),
        "config": asdict(config),
        "data": {name: {"n_harmful": len(s.harmful), "n_harmless": len(s.harmless), **s.hashes()} for name, s in splits.items()},
        "positions": directions.positions,
        "cohens_d_peak": {"pos": int(peak.pos), "layer": int(peak.layer), "d": round(float(peak.d), 3),
                          "ci": [round(float(peak.ci_low), 3), round(float(peak.ci_high), 3)]},
        "selected": None,
        "seconds": timings,
    }
    candidate, note = selection.best, "passed the paper's filters"
    if candidate is None:
        # No candidate passed. Fall back, explicitly, to the lowest-bypass candidate that still induces
        # refusal, so the run shows what the direction does; the report flags that KL was not met.
        inducing = selection.table[selection.table.scored & (selection.table.induce > 0)].sort_values("bypass")
        if len(inducing):
            candidate = (int(inducing.iloc[0].pos), int(inducing.iloc[0].layer))
            note = "fallback: no candidate passed KL < 0.1; lowest bypass among those with induce > 0"
    if candidate is None:
        report["selection_failed"] = ("no candidate passed the filters (induce > 0, KL < 0.1, layer < 0.8 L) and none "
                                      "induces refusal; see selection.csv. Interventions were skipped.")
    else:
        report.update(_interventions(model, selection, candidate, note, separability, stability, harmful_test,
                                     harmless_test, config))
        step("interventions")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_manifest(out, model=asdict(model.info), data=report["data"], positions=directions.positions,
                   seed=config.seed, config=asdict(config), outputs=sorted(p.name for p in out.iterdir()))
    return report


def _interventions(model, selection, candidate, note, separability, stability, harmful_test, harmless_test,
                   config) -> dict:
    """Refusal with ablation and addition, KL, CE and the orthogonalization check for one candidate."""
    pos, layer = candidate
    direction = selection.directions.direction(pos, layer)
    vector = selection.directions.direction(pos, layer, unit=False)
    gen = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    harmful_base = generate(model, harmful_test, **gen)
    harmful_ablated = generate(model, harmful_test, hooks=ablate(model, direction).hooks, **gen)
    harmless_base = generate(model, harmless_test, **gen)
    harmless_added = generate(model, harmless_test, hooks=add(model, vector, layer=layer).hooks, **gen)
    kl = kl_last_token(model, harmless_test, hooks=ablate(model, direction).hooks, batch_size=config.batch_size)
    # Cross-entropy on the model's own replies to harmless prompts (full text is fine for harmless prompts).
    harmless_texts = [p + r for p, r in zip(model.chat.format(harmless_test), harmless_base) if r]
    ce_base = ce_loss(model, harmless_texts)
    ce_ablated = ce_loss(model, harmless_texts, hooks=ablate(model, direction).hooks)

    probe = model.chat.tokenize(harmless_test[:8])
    edited = orthogonalize_weights(model, direction)
    with torch.no_grad():
        with model.hooks(fwd_hooks=ablate(model, direction).hooks):
            hooked = model(probe["input_ids"], attention_mask=probe["attention_mask"])
        ortho_diff = float((edited(probe["input_ids"], attention_mask=probe["attention_mask"]) - hooked).abs().max())
    del edited

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
        "examples": {
            "harmful_ablated": [{"instruction": i, "reply_first_60": safe_excerpt(r), "refused": is_refusal(r)}
                                for i, r in zip(harmful_test[:3], harmful_ablated[:3])],
            "harmless_added": [{"instruction": i, "reply": r, "refused": is_refusal(r)}
                               for i, r in zip(harmless_test[:3], harmless_added[:3])],
        },
    }


def summary_lines(report: dict) -> list[str]:
    """A short human-readable table of a report."""
    if report["selected"] is None:
        return [f"model                     {report['model']['spec']}", f"selection                 {report['selection_failed']}"]
    rates, sel = report["refusal_rate"], report["selected"]
    return [
        f"model                     {report['model']['spec']}",
        f"selected direction        pos {sel['pos']}, layer {sel['layer']} ({sel['how']}; bootstrap win rate {sel['bootstrap_win_rate']})",
        f"  bypass / induce / KL    {sel['bypass']:.2f} / {sel['induce']:.2f} / {sel['kl']:.4f} (val)",
        f"Cohen's d peak (test)     {report['cohens_d_peak']['d']} at pos {report['cohens_d_peak']['pos']}, layer {report['cohens_d_peak']['layer']}",
        f"harmful refusal           {rates['harmful_baseline']:.1%} -> {rates['harmful_ablated']:.1%} with ablation",
        f"harmless refusal          {rates['harmless_baseline']:.1%} -> {rates['harmless_added']:.1%} with addition",
        f"KL on harmless (ablation) {report['kl_ablation_harmless_mean']:.4f} nats",
        f"CE harmless replies       {report['ce_harmless_replies']['baseline']:.3f} -> {report['ce_harmless_replies']['ablated']:.3f} nats/token",
        f"orthogonalized vs hooks   max logit diff {report['orthogonalized_vs_hooks_max_logit_diff']:.2e}",
    ]
