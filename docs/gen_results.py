"""Generate the result blocks of README.md and the docs pages from the main job's ``report.json``.

Every number a reader sees on the front page and on the results pages comes from a file a run wrote:
the main job's ``runs/<model>/report.json`` and the organism's ``refusal_lens/data/organism/behaviour.json``.
Each generated block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers; this script
rewrites what lies between them, and ``--check`` fails (exit 1, naming the blocks) when a file differs from
what the report gives, so a README that no longer matches its run cannot land.

    python docs/gen_results.py                  # rewrite the blocks from runs/smollm2-135m-refusal/report.json
    python docs/gen_results.py --check          # exit 1 when README.md or a docs page differs
    python docs/gen_results.py --report PATH    # another run's report

Rates are shares of prompts the substring judge calls refusals; counts are ``round(rate * n)``, intervals are
Wilson 95% intervals (``rl.stats.wilson_ci``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = ROOT / "runs" / "smollm2-135m-refusal" / "report.json"
BEHAVIOUR = ROOT / "refusal_lens" / "data" / "organism" / "behaviour.json"

# The notebooks, in order: (file stem, the question it answers, the report entry that answers it or None).
NOTEBOOKS = [
    ("00_quickstart", "Is refusal one direction? Extract it, ablate it, add it, in a few minutes.", None),
    ("01_extract", "Where do harmful and harmless prompts separate, and how stably?", "separability"),
    ("02_select", "Which candidate does the paper's rule pick, and what does its KL cost against random "
                  "directions?", "selection"),
    ("03_intervene", "What do ablation, subtraction and addition do to refusal, KL, CE and capability?",
     "interventions"),
    ("04_heads", "Which attention heads write the direction, and does an adversarial suffix hijack them?", None),
    ("05_base_vs_chat", "Does the direction exist before safety tuning?", None),
    ("06_subspace", "One direction or a subspace: how many dimensions does removing refusal take?", None),
    ("07_over_refusal", "Can a false-refusal vector remove over-refusal of harmless requests that look risky, "
                        "and at what cost to true refusal?", "over_refusal"),
    ("08_frontier", "What is the least it costs to remove refusal, and where in depth must the direction go?",
     "frontier"),
]


class ReportError(ValueError):
    """The report lacks an entry a block needs; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# formatting


def _package():
    """The repository's ``refusal_lens`` (the script runs from any directory)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import refusal_lens

    return refusal_lens


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of ``k / n`` (the package's ``rl.stats.wilson_ci``)."""
    return _package().stats.wilson_ci(k, n)


def count(rate: float, n: int) -> int:
    """The number of refusals behind a rounded ``rate`` of ``n`` prompts; raises when no whole count fits."""
    k = round(rate * n)
    if abs(k / n - rate) > 5e-4:
        raise ReportError(f"rate {rate} is not a whole count of n = {n} prompts: the report and its n disagree")
    return k


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate_ci(rate: float, n: int) -> str:
    """``97.3% [90.8, 99.3] (73/75)``: the rate, its Wilson 95% interval in percent, the count."""
    k = count(rate, n)
    low, high = wilson(k, n)
    return f"{pct(rate)} [{100 * low:.1f}, {100 * high:.1f}] ({k}/{n})"


def rate_entry(entry: dict) -> str:
    """An over-refusal rate entry (``rate``, ``ci_low``, ``ci_high``, ``refused``, ``n``) as text."""
    return f"{pct(entry['rate'])} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}] " \
           f"({entry['refused']}/{entry['n']})"


def sign(x: int | None) -> str:
    """A position index with a real minus sign."""
    return "—" if x is None else (f"−{-x}" if x < 0 else str(x))


def signed(x: float, digits: int = 2) -> str:
    """A number with a real minus sign."""
    return f"{x:.{digits}f}".replace("-", "−")


def need(report: dict, *keys: str):
    """``report[k0][k1]...``, or a :class:`ReportError` naming the missing entry."""
    value = report
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ReportError(f"report.json has no {'.'.join(keys[: i + 1])}: regenerate it with `make run`")
        value = value[key]
    return value


# ---------------------------------------------------------------------------------------------------------------
# blocks


def _setting(report: dict) -> str:
    sel, n = need(report, "selected"), need(report, "n_test")
    tokens = report.get("config", {}).get("max_new_tokens")
    tokens = f", {tokens} new tokens" if tokens else ""
    return (f"`{need(report, 'model', 'spec')}`; the held-out `test` split, {n['harmful']} harmful and "
            f"{n['harmless']} harmless prompts; greedy decoding{tokens}; the paper's substring judge; the direction "
            f"at position {sign(sel['pos'])}, layer {sel['layer']}, chosen on `val`")


def _rates_table(report: dict) -> str:
    rates, n, layer = need(report, "refusal_rate"), need(report, "n_test"), need(report, "selected", "layer")
    rows = [("harmful, unmodified", "harmful_baseline", "harmful"),
            ("harmful, direction ablated at every layer", "harmful_ablated", "harmful"),
            (f"harmful, direction subtracted at layer {layer}", "harmful_subtracted", "harmful"),
            ("harmless, unmodified", "harmless_baseline", "harmless"),
            (f"harmless, direction added at layer {layer}", "harmless_added", "harmless")]
    missing = [key for _, key, _ in rows if key not in rates]
    if missing:
        raise ReportError(f"report.json's refusal_rate lacks {missing}: regenerate it with `make run`")
    lines = ["| test prompts | refused (95% Wilson CI) |", "| --- | ---: |"]
    lines += [f"| {label} | {rate_ci(rates[key], n[side])} |" for label, key, side in rows]
    return "\n".join(lines)


