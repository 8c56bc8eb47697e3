"""The end-to-end run behind ``refusal-lens run``: a row of named steps, each writing into the run folder.

``filter`` -> ``extraction`` -> ``statistics`` -> ``selection`` -> ``interventions`` -> ``over_refusal`` ->
``figures`` (with timings per step in ``report.json``). Data use: directions from the ``train`` split, selection on the
``val`` split, every reported number on the held-out ``test`` split, of the built-in ``refusal-pairs`` set or
of files in the paper's format (``rl.load_splits``). As in the paper's pipeline (``filter_train`` /
``filter_val``), train and val keep only the harmful prompts the model refuses and the harmless ones it
answers, by the sign of the refusal score; the test split is never filtered. Selection follows the paper's
rule unless the config names a deviation (``kl_max="null:q"``, ``fallback="lowest-kl"``); when nothing
passes, the run writes what it has and stops, as the paper's code does. A direction from elsewhere
(``direction=``) or a chosen candidate (``pick=``) skips selection. The folder layout is
:mod:`refusal_lens.runs`'; the intervention stage is :func:`refusal_lens.effects.intervention_effects`; the
printed summary is :func:`refusal_lens.report.summary_lines`. The ``over_refusal`` step
(:func:`refusal_lens.over_refusal.over_refusal_stage`, skipped with ``over_refusal=False`` / ``--no-over-refusal``)
measures the model's refusal of look-risky harmless val requests and, above a threshold, selects a false-refusal
vector and tests its ablation (``report["over_refusal"]``, ``false_refusal.safetensors``). Replies to harmful
prompts are stored only as verdicts (and at most 60 characters in examples).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from . import plots, stats
from .data import ContrastSet, load_splits
from .directions import Directions, diff_in_means, load_direction
from .effects import alpha_sweep, intervention_effects
from .manifest import file_sha256, write_manifest
from .models import Model
from .over_refusal import OverRefusalConfig, over_refusal_stage
from .runs import RunFolder
from .selection import SelectionError, random_direction_kl, select_direction


@dataclass(frozen=True)
class RunConfig:
    """Data, sizes, rules and seeds of a run; the defaults are the paper's rules at sizes that finish in
    about 10 minutes on 2 CPU cores for the organism (the paper: 128 train, 32 val, 512 new tokens)."""

    harmful: str | None = (
        None  # files or a folder in the refusal_direction format (rl.load_splits); None: refusal-pairs
    )
    harmless: str | None = None
    data: str = "refusal-pairs"  # the built-in contrast set used when harmful/harmless are None: or "paper"
    n_train: int | None = None  # train prompts per side (None: the whole split)
    n_val: int = 24  # validation prompts per side for selection (the paper-size 32 adds ~2 min on 2 CPU cores)
    n_test: int | None = None  # test prompts per side for behaviour (None: the whole test split)
    filter_by_refusal: bool = (
        True  # the paper's train/val filter by refusal-score sign; False for models that do not refuse
    )
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
    over_refusal: bool = True  # the over-refusal step (issue 23); False (--no-over-refusal) skips it
    over_refusal_settings: OverRefusalConfig | None = None  # None: its defaults with this run's n_test, tokens, seed


MIN_KEPT_SHARE = 0.5  # the filter may drop at most half of a side before the run refuses to go on


@dataclass
class _Run:
    """What the steps of one run share: the model, the config, the folder, the report and figures so far."""

    model: Model
    config: RunConfig
    folder: RunFolder
    log: Callable[[str], object]
    report: dict
    figures: dict
    started: float
    timings: dict

    def step(self, name: str) -> None:
        """Record a step's duration and say that it is done."""
        self.timings[name] = round(time.perf_counter() - self.started - sum(self.timings.values()), 1)
        self.log(f"[{time.perf_counter() - self.started:6.0f} s] {name} done")


