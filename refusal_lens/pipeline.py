"""The main job behind ``refusal-lens run``: a flat row of named steps, each a function that returns a typed result.

``load_data`` -> ``extract`` -> ``measure_statistics`` -> ``choose_direction`` -> ``measure_interventions`` ->
``finish``; :func:`run` is that row, and the report is built from the steps' results in one place
(:func:`build_report`). Data use: directions from the ``train`` split, selection on the ``val`` split, every
reported number on the held-out ``test`` split, of the built-in ``refusal-pairs`` set or of files in the paper's
format (``rl.load_splits``). As in the paper's pipeline (``filter_train`` / ``filter_val``), train and val keep
only the harmful prompts the model refuses and the harmless ones it answers, by the sign of the refusal score; the
test split is never filtered. Selection follows the paper's rule unless the config names a deviation
(``kl_max="null:q"``, ``fallback="lowest-kl"``); when nothing passes, the run writes what it has and raises
:class:`~refusal_lens.selection.SelectionError` carrying the report, as the paper's code stops there. A direction
from elsewhere (``direction=``) or a chosen candidate (``pick=``) skips selection.

The over-refusal study is its own command (``refusal-lens over-refusal``, :func:`run_over_refusal`): it reads the
run's direction and writes ``over_refusal.json`` beside ``report.json``. Replies to harmful prompts are stored only
as verdicts (and at most 60 characters in examples).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from . import kl_null, plots, stats
from .config import RunConfig
from .data import ContrastSet, load_splits
from .directions import Directions, diff_in_means, load_direction
from .effects import InterventionEffects, alpha_sweep, intervention_effects
from .manifest import file_sha256
from .models import Model
from .over_refusal import OverRefusalConfig, over_refusal_stage
from .runs import RunFolder
from .selection import Selection, SelectionError, random_direction_kl, select_direction

MIN_KEPT_SHARE = 0.5  # the filter may drop at most half of a side before the run refuses to go on


class StepClock:
    """Seconds per step since the previous one, logged as each step ends."""

    def __init__(self, log: Callable[[str], object]):
        self.log, self.started, self.seconds = log, time.perf_counter(), {}

    def begin(self, what: str) -> None:
        """Say what the next step does (long steps also show a progress bar)."""
        self.log(f"[{time.perf_counter() - self.started:6.0f} s] {what}")

    def done(self, step: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.seconds[step] = round(elapsed - sum(self.seconds.values()), 1)
        self.log(f"[{elapsed:6.0f} s] {step} done")


# ------------------------------------------------------------------ step results
@dataclass
class RunData:
    """The run's prompts: train/val/test splits (train and val filtered by refusal), and the counts before."""

    splits: dict[str, ContrastSet]
    unfiltered: dict[str, tuple[int, int]]
    n_val: int
    n_test: int | None

    @property
    def harmful_val(self) -> list[str]:
        return self.splits["val"].harmful_texts[: self.n_val]

    @property
    def harmless_val(self) -> list[str]:
        return self.splits["val"].harmless_texts[: self.n_val]

    @property
    def harmful_test(self) -> list[str]:
        return self.splits["test"].harmful_texts[: self.n_test]

    @property
    def harmless_test(self) -> list[str]:
        return self.splits["test"].harmless_texts[: self.n_test]

    def report(self) -> dict:
        return {name: {"n_harmful": len(s.harmful), "n_harmless": len(s.harmless), **s.hashes(),
                       "before_filter": {"n_harmful": self.unfiltered[name][0], "n_harmless": self.unfiltered[name][1]}}
                for name, s in self.splits.items()}


@dataclass
class Statistics:
    """Held-out Cohen's d, cross-layer cosines (position -1), batched vs sequential and split-half stability."""

    separability: pd.DataFrame
    cosines: pd.DataFrame
    padding: pd.DataFrame
    stability: pd.DataFrame

    def peak(self) -> dict:
        """The candidate with the largest Cohen's d, with its bootstrap interval."""
        peak = self.separability[self.separability.valid].sort_values("d", ascending=False).iloc[0]
        return {"pos": int(peak.pos), "layer": int(peak.layer), "d": round(float(peak.d), 3),
                "ci": [round(float(peak.ci_low), 3), round(float(peak.ci_high), 3)]}

    def at(self, pos: int, layer: int) -> dict:
        """Cohen's d and the split-half cosine of one candidate."""
        def at(table: pd.DataFrame) -> pd.DataFrame:
            return table[(table.pos == pos) & (table.layer == layer)]
        return {"cohens_d_selected": round(float(at(self.separability).d.iloc[0]), 3),
                "split_half_cosine_selected": round(float(at(self.stability).cosine.iloc[0]), 4)}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"cohens_d": self.separability, "layer_cosines_pos-1": self.cosines,
                "batched_vs_sequential": self.padding, "split_half": self.stability}

    def figures(self, model: str, data: RunData) -> dict:
        n_test = {"harmful": len(data.harmful_test), "harmless": len(data.harmless_test)}
        return {"cohens_d": plots.cohens_d(self.separability, model=model, n=n_test),
                "layer_cosines": plots.cosine_heatmap(self.cosines, model=model),
                "batched_vs_sequential": plots.batched_vs_sequential(self.padding, model=model,
                                                                     n={"harmful": len(self.padding)})}