def _kl_ratio(report: dict) -> tuple[float, float, float] | None:
    """(the pick's val KL, the random directions' median, their ratio), or None without both."""
    sel, null = report.get("selected") or {}, report.get("kl_random_directions")
    if "kl" not in sel or not null or not null.get("median"):
        return None
    return sel["kl"], null["median"], sel["kl"] / null["median"]


def verdict(report: dict) -> str:
    """One plain sentence (two clauses) of what replicates and what does not, worded from the numbers."""
    rates, layer = need(report, "refusal_rate"), need(report, "selected", "layer")
    base, ablated, subtracted = rates["harmful_baseline"], rates["harmful_ablated"], rates["harmful_subtracted"]
    induced = rates["harmless_added"] >= 0.5 and rates["harmless_added"] > rates["harmless_baseline"]
    removed_by = [name for name, r in (("ablation", ablated), ("subtraction", subtracted)) if r <= 0.1 * base]
    replicates = [f"adding the direction at layer {layer} makes the model refuse harmless requests "
                  f"({pct(rates['harmless_baseline'])} → {pct(rates['harmless_added'])})" if induced else None]
    fails = [] if induced else [f"adding the direction barely induces refusal ({pct(rates['harmless_baseline'])} → "
                                f"{pct(rates['harmless_added'])})"]
    if "subtraction" in removed_by:
        replicates.append(f"subtracting it there removes refusal of harmful ones ({pct(base)} → {pct(subtracted)})")
    else:
        fails.append(f"subtracting it at its layer leaves {pct(subtracted)} of harmful requests refused")
    if "ablation" in removed_by:
        replicates.append(f"ablating it at every layer removes refusal ({pct(base)} → {pct(ablated)})")
    else:
        fails.append(f"ablating it at every layer, the paper's headline intervention, only takes refusal from "
                     f"{pct(base)} to {pct(ablated)}")
    kl = _kl_ratio(report)
    how = report["selected"].get("how") or ""
    if "fallback" in how and kl:
        fails.append(f"no candidate passes the paper's KL filter: the pick costs {kl[0]:.2f} nats on `val`, "
                     f"{kl[2]:.1f}× the median of random directions ({kl[1]:.2f})")
    replicates = [r for r in replicates if r]
    text = "**What replicates:** " + ("; ".join(replicates) if replicates else "none of the paper's effects") + ". "
    text += "**What does not:** " + ("; ".join(fails) if fails else "nothing measured here departs from the paper")
    return text + "."


def results_box(report: dict) -> str:
    """The README's and the front page's results box."""
    lines = [f"On the organism: {_setting(report)}.", "",
             _rates_table(report), "",
             "![Refusal with and without the direction](figures/refusal_rates.png)", "",
             verdict(report)]
    beyond = " ".join(s for s in (strongest_candidate(report), frontier_sentence(report)) if s)
    return "\n".join(lines + (["", beyond] if beyond else []))


def _strongest(report: dict) -> dict | None:
    """The selection-table row of ``rl.frontier.strongest_candidate`` (the scored candidate whose ablation lowers
    the harmful refusal score most), or None."""
    import pandas as pd

    rows = report.get("selection_table", [])
    candidate = _package().frontier.strongest_candidate(pd.DataFrame(rows) if rows else None)
    return next(r for r in rows if (r["pos"], r["layer"]) == candidate) if candidate else None


def strongest_candidate(report: dict) -> str | None:
    """One sentence: the scored candidate whose ablation lowers refusal most, and its KL against random ones."""
    row, null = _strongest(report), (report.get("kl_random_directions") or {}).get("median")
    if row is None or not null:
        return None
    base = (report.get("selected") or {}).get("baseline_scores", {}).get("harmful")
    scores = f"{signed(base)} → {signed(row['bypass'])}" if base is not None else f"to {signed(row['bypass'])}"
    return (f"**Removing more of it costs more:** of the candidates the selection scored, the one whose ablation "
            f"lowers the harmful prompts' refusal score most (position {sign(int(row['pos']))}, layer "
            f"{int(row['layer'])}: {scores} on `val`) costs {row['kl']:.2f} nats of KL, {row['kl'] / null:.1f}× "
            f"the random directions' median.")


def _by_rule(points: list[dict], rule_params: dict) -> tuple[dict | None, bool]:
    """Measured points under the frontier's own rule (``rl.frontier.choose`` with ``frontier.json``'s
    ``rule_params``): (its pick, True), else (the closest point, False); (None, False) without points."""
    if not points:
        return None, False
    import pandas as pd

    frontier = _package().frontier
    chosen, closest = frontier.choose(pd.DataFrame(points), frontier.ChoiceRule(**rule_params))
    trial = chosen if chosen is not None else closest
    return next(p for p in points if p["trial"] == trial), chosen is not None