def run(model: Model, out: str | Path, config: RunConfig = RunConfig(), log: Callable[[str], object] = print) -> dict:
    """Run the pipeline on a loaded model and write its outputs to the folder ``out``; returns the report.

    Raises :class:`~refusal_lens.selection.SelectionError` after writing the report, the tables and the
    manifest when no candidate passes the selection rule (the paper's code stops there too).
    """
    if config.direction is not None and config.direction_layer is None:
        raise ValueError("an external direction needs the layer to add it at: pass direction_layer (--layer)")
    if config.direction is not None and config.pick is not None:
        raise ValueError("pass either an external direction (--direction) or a candidate (--pick), not both")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _Run(model, config, RunFolder(out, out / "figures"), log,
                 {"model": asdict(model.info), "config": asdict(config)}, {}, time.perf_counter(), {})
    splits = _load_data(state)
    test, val = splits["test"], splits["val"]
    harmful_test, harmless_test = test.harmful_texts[: config.n_test], test.harmless_texts[: config.n_test]
    harmful_val, harmless_val = val.harmful_texts[: config.n_val], val.harmless_texts[: config.n_val]
    state.report["selected"] = None
    if config.direction is not None:
        vector, layer, position = _external_direction(state, harmless_val)
    else:
        vector, layer, position = _extract_and_select(state, splits["train"], harmful_val, harmless_val, harmful_test,
                                                      harmless_test)
    state.folder.save_direction(vector, layer=layer, position=position, source=state.report["selected"]["how"])
    _interventions(state, vector, layer, harmful_test, harmless_test)
    if config.over_refusal:
        _over_refusal(state, vector, layer, position)
    return _finish(state)


def _load_data(state: _Run) -> dict[str, ContrastSet]:
    """The run's train/val/test splits (train capped at ``n_train``), train and val filtered as the paper."""
    config = state.config
    splits = load_splits(config.harmful, config.harmless, seed=config.seed, data=config.data)
    if config.n_train is not None:
        train = splits["train"]
        splits["train"] = ContrastSet(train.name, train.harmful[: config.n_train], train.harmless[: config.n_train])
    unfiltered = {name: (len(s.harmful), len(s.harmless)) for name, s in splits.items()}
    if config.filter_by_refusal:
        splits.update({name: splits[name].filter_by_refusal(state.model, min_kept_share=MIN_KEPT_SHARE)
                       for name in ("train", "val")})
        state.step("filter")
    state.report["data"] = {
        name: {"n_harmful": len(s.harmful), "n_harmless": len(s.harmless), **s.hashes(),
               "before_filter": {"n_harmful": unfiltered[name][0], "n_harmless": unfiltered[name][1]}}
        for name, s in splits.items()}
    return splits


def _external_direction(state: _Run, harmless_val: list[str]) -> tuple[Tensor, int, None]:
    """``config.direction`` (raw, as stored) with its layer; the KL null for reading its KL."""
    config = state.config
    vector = load_direction(config.direction, state.model, normalize=False)
    state.report["direction_source"] = {"file": str(config.direction), "sha256": file_sha256(config.direction),
                                        "layer": config.direction_layer}
    _report_null(state, random_direction_kl(state.model, harmless_val, n_directions=config.n_null_directions,
                                            seed=config.seed, batch_size=config.batch_size))
    state.report["selected"] = {"pos": None, "layer": config.direction_layer,
                                "how": f"given: {config.direction} (--direction, --layer)"}
    return vector, config.direction_layer, None