@dataclass
class Choice:
    """The direction the run intervenes with, and how it was chosen.

    Attributes:
        vector: the raw vector ``[d_model]`` (difference in means, or as given): added at ``layer``, its unit
            direction ablated everywhere; ``None`` when selection picked nothing.
        layer, position: where it comes from (``position`` is ``None`` for a given direction).
        selected: the report's ``selected`` entry (``None`` when nothing passed).
        null_kl: mean KL of ablating each random unit direction on the harmless val prompts.
        selection: the full selection result when the rule chose (table, thresholds, win rate).
    """

    vector: Float[Tensor, " d_model"] | None
    layer: int | None
    position: int | None
    selected: dict | None
    null_kl: Float[Tensor, " n_directions"] | None
    selection: Selection | None = None

    def report(self) -> dict:
        report: dict = {"selected": self.selected}
        if self.null_kl is not None:
            report["kl_random_directions"] = kl_null.summary(self.null_kl)
        if self.selection is not None:
            report["selection_rule"] = {**self.selection.thresholds.summary(), "rule": self.selection.rule}
            if self.selection.best is None:
                report["selection_failed"] = self.selection.failure_message()
        return report


@dataclass
class Interventions:
    """The intervention stage's effects on the test prompts and the α sweep."""

    effects: InterventionEffects
    sweep: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        """``judge`` (verdicts only) and ``capability`` where they exist, and ``alpha_sweep``."""
        tables = {"judge": self.effects.judged, "capability": self.effects.capability if len(self.effects.capability)
                  else None, "alpha_sweep": self.sweep}
        return {name: table for name, table in tables.items() if table is not None}

    def report(self) -> dict:
        return {**self.effects.report(), "alpha_sweep": self.sweep.round(4).to_dict(orient="list")}


# ------------------------------------------------------------------ steps
def load_data(model: Model, config: RunConfig) -> RunData:
    """The run's train/val/test splits (train capped at ``n_train``), train and val filtered as the paper."""
    splits = load_splits(config.harmful, config.harmless, data=config.data, seed=config.seed)
    if config.n_train is not None:
        train = splits["train"]
        splits["train"] = ContrastSet(train.name, train.harmful[: config.n_train], train.harmless[: config.n_train])
    unfiltered = {name: (len(s.harmful), len(s.harmless)) for name, s in splits.items()}
    if config.filter_by_refusal:
        splits.update({name: splits[name].filter_by_refusal(model, min_kept_share=MIN_KEPT_SHARE, progress=True)
                       for name in ("train", "val")})
    return RunData(splits, unfiltered, config.n_val, config.n_test)


def extract(model: Model, data: RunData, config: RunConfig) -> Directions:
    """Difference-in-means candidates at every end-of-instruction position and layer, from the train split."""
    train = data.splits["train"]
    return diff_in_means(model, train.harmful_texts, train.harmless_texts, batch_size=config.batch_size)