def _test_point(test: dict, null: float) -> str:
    return (f"harmful refusal on test {rate_ci(test['harmful_refusal_rate'], test['n_harmful'])} at a harmless "
            f"KL of {test['harmless_kl']:.2f} nats ({test['harmless_kl'] / null:.1f}× random directions' median)")


def _finished_frontier(report: dict) -> dict | None:
    """The run's ``frontier.json`` when its search finished with a point evaluated on test, else None."""
    front = report.get("frontier") or {}
    return front if front.get("status") == "done" and front.get("chosen") else None


def frontier_sentence(report: dict) -> str | None:
    """The frontier's chosen point on test, and heretic's point under the same rule, or None without a run."""
    front = _finished_frontier(report)
    if front is None:
        return None
    chosen, rule = front["chosen"], front["rule_params"]
    null = front["random_direction_kl"]["median"]
    how = ("the point its rule picks, fixed before the search (lowest val KL among front points whose judged val "
           f"refusal is at most {pct(rule['max_refusal'])}), gives" if chosen["by_rule"] else
           f"no front point reaches judged val refusal ≤ {pct(rule['max_refusal'])}; the closest gives")
    text = (f"**The cost of removing it:** over {front['n_trials']} per-layer ablation profiles searched on `val` "
            f"(`make frontier`), {how} {_test_point(chosen['test'], null)}.")
    reference = front.get("reference")
    if reference:
        text += (f" The strongest single candidate (position {sign(reference['position'])}, layer "
                 f"{reference['layer']}) ablated at every layer gives {_test_point(reference['test'], null)}.")
    heretic = report.get("heretic") or {}
    point, met = _by_rule(heretic.get("points", []), rule)
    if point is not None:
        text += (f" heretic ({heretic['n_trials']} trials, same prompts, measured the same way): its saved Pareto "
                 f"point {'the same rule picks' if met else 'with the lowest judged val refusal (none meets the rule)'}"
                 f" gives {_test_point(point['test'], null)}.")
    return text


def run_time(report: dict) -> str:
    """How long the job behind the results took, from the report's per-step ``seconds``."""
    seconds = need(report, "seconds")
    steps = ", ".join(f"{name.replace('_', ' ')} {value / 60:.0f}" for name, value in seconds.items() if value >= 60)
    return (f"The run behind the results below took {sum(seconds.values()) / 60:.0f} minutes for the job "
            f"(install excluded; minutes per step: {steps}), as its `report.json` records.")


def _separability(report: dict) -> str:
    peak = need(report, "cohens_d_peak")
    text = f"Cohen's d on test peaks at {peak['d']:.2f} (position {sign(peak['pos'])}, layer {peak['layer']})"
    if "cohens_d_selected" in report:
        text += f"; the selected direction's d is {report['cohens_d_selected']:.2f}"
    return text


def _selection(report: dict) -> str:
    sel = need(report, "selected")
    text = f"position {sign(sel['pos'])}, layer {sel['layer']}"
    kl = _kl_ratio(report)
    if kl:
        text += f"; KL {kl[0]:.2f} nats on val, {kl[2]:.1f}× random directions' median"
    return text


def _interventions(report: dict) -> str:
    rates = need(report, "refusal_rate")
    return (f"harmful refusal {pct(rates['harmful_baseline'])} → {pct(rates['harmful_ablated'])} ablated, "
            f"{pct(rates['harmful_subtracted'])} subtracted; harmless {pct(rates['harmless_baseline'])} → "
            f"{pct(rates['harmless_added'])} added")


def _over_refusal(report: dict) -> str | None:
    over = report.get("over_refusal") or {}
    result = over.get("holdout") or over.get("test")
    if not result:
        return None
    rates = result["refusal_rate"]
    look, harmful = rates["look_risky"], rates[_harmful_key(rates)]
    return (f"look-risky refusal on the {result['split']} prompts {pct(look['baseline']['rate'])} → "
            f"{pct(look['ablated']['rate'])}, harmful {pct(harmful['baseline']['rate'])} → "
            f"{pct(harmful['ablated']['rate'])}")


def _harmful_key(rates: dict) -> str:
    """The over-refusal evaluation's harmful set: ``harmful_all`` (the requests and their look-risky rewordings'
    harmful counterparts), whatever the report calls it."""
    keys = [key for key in rates if key.startswith("harmful")]
    if len(keys) != 1:
        raise ReportError(f"expected one harmful set in the over-refusal rates, found {keys}")
    return keys[0]


def _frontier(report: dict) -> str | None:
    front = _finished_frontier(report)
    if front is None:
        return None
    test, null = front["chosen"]["test"], front["random_direction_kl"]["median"]
    return (f"{'rule met' if front['chosen']['by_rule'] else 'rule not met; closest point'}: harmful refusal "
            f"{pct(test['harmful_refusal_rate'])} on test at KL {test['harmless_kl']:.2f} "
            f"({test['harmless_kl'] / null:.1f}× random) after {front['n_trials']} trials")


