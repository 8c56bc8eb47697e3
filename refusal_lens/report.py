"""The main job's report as text: what ``refusal-lens run`` prints at the end (from ``report.json``)."""

from __future__ import annotations


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
        f"orthogonalized vs hooks   max logit diff {report['orthogonalized_vs_hooks_max_logit_diff']:.2e}"
        + _orthogonalization_note(report.get("orthogonalization") or {}),
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


def over_refusal_lines(over: dict) -> list[str]:
    """The over-refusal study (``over_refusal.json``): its gate, and when it ran, the pick and the test refusal
    rates (Wilson 95% CIs)."""
    gate = over["look_risky_val_refusal"]
    lines = [f"over-refusal (val)        look-risky refused {gate['rate']:.1%} ({gate['refused']}/{gate['n']}), "
             f"threshold {over['threshold']:.0%}" + ("" if over["ran"] else ": not run")]
    if "selection_failed" in over:
        return [*lines, f"  false-refusal vector    {over['selection_failed']}"]
    if "selected" not in over:
        return lines
    sel = over["selected"]
    lines.append(f"  false-refusal vector    pos {sel['pos']}, layer {sel['layer']}, "
                 f"orthogonalize {sel['orthogonalize']:g}")
    for split in ("test", "holdout"):
        if split not in over:
            continue
        result = over[split]
        for name, label in (("look_risky", "look-risky"), ("harmful_all", "harmful"), ("harmless", "plain harmless")):
            base, ablated = result["refusal_rate"][name]["baseline"], result["refusal_rate"][name]["ablated"]
            lines.append(f"  {f'{label} ({split})':<26} {_rate(base)} -> {_rate(ablated)} with it ablated")
        kl = result["kl_harmless"]
        null = f" (random directions: median {kl['null']['median']:.4f})" if kl["null"] else ""
        lines.append(f"  {f'KL on harmless ({split})':<26} {kl['mean']:.4f} nats{null}")
    return lines


def _rate(rate: dict) -> str:
    return f"{rate['rate']:.1%} [{rate['ci_low']:.1%}, {rate['ci_high']:.1%}] (n={rate['n']})"


def _judge_lines(judged: dict) -> list[str]:
    if "skipped" in judged:
        return [f"judge                     skipped: {judged['skipped']}"]
    return [f"judge {judged['judge']} ({judged['prompt']}):"] + [
        f"  {row['condition']:<18} refusal {row['refusal_rate']:.1%}, compliance {row['compliance']:.2f}, "
        f"coherence {row['coherence']:.2f}, unknown {row['n_unknown']}/{row['n']}" for row in judged["table"]]


def _orthogonalization_note(edit: dict) -> str:
    """Where weight orthogonalization is not hook ablation's map (post-sublayer norms), say so and give its leak."""
    if edit.get("equals_hook_ablation", True):
        return ""
    return (f" (not the same map: post-sublayer norms; residual stream still orthogonal, leak "
            f"{edit.get('residual_leak', float('nan')):.1e})")