def measure_statistics(model: Model, candidates: Directions, data: RunData, config: RunConfig) -> Statistics:
    """Cohen's d of every candidate on test, cosines between layers, the padding check, split-half stability."""
    separability = stats.cohens_d(model, candidates, data.harmful_test, data.harmless_test, n_boot=config.n_boot,
                                  seed=config.seed, batch_size=config.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer 0 is a known zero-norm candidate; its cosines are NaN
        cosines = stats.layer_cosines(candidates, -1)
    padding = stats.batched_vs_sequential(model, data.harmful_test[: config.n_padding_check],
                                          batch_size=config.batch_size)
    train = data.splits["train"]
    stability = stats.split_half_stability(model, train.harmful_texts, train.harmless_texts, seed=config.seed,
                                           batch_size=config.batch_size)
    return Statistics(separability, cosines, padding, stability)


def choose_direction(model: Model, candidates: Directions | None, data: RunData, config: RunConfig) -> Choice:
    """The direction to intervene with: given (``config.direction``), picked (``config.pick``) or selected on val."""
    if config.direction is not None:
        vector = load_direction(config.direction, model, normalize=False)
        how = f"given: {config.direction} (--direction, --direction-layer)"
        return Choice(vector, config.direction_layer, None, {"pos": None, "layer": config.direction_layer, "how": how},
                      _null_kl(model, data, config))
    if config.pick is not None:
        pos, layer = config.pick
        vector = candidates.vector(pos, layer)  # raises for a missing or zero-norm candidate
        return Choice(vector, layer, pos, {"pos": pos, "layer": layer, "how": "given: --pick"},
                      _null_kl(model, data, config))
    selection = select_direction(model, candidates, data.harmful_val, data.harmless_val, kl_max=config.kl_max,
                                 fallback=config.fallback, n_null=config.n_null_directions, n_boot=config.n_boot,
                                 seed=config.seed, batch_size=config.batch_size, full_table=config.full_selection_table,
                                 progress=True)
    if selection.best is None:
        return Choice(None, None, None, None, selection.null_kl, selection)
    row = selection.best_row
    pos, layer = selection.best
    selected = {"pos": pos, "layer": layer, "bypass": row.bypass, "induce": row.induce, "kl": row.kl,
                "how": selection.rule, "bootstrap_win_rate": selection.win_rate, "baseline_scores": selection.baseline}
    return Choice(selection.vector, layer, pos, selected, selection.null_kl, selection)


def _null_kl(model: Model, data: RunData, config: RunConfig) -> Float[Tensor, " n_directions"]:
    """The KL null for reading a given direction's KL: random directions ablated on the harmless val prompts."""
    return random_direction_kl(model, data.harmless_val, n_directions=config.n_null_directions, seed=config.seed,
                               batch_size=config.batch_size)


def measure_interventions(model: Model, choice: Choice, data: RunData, config: RunConfig,
                          log: Callable[[str], object] = print) -> Interventions:
    """The paper's interventions with the chosen vector on the test prompts, and the α sweep."""
    effects = intervention_effects(model, choice.vector, choice.layer, data.harmful_test, data.harmless_test,
                                   max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                   judge=config.judge, capability_tasks=config.capability_tasks,
                                   capability_limit=config.capability_limit, log=log)
    sweep = alpha_sweep(model, choice.vector, data.harmful_test[: config.n_alpha], config.alphas,
                        batch_size=config.batch_size, progress=True)
    return Interventions(effects, sweep)


def build_report(model: Model, config: RunConfig, data: RunData, candidates: Directions | None,
                 statistics: Statistics | None, choice: Choice, interventions: Interventions | None) -> dict:
    """``report.json``'s content, from the steps' results."""
    report: dict = {"model": asdict(model.info), "config": asdict(config), "data": data.report()}
    if config.direction is not None:
        report["direction_source"] = {"file": str(config.direction), "sha256": file_sha256(config.direction),
                                      "layer": config.direction_layer}
    if candidates is not None:
        report["positions"] = candidates.positions
    if statistics is not None:
        report["cohens_d_peak"] = statistics.peak()
    report.update(choice.report())
    if statistics is not None and choice.position is not None:
        report.update(statistics.at(choice.position, choice.layer))
    if interventions is not None:
        report.update(interventions.report())
    return report


def run(model: Model, out: str | Path, config: RunConfig | None = None, log: Callable[[str], object] = print) -> dict:
    """Run the main job on a loaded model and write its outputs to the folder ``out``; returns the report.

    ``config``: :class:`~refusal_lens.config.RunConfig` (``None``: its defaults).

    Raises :class:`~refusal_lens.selection.SelectionError` (its ``report`` attribute holds the report) after
    writing the report, the tables and the manifest when no candidate passes the selection rule.
    """
    config = config or RunConfig()
    folder = RunFolder.create(out)
    clock = StepClock(log)
    clock.begin("filter: train and val keep the harmful prompts the model refuses and the harmless ones it answers")
    data = load_data(model, config)
    clock.done("filter")
    candidates = statistics = None
    if config.direction is None:
        clock.begin("extraction: difference-in-means candidates at every end-of-instruction position and layer")
        candidates = extract(model, data, config)
        folder.save_directions(candidates)
        clock.done("extraction")
        clock.begin("statistics: Cohen's d on test, layer cosines, padding check, split-half stability")
        statistics = measure_statistics(model, candidates, data, config)
        for name, table in statistics.tables().items():
            folder.save_table(table, name, index=name.startswith("layer_cosines"))
        clock.done("statistics")
    clock.begin("selection: random-direction KL null, then bypass / induce / KL of the candidates on val")
    choice = choose_direction(model, candidates, data, config)
    if choice.selection is not None:
        folder.save_table(choice.selection.table, "selection")
    clock.done("selection")
    spec = model.info.spec
    figures = statistics.figures(spec, data) if statistics is not None else {}
    if choice.selection is not None:
        selection = choice.selection
        figures["selection"] = plots.selection_scores(
            selection.table, kl_max=selection.thresholds.kl_max, induce_min=selection.thresholds.bound("induce"),
            max_layer=selection.thresholds.max_layer, pick=selection.best,
            rule=selection.rule.split(":")[0] if selection.rule else None, model=spec,
            n={"harmful": len(data.harmful_val), "harmless": len(data.harmless_val)})
    if choice.vector is None:
        report = build_report(model, config, data, candidates, statistics, choice, None)
        _finish(model, folder, report, figures, clock, config)
        raise SelectionError(report["selection_failed"], report=report)
    if choice.position is not None:
        folder.save_selected(choice.position, choice.layer, choice.selected["how"])
    folder.save_direction(choice.vector, layer=choice.layer, position=choice.position, source=choice.selected["how"])
    clock.begin("interventions: replies, KL, CE, orthogonalization and capability on test; the α sweep")
    interventions = measure_interventions(model, choice, data, config, log)
    for name, table in interventions.tables().items():
        folder.save_table(table, name)
    where = (choice.position, choice.layer)
    n_test = {"harmful": len(data.harmful_test), "harmless": len(data.harmless_test)}
    figures.update(refusal_rates=plots.refusal_rates(interventions.effects.refusal_rate, n_test, model=spec,
                                                     direction=where),
                   alpha_sweep=plots.alpha_sweep(interventions.sweep, model=spec, direction=where,
                                                 n={"harmful": len(data.harmful_test[: config.n_alpha])}))
    clock.done("interventions")
    report = build_report(model, config, data, candidates, statistics, choice, interventions)
    return _finish(model, folder, report, figures, clock, config)


def _finish(model: Model, folder: RunFolder, report: dict, figures: dict, clock: StepClock, config: RunConfig) -> dict:
    """Write the figures, ``report.json`` and ``manifest.json``; returns the report."""
    for name, fig in figures.items():
        folder.save_figure(fig, name, static=config.static_figures)
    report["figures"] = sorted(figures)
    clock.done("figures")
    report["seconds"] = clock.seconds
    folder.write_report(report)
    folder.write_manifest(model=asdict(model.info), data=report["data"], positions=report.get("positions"),
                          seed=config.seed, config=asdict(config))
    return report


# ------------------------------------------------------------------ the over-refusal study
def run_over_refusal(model: Model, run_dir: str | Path, config: OverRefusalConfig | None = None,
                     log: Callable[[str], object] = print) -> dict:
    """The over-refusal study against a run's refusal direction (``refusal-lens over-refusal``).

    Reads ``direction.safetensors`` (and its layer and position) from the run folder ``run_dir``; writes
    ``over_refusal.json``, ``over_refusal_selection.csv`` and, when a vector is chosen, ``false_refusal.safetensors``
    into it, and records them in ``manifest.json``. ``config``: :class:`OverRefusalConfig` (``None``: its defaults).
    Returns the over-refusal report.
    """
    config = config or OverRefusalConfig()
    folder = RunFolder.create(run_dir)
    vector, layer, position = folder.direction()
    clock = StepClock(log)
    clock.begin(f"over-refusal against the direction at layer {layer}, position {position}")
    report, false_refusal, meta = over_refusal_stage(model, vector, layer=layer, position=position, config=config,
                                                     log=log)
    if "selection" in report:
        folder.save_table(pd.DataFrame(report["selection"]["table"]), "over_refusal_selection")
    if false_refusal is not None:
        source = (f"false-refusal vector: look-risky minus harmless at pos {meta['pos']}, layer {meta['layer']}, "
                  f"{meta['orthogonalize']:g} of its component along the refusal direction removed; {meta['rule']}")
        path = folder.save_direction(false_refusal, layer=meta["layer"], position=meta["pos"], source=source,
                                     name="false_refusal")
        report["file"] = path.name
    clock.done("over_refusal")
    report["seconds"] = clock.seconds
    report["config"] = asdict(config)
    folder.write_json("over_refusal", report)
    folder.update_manifest(over_refusal={"model": asdict(model.info), "config": asdict(config), "seed": config.seed,
                                         "refusal_direction": {"layer": layer, "pos": position}})
    return report