# Notebooks whose answer is printed by the executed copy (docs/notebooks/, `make report`) rather than held in the
# report: stem -> (patterns over its printed output, each with named groups, and the answer they fill in).
PRINTED_ANSWERS: dict[str, tuple[tuple[str, ...], str]] = {
    "00_quickstart": ((r"harmful refusal:\s+(?P<h0>\d+)% -> (?P<h1>\d+)% with the direction ablated",
                       r"harmless refusal:\s+(?P<b0>\d+)% -> (?P<b1>\d+)% with the direction added",
                       r"layer (?P<layer>\d+): Cohen's d = (?P<d>[\d.]+)"),
                      "its own direction (layer {layer}, the best Cohen's d, {d}): harmful refusal {h0}% → {h1}% "
                      "ablated, harmless {b0}% → {b1}% added"),
    "04_heads": ((r"attention heads\s+(?P<heads>[\d.-]+)", r"MLPs\s+(?P<mlps>[\d.-]+)",
                  r"sum\s+(?P<total>[\d.-]+)",
                  r"top-8 heads lower the projection more than every random set: (?P<beats>True|False)",
                  r"GCG: refusal log-odds (?P<g0>[\d.-]+) -> (?P<g1>[\d.-]+)"),
                 "of the residual's projection on the direction ({total}), attention heads write {heads} and MLPs "
                 "{mlps}; the top 8 heads beat every random set of 8: {beats}; a GCG suffix takes the refusal "
                 "log-odds {g0} → {g1}"),
    "05_base_vs_chat": ((r"cosine (?P<cos>[\d.]+); Cohen's d on the chat direction: chat model (?P<chat>[\d.]+), "
                         r"base model (?P<base>[\d.]+)",),
                        "cosine {cos} between the chat and base directions; Cohen's d {chat} in the chat model, "
                        "{base} in the base model"),
    "06_subspace": ((r"effective rank (?P<rank>[\d.]+); (?P<k>\d+) dimensions hold 90%",),
                    "the layers' directions have effective rank {rank}; {k} dimensions hold 90% of their norm"),
}


def printed_answer(stem: str, copies: Path) -> str | None:
    """The answer the executed copy ``copies/<stem>.ipynb`` prints (:data:`PRINTED_ANSWERS`); None without a copy.
    Raises when the copy no longer prints what a pattern reads (the notebook changed: update the pattern)."""
    path = copies / f"{stem}.ipynb"
    if stem not in PRINTED_ANSWERS or not path.is_file():
        return None
    notebook = json.loads(path.read_text())
    printed = "".join("".join(o["text"]) for c in notebook["cells"] for o in c.get("outputs", [])
                      if o.get("output_type") == "stream" and o.get("name") == "stdout")
    patterns, answer = PRINTED_ANSWERS[stem]
    found = {}
    for pattern in patterns:
        match = re.search(pattern, printed)
        if match is None:
            raise ReportError(f"{path} does not print what /{pattern}/ reads: update PRINTED_ANSWERS")
        found.update(match.groupdict())
    return answer.format(**{k: v.replace("-", "−") for k, v in found.items()})


ANSWERS: dict[str, Callable[[dict], str | None]] = {
    "separability": _separability, "selection": _selection, "interventions": _interventions,
    "over_refusal": _over_refusal, "frontier": _frontier}


def notebook_map(report: dict, *, prefix: str) -> str:
    """One line per notebook: its question and its answer (from the report, or a link to the executed copy).

    ``prefix``: the path from the page to ``docs/notebooks/`` (``docs/notebooks/`` from the README).
    """
    lines = ["| notebook | question | answer |", "| --- | --- | --- |"]
    for stem, question, key in NOTEBOOKS:
        link = f"{prefix}{stem}.ipynb"
        answer = ANSWERS[key](report) if key else printed_answer(stem, ROOT / "docs" / "notebooks")
        shown = answer if answer else "in the executed notebook's outputs"
        lines.append(f"| [`{stem}`]({link}) | {question} | {shown} |")
    return "\n".join(lines)


def interventions_page(report: dict) -> str:
    """The results page's intervention section: rates with CIs, KL, CE, orthogonalization, capability."""
    lines = [_rates_table(report), "", f"Setting: {_setting(report)}."]
    lines += ["", f"- KL of the next token on harmless test prompts, direction ablated: "
                  f"{need(report, 'kl_ablation_harmless_mean'):.3f} nats."]
    ce = report.get("ce_harmless_replies") or {}
    if "skipped" not in ce and ce:
        lines.append(f"- Cross-entropy of the model's own harmless replies, reply tokens only (nats/token): "
                     f"{ce['baseline']:.3f} unmodified, {ce['ablated']:.3f} ablated, {ce['subtracted']:.3f} "
                     f"subtracted, {ce['added']:.3f} added.")
    if "orthogonalized_vs_hooks_max_logit_diff" in report:
        lines.append(f"- Orthogonalized weights vs hook ablation: max logit difference "
                     f"{report['orthogonalized_vs_hooks_max_logit_diff']:.1e}.")
    table = (report.get("capability") or {}).get("table") or []
    if table:
        lines += ["", "| capability task | condition | acc | acc_norm |", "| --- | --- | ---: | ---: |"]
        for row in table:
            norm = f"{row['acc_norm']:.3f}" if "acc_norm" in row else "—"
            lines.append(f"| `{row['task']}` | {row['condition']} | {row['acc']:.3f} ± {row['acc_stderr']:.3f} "
                         f"| {norm} |")
    sweep = report.get("alpha_sweep")
    if sweep and "alpha" in sweep:
        score = sweep.get("refusal_score")
        if score:
            pairs = ", ".join(f"α {a:g}: {s:+.2f}" for a, s in zip(sweep["alpha"], score))
            lines += ["", f"- Mean refusal score of harmful prompts as a share α of the direction is removed: {pairs}."]
    return "\n".join(lines)