def _extract_and_select(state: _Run, train: ContrastSet, harmful_val: list[str], harmless_val: list[str],
                        harmful_test: list[str], harmless_test: list[str]) -> tuple[Tensor, int, int]:
    """Candidates on train, their statistics on test, and the candidate to use (selected on val, or picked)."""
    model, config, report = state.model, state.config, state.report
    directions = diff_in_means(model, train.harmful_texts, train.harmless_texts, batch_size=config.batch_size)
    state.folder.save_directions(directions)
    report["positions"] = directions.positions
    state.step("extraction")
    separability, stability = _statistics(state, directions, train, harmful_test, harmless_test)
    peak = separability[separability.valid].sort_values("d", ascending=False).iloc[0]
    report["cohens_d_peak"] = {"pos": int(peak.pos), "layer": int(peak.layer), "d": round(float(peak.d), 3),
                               "ci": [round(float(peak.ci_low), 3), round(float(peak.ci_high), 3)]}
    state.step("statistics")
    report["selected"] = _choose_candidate(state, directions, harmful_val, harmless_val)
    state.step("selection")
    if report["selected"] is None:
        _finish(state)
        raise SelectionError(report["selection_failed"])
    pos, layer = report["selected"]["pos"], report["selected"]["layer"]
    state.folder.save_selected(pos, layer, report["selected"]["how"])
    at = lambda table: table[(table.pos == pos) & (table.layer == layer)]  # noqa: E731
    report["cohens_d_selected"] = round(float(at(separability).d.iloc[0]), 3)
    report["split_half_cosine_selected"] = round(float(at(stability).cosine.iloc[0]), 4)
    return directions.direction(pos, layer, unit=False), layer, pos