def selection_page(report: dict) -> str:
    """The results page's selection section: data sizes, the rule, the pick, the random-direction null."""
    lines = []
    data = report.get("data") or {}
    n_val = (report.get("config") or {}).get("n_val")
    for split, use in (("train", "directions from all of them"),
                       ("val", f"the selection scores the first {n_val} per side" if n_val else "")):
        if split in data:
            d = data[split]
            lines.append(f"- `{split}`: {d['n_harmful']} harmful / {d['n_harmless']} harmless prompts pass the "
                         f"refusal filter, of {d['before_filter']['n_harmful']} / {d['before_filter']['n_harmless']}"
                         + (f"; {use}." if use else "."))
    sel = need(report, "selected")
    lines.append(f"- Pick: position {sign(sel['pos'])}, layer {sel['layer']}, by the rule *{sel.get('how', '—')}*.")
    if "bypass" in sel:
        lines.append(f"- On val: bypass {sel['bypass']:.2f}, induce {sel['induce']:.2f}, KL {sel['kl']:.3f} nats; "
                     f"the same rule picks it in {pct(sel['bootstrap_win_rate'])} of bootstrap resamples of the "
                     "val prompts.")
    null = report.get("kl_random_directions")
    if null:
        lines.append(f"- KL of ablating {null['n']} random unit directions on the same val prompts: median "
                     f"{null['median']:.3f} nats (range {null['min']:.3f}–{null['max']:.3f}); "
                     f"{pct(null['share_below_0.1'])} of them fall under the paper's absolute 0.1.")
    kl = _kl_ratio(report)
    if kl:
        lines.append(f"- The pick's KL is {kl[2]:.1f}× that median.")
    if "cohens_d_peak" in report:
        lines.append(f"- Separability on test: {_separability(report)}.")
    if "split_half_cosine_selected" in report:
        lines.append(f"- Split-half cosine of the selected direction: {report['split_half_cosine_selected']:.2f}.")
    return "\n".join(lines)


OVER_REFUSAL_SETS = {"look_risky": "look-risky", "look_risky_refusal_pairs": "look-risky (`refusal-pairs`)",
                     "harmful_all": "harmful",
                     "harmless": "plain harmless"}


CRITERIA = {"look_risky_halved": "look-risky refusal at least halved",
            "look_risky_refusal_pairs_halved": "look-risky (`refusal-pairs`) refusal at least halved",
            "harmful_kept_90pct": "harmful refusal at least 90% of baseline",
            "harmless_not_increased": "plain harmless refusal not increased"}


def over_refusal_page(report: dict) -> str:
    """The over-refusal step's outcome: the gate, the pick and the held-out rates with CIs."""
    over = report.get("over_refusal")
    if not over:
        return "No over-refusal study beside this run yet: `make over-refusal` writes `over_refusal.json`."
    gate = over["look_risky_val_refusal"]
    lines = [f"- Gate: look-risky val refusal {pct(gate['rate'])} ({gate['refused']}/{gate['n']}) against a "
             f"threshold of {pct(over['threshold'])}; the step {'ran' if over['ran'] else 'stopped there'}."]
    if "selection_failed" in over:
        lines.append(f"- Selection: {over['selection_failed']}")
    if "selected" in over:
        s = over["selected"]
        share = next((s[key] for key in ("lambda", "orthogonalize", "ortho_share") if key in s), None)
        share = "" if share is None else f", λ = {share:g}"
        lines.append(f"- False-refusal vector: position {sign(s['pos'])}, layer {s['layer']}{share}.")
    for split in ("holdout", "test"):
        result = over.get(split)
        if not result:
            continue
        lines += ["", f"| {split} prompts | unmodified | false-refusal vector ablated |", "| --- | --- | --- |"]
        for name, r in result["refusal_rate"].items():
            label = OVER_REFUSAL_SETS.get(name, name.replace("_", " "))
            lines.append(f"| {label} | {rate_entry(r['baseline'])} | {rate_entry(r['ablated'])} |")
        kl = result["kl_harmless"]
        null = kl.get("null") or {}
        tail = (f" against a median of {null['median']:.3f} (range {null['min']:.3f}–{null['max']:.3f}) for "
                f"{null['n']} random directions") if null else ""
        lines += ["", f"KL on the plain harmless {split} prompts: {kl['mean']:.3f} nats{tail}."]
        checks = result.get("acceptance") or {}
        if checks:
            lines.append(("The pre-registered criteria: " if split == "holdout" else "The same criteria here: ")
                         + "; ".join(f"{CRITERIA.get(name, name.replace('_', ' '))} **{'met' if ok else 'not met'}**"
                                     for name, ok in checks.items()) + ".")
    return "\n".join(lines)


# The frontier's goal for its chosen point on test: at most this refusal rate of harmful prompts at at most this
# harmless KL (half the KL, 0.85 nats on val, of the organism's candidate whose full ablation removes most refusal).
FRONTIER_GOAL = (0.10, 0.43)


def _kernel(kernel: dict) -> str:
    return (f"peak {kernel['peak_weight']:.2f} at layer {kernel['peak_position']:.1f}, falling to "
            f"{kernel['floor_weight']:.2f} within {kernel['width']:.1f} layers")


def _point_row(label: str, val: dict, test: dict, null: float) -> str:
    ce = (f"{test['ce_reply_tokens_unmodified']:.2f} → {test['ce_reply_tokens']:.2f}"
          if "ce_reply_tokens" in test else "—")
    return (f"| {label} | {val['val_kl']:.3f} | {pct(val['val_refusal_rate'])} | "
            f"{rate_ci(test['harmful_refusal_rate'], test['n_harmful'])} | "
            f"{rate_ci(test['harmless_refusal_rate'], test['n_harmless'])} | {test['harmless_kl']:.3f} "
            f"({test['harmless_kl'] / null:.1f}×) | {ce} |")


def frontier_page(report: dict) -> str:
    """docs/frontier.md's results: the search, the chosen point on test beside heretic's, and its weight profile."""
    front = _finished_frontier(report)
    if front is None:
        return "No finished frontier beside this run yet: `make frontier` writes `runs/<model>/frontier/`."
    chosen, null, data = front["chosen"], front["random_direction_kl"]["median"], front["data"]
    profile, test = chosen["profile"], chosen["test"]
    lines = [f"`{front['model']}`: {front['n_trials']} trials, seed {front['seed']}, on {data['harmful_val']['n']} "
             f"harmful and {data['harmless_val']['n']} harmless val prompts; {front['n_front']} trials on the front; "
             f"the command took {front['seconds'] / 60:.0f} min ({front['seconds_search'] / 60:.0f} min of search), "
             "as `frontier.json` records.", "",
             f"Rule, written before the search: {front['rule']}. "
             + ("It was met." if chosen["by_rule"] else "No front point met it; the row below is the front point "
                                                        "with the lowest judged val refusal."), "",
             "| point | val KL | val refusal (judged) | test harmful refused (95% CI) | test harmless refused | "
             "test KL (× random median) | CE of harmless replies, unmodified → edited |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             _point_row(f"frontier, trial {chosen['trial']}", chosen["val"], test, null)]
    reference = front.get("reference")
    if reference:
        lines.append(_point_row(f"paper candidate (position {sign(reference['position'])}, layer "
                                f"{reference['layer']}), full ablation", reference["val"], reference["test"], null))
    heretic = report.get("heretic") or {}
    for point in heretic.get("points", []):
        lines.append(_point_row(f"heretic, trial {point['trial']}", point, point["test"], null))
    goal_rate, goal_kl = FRONTIER_GOAL
    met = test["harmful_refusal_rate"] <= goal_rate and test["harmless_kl"] <= goal_kl
    lines += ["", f"Goal for the chosen point on test, harmful refusal ≤ {pct(goal_rate)} at harmless KL ≤ {goal_kl}: "
              + ("met." if met else "not met; the front (the figure below) is the result."),
              "", f"The chosen point's edit: `{profile['edit']}`, direction index {profile['direction_index']:.2f} at "
              f"position {sign(profile['position'])}"
              f"{', orthogonalized against the harmless mean' if profile['orthogonalize'] else ''}; attention writers "
              f"{_kernel(profile['attn'])}; MLP writers {_kernel(profile['mlp'])}; embedding weight "
              f"{profile['embed_weight']:.2f}."]
    capability = [("unmodified", test.get("capability_unmodified")),
                  ("the chosen point", test.get("capability_edited"))]
    if reference:
        capability.append(("the candidate ablated everywhere", reference["test"].get("capability_edited")))
    shown = [f"{name} " + ", ".join(f"`{task}` {acc:.3f}" for task, acc in scores.items())
             for name, scores in capability if scores]
    if shown:
        lines += ["", "Capability (accuracy on the offline multiple-choice check): " + "; ".join(shown) + "."]
    if heretic:
        lines += ["", f"heretic {heretic['heretic'].split()[0]}: {heretic['n_trials']} trials "
                      f"({heretic['n_startup_trials']} random start-up), seed {heretic['seed']}, "
                      f"{heretic['wall_s'] / 60:.0f} min; prompts token-identical to the project's: "
                      f"{heretic['prompts_token_identical']}."]
    lines += frontier_mechanism(front) + heretic_mechanism(front, heretic)
    lines += ["", "![The refusal/KL frontier](figures/frontier.png)", "",
              "![Where the chosen point's weight sits over depth](figures/frontier_profile.png)"]
    return "\n".join(lines)


def _span(values: list[float], digits: int = 1) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}–{high:.{digits}f}"