def _statistics(state: _Run, directions: Directions, train: ContrastSet, harmful_test: list[str],
                harmless_test: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out Cohen's d, cross-layer cosines, batched vs sequential and split-half stability (CSVs + figures)."""
    model, config, out = state.model, state.config, state.folder.path
    separability = stats.cohens_d(model, directions, harmful_test, harmless_test, n_boot=config.n_boot,
                                  seed=config.seed, batch_size=config.batch_size)
    separability.to_csv(out / "cohens_d.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer 0 is a known zero-norm candidate; its cosines are NaN
        cosines = stats.layer_cosines(directions, -1)
    cosines.to_csv(out / "layer_cosines_pos-1.csv")
    padding = stats.batched_vs_sequential(model, harmful_test[: config.n_padding_check], batch_size=config.batch_size)
    padding.to_csv(out / "batched_vs_sequential.csv", index=False)
    state.figures.update(cohens_d=plots.cohens_d(separability), layer_cosines=plots.cosine_heatmap(cosines),
                         batched_vs_sequential=plots.batched_vs_sequential(padding))
    stability = stats.split_half_stability(model, train.harmful_texts, train.harmless_texts, seed=config.seed,
                                           batch_size=config.batch_size)
    stability.to_csv(out / "split_half.csv", index=False)
    return separability, stability


def _report_null(state: _Run, null_kl: Float[Tensor, " n_directions"]) -> None:
    """The KL filter's null in the report: ablating random unit directions on the same val harmless prompts."""
    state.report["kl_random_directions"] = {
        "n": len(null_kl), "median": round(float(null_kl.median()), 5), "min": round(float(null_kl.min()), 5),
        "max": round(float(null_kl.max()), 5), "share_below_0.1": round(float((null_kl < 0.1).double().mean()), 4),
        "values": [round(float(x), 5) for x in null_kl]}


def _choose_candidate(
    state: _Run, directions: Directions, harmful_val: list[str], harmless_val: list[str]
) -> dict | None:
    """The candidate to intervene with, ``config.pick`` or the selection rule's, as the report's ``selected``
    entry (``None``, with ``selection_failed`` in the report, when nothing passes)."""
    model, config, report = state.model, state.config, state.report
    if config.pick is not None:
        pos, layer = config.pick
        directions.direction(pos, layer)  # raises for a candidate that does not exist or has zero norm
        _report_null(state, random_direction_kl(model, harmless_val, n_directions=config.n_null_directions,
                                                seed=config.seed, batch_size=config.batch_size))
        return {"pos": pos, "layer": layer, "how": "given: --pick"}
    selection = select_direction(model, directions, harmful_val, harmless_val, kl_max=config.kl_max,
                                 fallback=config.fallback, n_null=config.n_null_directions, n_boot=config.n_boot,
                                 seed=config.seed, batch_size=config.batch_size, full_table=config.full_selection_table)
    selection.table.to_csv(state.folder.path / "selection.csv", index=False)
    state.figures["selection"] = plots.selection_scores(selection.table)
    _report_null(state, selection.null_kl)
    report["selection_rule"] = {**asdict(selection.thresholds), "rule": selection.rule}
    if selection.best is None:
        report["selection_failed"] = selection.failure_message()
        return None
    row = selection.best_row
    return {"pos": selection.best[0], "layer": selection.best[1], "bypass": row.bypass, "induce": row.induce,
            "kl": row.kl, "how": selection.rule, "bootstrap_win_rate": selection.win_rate,
            "baseline_scores": selection.baseline}


def _interventions(state: _Run, vector: Tensor, layer: int, harmful_test: list[str], harmless_test: list[str]) -> None:
    """The intervention stage and the alpha sweep, into the report, tables and figures."""
    model, config, out = state.model, state.config, state.folder.path
    effects = intervention_effects(model, vector, layer, harmful_test, harmless_test,
                                   max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                   judge=config.judge, capability_tasks=config.capability_tasks,
                                   capability_limit=config.capability_limit, log=state.log)
    if effects.judged is not None:
        effects.judged.to_csv(out / "judge.csv", index=False)  # verdicts only: judge_conditions keeps no reply
    if len(effects.capability):
        effects.capability.to_csv(out / "capability.csv", index=False)
    state.report.update(effects.report())
    sweep = alpha_sweep(model, vector, harmful_test[: config.n_alpha], config.alphas, batch_size=config.batch_size)
    sweep.to_csv(out / "alpha_sweep.csv", index=False)
    state.report["alpha_sweep"] = sweep.round(4).to_dict(orient="list")
    state.figures.update(refusal_rates=plots.refusal_rates(state.report["refusal_rate"]),
                         alpha_sweep=plots.alpha_sweep(sweep))
    state.step("interventions")


def _over_refusal(state: _Run, vector: Tensor, layer: int, position: int | None) -> None:
    """The over-refusal step: ``report["over_refusal"]`` and, when a vector is chosen, ``false_refusal.safetensors``
    beside ``direction.safetensors`` and its selection table as ``over_refusal_selection.csv``."""
    config = state.config
    settings = config.over_refusal_settings or OverRefusalConfig(n_test=config.n_test,
                                                                 max_new_tokens=config.max_new_tokens, seed=config.seed)
    report, false_refusal, meta = over_refusal_stage(state.model, vector, layer=layer, position=position,
                                                     config=settings, log=state.log)
    state.report["over_refusal"] = report
    if "selection" in report:
        pd.DataFrame(report["selection"]["table"]).to_csv(state.folder.path / "over_refusal_selection.csv", index=False)
    if false_refusal is not None:
        source = (f"false-refusal vector (issue 23): look-risky minus harmless at pos {meta['pos']}, layer "
                  f"{meta['layer']}, λ = {meta['lambda']:g} of its component along the refusal direction removed; "
                  f"{meta['rule']}")
        path = state.folder.save_direction(false_refusal, layer=meta["layer"], position=meta["pos"], source=source,
                                           name="false_refusal")
        report["file"] = path.name
    state.step("over_refusal")


def _finish(state: _Run) -> dict:
    """Write the figures, ``report.json`` and ``manifest.json``; returns the report."""
    for name, fig in state.figures.items():
        state.folder.save_figure(fig, name, static=state.config.static_figures)
    state.report["figures"] = sorted(state.figures)
    state.step("figures")
    state.report["seconds"] = state.timings
    out = state.folder.path
    (out / "report.json").write_text(json.dumps(state.report, indent=2, default=float) + "\n")
    write_manifest(out, model=asdict(state.model.info), data=state.report["data"],
                   positions=state.report.get("positions"), seed=state.config.seed, config=asdict(state.config),
                   outputs=sorted(p.name for p in out.iterdir()))
    return state.report