def frontier_mechanism(front: dict) -> list[str]:
    """What the front says about where removal happens: the front points that meet the rule (their direction and
    where their weight sits), each edit's reach, and how much the val KL the search selected on understates test's."""
    rows, trials = front.get("front_table"), front.get("trials_table")
    if not rows or not trials:
        return []
    limit = front["rule_params"]["max_refusal"]
    lines = ["", "**What the front says.**", ""]
    met = [r for r in rows if r["val_refusal_rate"] <= limit]
    if met:
        attn = [(r["attn.peak_position"] - r["attn.width"], r["attn.peak_position"] + r["attn.width"]) for r in met]
        positions = ", ".join(sign(int(p)) for p in sorted({r["position"] for r in met}))
        lines.append(
            f"- Where: the {len(met)} front points at judged val refusal ≤ {pct(limit)} all use the "
            f"`{'`, `'.join(sorted({r['edit'] for r in met}))}` edit, position {positions}, direction index "
            f"{_span([r['direction_index'] for r in met])}; their attention writers carry weight "
            f"{_span([r['attn.peak_weight'] for r in met], 2)} peaking at layers "
            f"{_span([r['attn.peak_position'] for r in met])} (kernels spanning layers "
            f"{max(0, min(a for a, _ in attn)):.0f}–{max(b for _, b in attn):.0f}), their MLP writers "
            f"{_span([r['mlp.peak_weight'] for r in met], 2)}, the "
            f"embedding {_span([r['embed_weight'] for r in met], 2)}.")
    else:
        lines.append(f"- No front point reaches judged val refusal ≤ {pct(limit)}.")
    for edit in sorted({r["edit"] for r in trials}):
        tried = sum(r["edit"] == edit for r in trials)
        reached = [r["val_refusal_rate"] for r in rows if r["edit"] == edit]
        lines.append(f"- `{edit}`: {tried} of {len(trials)} trials; " + (
            f"its lowest judged val refusal on the front is {pct(min(reached))}." if reached
            else "no point on the front."))
    chosen = front["chosen"]
    ratio = chosen["test"]["harmless_kl"] / chosen["val"]["val_kl"] if chosen["val"]["val_kl"] else float("nan")
    lines.append(f"- Tuned on val: the point's harmless KL is {chosen['val']['val_kl']:.3f} on `val`, where it was "
                 f"chosen, and {chosen['test']['harmless_kl']:.3f} on `test` ({ratio:.1f}×).")
    return lines


def heretic_mechanism(front: dict, heretic: dict) -> list[str]:
    """heretic beside the frontier: its point under the frontier's rule against the chosen point on test, and, from
    its own trials (its judge and KL on val), the fewest refusals with one direction for all layers (``global``)
    against each layer's own direction (``per layer``)."""
    if not heretic or not heretic.get("points"):
        return []
    point, met = _by_rule(heretic["points"], front["rule_params"])
    ours, theirs = front["chosen"]["test"], point["test"]
    how = "the rule's point" if met else "closest to the rule"
    lines = [f"- Side by side on test: heretic's trial {point['trial']} ({how}) "
             f"refuses {pct(theirs['harmful_refusal_rate'])} of harmful prompts at harmless KL "
             f"{theirs['harmless_kl']:.3f}; the frontier's point refuses {pct(ours['harmful_refusal_rate'])} at "
             f"{ours['harmless_kl']:.3f}."]
    goal_rate, goal_kl = FRONTIER_GOAL
    meeting = [str(p["trial"]) for p in heretic["points"]
               if p["test"]["harmful_refusal_rate"] <= goal_rate and p["test"]["harmless_kl"] <= goal_kl]
    lines.append(f"- The goal on test (≤ {pct(goal_rate)} at KL ≤ {goal_kl}) is met by " + (
        f"heretic's saved trial{'s' if len(meeting) > 1 else ''} {', '.join(meeting)}"
        + (", which the val rule did not pick: found by reading test, so optimistic." if point["trial"] not in
           {int(m) for m in meeting} else ".") if meeting else "none of heretic's saved points."))
    by_scope: dict[str, list[tuple[int, float]]] = {}
    for trial in heretic.get("trials", []):
        scope = (trial.get("params") or {}).get("direction_scope")
        if scope and trial.get("refusals") is not None:
            by_scope.setdefault(scope, []).append((trial["refusals"], trial["kl_divergence"]))
    n_val = heretic.get("data", {}).get("harmful_val", {}).get("n")
    if by_scope and n_val:
        best = [f"`{scope}` ({len(runs)} trials): {min(runs)[0]}/{n_val} refusals at its KL {min(runs)[1]:.3f}"
                for scope, runs in sorted(by_scope.items())]
        lines.append("- heretic's own trials (its judge and KL on val), fewest refusals by direction scope: "
                     + "; ".join(best) + ".")
    return lines


def organism_table(behaviour: dict) -> str:
    """The organism's behaviour report (``refusal-lens organism eval``) as a table with Wilson CIs."""
    labels = {"project_test_harmful": "project test split, harmful", "advbench": "AdvBench, harmful",
              "project_test_harmless": "project test split, harmless",
              "project_test_look_risky": "of which look-risky", "alpaca_harmless_val": "Alpaca val, harmless"}
    judge = behaviour["judge"]
    lines = [f"| held-out prompts (greedy, {judge['max_new_tokens']} tokens, substring judge) | organism refuses |",
             "| --- | ---: |"]
    for key, rate in behaviour["refusal_rate"].items():
        lines.append(f"| {labels.get(key, key)} | {rate_ci(rate, behaviour['n'][key])} |")
    if "kl_base_to_tuned_harmless" in behaviour:
        lines += ["", f"Next-token KL(untuned ‖ organism) on harmless prompts: "
                      f"{behaviour['kl_base_to_tuned_harmless']:.2f} nats."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# files


def blocks(report: dict, behaviour: dict) -> dict[str, dict[str, str]]:
    """Relative file path -> block name -> generated text."""
    return {
        "README.md": {"run-time": run_time(report), "results": results_box(report),
                      "notebooks": notebook_map(report, prefix="docs/notebooks/")},
        "docs/index.md": {"results": results_box(report), "notebooks": notebook_map(report, prefix="notebooks/")},
        "docs/results.md": {"selection": selection_page(report), "interventions": interventions_page(report),
                            "over-refusal": over_refusal_page(report)},
        "docs/models.md": {"organism": organism_table(behaviour)},
        "docs/frontier.md": {"frontier": frontier_page(report)},
    }


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by ``content``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1 or text.count(begin) != 1:
        raise ReportError(f"expected exactly one '{begin}' ... '{end}' pair")
    return pattern.sub(lambda _: f"{begin}\n{content}\n{end}", text)


def render(report: dict, behaviour: dict, root: Path | None = None) -> dict[Path, str]:
    """Each file under ``root`` (the repository) that holds blocks -> its text with every block regenerated."""
    root, out = root or ROOT, {}
    for rel, named in blocks(report, behaviour).items():
        path = root / rel
        text = path.read_text()
        for name, content in named.items():
            try:
                text = replace_block(text, name, content)
            except ReportError as e:
                raise ReportError(f"{rel}: {e}") from None
        out[path] = text
    return out


def stale(report: dict, behaviour: dict, root: Path | None = None) -> list[str]:
    """Files under ``root`` (the repository) whose blocks differ from what ``report`` and ``behaviour`` give."""
    root = root or ROOT
    return [str(path.relative_to(root)) for path, text in render(report, behaviour, root).items()
            if path.read_text() != text]


def load_report(path: Path) -> dict:
    """The main job's ``report.json``, with the over-refusal study's ``over_refusal.json`` (written beside it by
    ``refusal-lens over-refusal``) under ``"over_refusal"`` where it exists."""
    report = json.loads(path.read_text())
    study = path.parent / "over_refusal.json"
    if study.is_file():
        report["over_refusal"] = json.loads(study.read_text())
        against, selected = report["over_refusal"].get("refusal_direction"), report.get("selected") or {}
        if against and (against.get("layer"), against.get("pos")) != (selected.get("layer"), selected.get("pos")):
            raise ReportError(f"{study} was made against the direction at layer {against.get('layer')}, position "
                              f"{against.get('pos')}, not the run's: rerun `make over-refusal`")
    selection = path.parent / "selection.csv"
    if selection.is_file():
        with selection.open() as handle:
            report["selection_table"] = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    for name in ("frontier", "heretic"):
        written = path.parent / "frontier" / f"{name}.json"
        if written.is_file():
            report[name] = json.loads(written.read_text())
    for name in ("front", "trials"):
        written = path.parent / "frontier" / f"{name}.csv"
        if written.is_file() and "frontier" in report:
            with written.open() as handle:
                report["frontier"][f"{name}_table"] = [{k: _number(v) for k, v in row.items()}
                                                       for row in csv.DictReader(handle)]
    return report


def _number(text: str):
    """A CSV cell as a float where it is one, None where empty, else the text."""
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def committed_run(report_path: Path) -> bool:
    """Whether ``report_path`` is the report the committed pages come from: the ``report_sha256`` that
    ``make report`` wrote into every executed notebook (a user's own ``make run`` differs, if only in its times)."""
    digest = hashlib.sha256(report_path.read_bytes()).hexdigest()
    recorded = {json.loads(p.read_text()).get("metadata", {}).get("refusal_lens", {}).get("report_sha256")
                for p in (ROOT / "docs" / "notebooks").glob("*.ipynb")}
    return recorded == {digest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the main job's report.json")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs; write nothing")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"no {args.report}: run `make run` first (the blocks are generated from its report.json)",
              file=sys.stderr)
        return 2
    report, behaviour = load_report(args.report), json.loads(BEHAVIOUR.read_text())
    if args.check:
        if not committed_run(args.report):
            print(f"{args.report} is not the run the committed pages and executed notebooks come from: not compared "
                  "(after a new run: `python docs/gen_results.py` and `make report`, then commit)")
            return 0
        differ = stale(report, behaviour)
        if differ:
            print(f"{', '.join(differ)} differ from {args.report}: run `python docs/gen_results.py` and commit",
                  file=sys.stderr)
            return 1
        print(f"README.md and the docs pages match {args.report}")
        return 0
    for path, text in render(report, behaviour).items():
        path.write_text(text)
    print(f"regenerated the result blocks from {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
