"""The main job's settings: :class:`RunConfig`, whose fields are also the ``refusal-lens run`` options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .kl_null import check_kl_max
from .options import comma_separated, option
from .rule import check_fallback


def _kl_max(text: str) -> float | str:
    return text if text.startswith("null:") else float(text)


def _pick(text: str) -> tuple[int, int]:
    try:
        pos, layer = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pick takes POSITION,LAYER (e.g. -1,16), got {text!r}") from None
    return pos, layer


@dataclass(frozen=True)
class RunConfig:
    """Data, sizes, rules and seeds of a run; each field is also a ``refusal-lens run`` option (:mod:`.options`).

    The defaults are the paper's rules at sizes for a CPU run on the organism; the paper's own sizes are
    128 train and 32 val prompts per side and 512 new tokens (a GPU run: see the GPU guide).
    """

    harmful: str | None = option(
        None, "harmful prompts in the paper's JSON format: a folder with train/val/test files, or files "
        "(comma-separated) to pool and split (none: the built-in refusal-pairs set)", metavar="PATH")
    harmless: str | None = option(None, "harmless prompts, as --harmful", metavar="PATH")
    data: str = option("refusal-pairs", "the built-in contrast set used when --harmful/--harmless are not given: "
                       "refusal-pairs, or paper (the paper's AdvBench/HarmBench/Alpaca sample, 128+128 train, 32+32 "
                       "val)", metavar="SET")
    n_train: int | None = option(None, "train prompts per side (none: the whole split; the paper: 128)")
    n_val: int = option(24, "validation prompts per side for selection (the paper: 32)")
    n_test: int | None = option(None, "test prompts per side (none: the whole test split)")
    filter_by_refusal: bool = option(
        True, "the paper's train/val filter by refusal-score sign; --no-filter-by-refusal for models that do not "
        "refuse, e.g. base models", off_alias="--no-filter")
    kl_max: float | str = option(
        0.1, "selection's KL filter in nats (the paper's 0.1), or null:Q for the Q-quantile of random directions' "
        "KL, fixed before any candidate is scored (e.g. null:0.5)", parse=_kl_max)
    fallback: str | None = option(
        None, "when no candidate passes: lowest-kl takes the lowest-KL candidate with bypass < 0 and induce >= 0 "
        "(none: stop, as the paper's code)", parse=str, metavar="lowest-kl")
    max_new_tokens: int = option(48, "reply length for refusal verdicts (the paper: 512)")
    n_boot: int = option(1000, "bootstrap resamples (Cohen's d intervals, the selection's win rate)")
    full_selection_table: bool = option(
        False, "score bypass, induce and KL of every candidate for the selection figure (about 3x the selection's "
        "time); by default only what the pick needs is scored: the same pick and scores, fewer points in the figure, "
        "and a bootstrap win rate among the scored candidates", off_alias="--lazy-selection")
    seed: int = option(0, "seed of every random choice (data splits, null directions, bootstrap)")
    batch_size: int = option(32, "prompts per forward pass")
    alphas: tuple[float, ...] = option(
        (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5), "ablation strengths α of the sweep",
        parse=comma_separated(float), metavar="A,B,...")
    n_alpha: int = option(32, "harmful test prompts per α of the sweep (refusal score only)")
    n_padding_check: int = option(8, "prompts for the batched-vs-sequential check")
    n_null_directions: int = option(16, "random directions whose ablation KL is the null for the KL filter")
    judge: str | None = option(
        None, "also judge replies for compliance/coherence: local:<model spec>, openai or openai:<model> "
        "(REFUSAL_LENS_JUDGE_BASE_URL, REFUSAL_LENS_JUDGE_MODEL, OPENAI_API_KEY; none: skipped)")
    capability_tasks: tuple[str, ...] = option(
        ("refusal_lens_mc",), "comma-separated lm-eval tasks for the baseline/ablated/orthogonalized capability "
        "table (standard ones such as arc_easy need hub access; '' skips it)", parse=comma_separated(str),
        metavar="TASK,...")
    capability_limit: int | None = option(None, "documents per capability task (none: all)")
    static_figures: bool = option(True, "also export PNG figures (kaleido + Chromium); --no-static-figures: HTML only",
                                  off_alias="--html-only")
    direction: str | None = option(
        None, "a direction computed elsewhere (.pt/.safetensors/.npy, e.g. a run's direction.safetensors): skip "
        "extraction and selection; needs --direction-layer", metavar="FILE")
    direction_layer: int | None = option(None, "with --direction: the layer to add it at", aliases=("--layer",))
    pick: tuple[int, int] | None = option(
        None, "use this candidate of the run's own directions instead of selecting one (write --pick=-1,16: a value "
        "that starts with '-' needs the '=')", parse=_pick, metavar="POS,LAYER")

    def __post_init__(self) -> None:
        """Clear errors before any model is loaded."""
        check_kl_max(self.kl_max)
        check_fallback(self.fallback)
        if self.direction is not None and self.direction_layer is None:
            raise ValueError("an external direction needs the layer to add it at: pass direction_layer "
                             "(--direction-layer)")
        if self.direction is not None and self.pick is not None:
            raise ValueError("pass either an external direction (--direction) or a candidate (--pick), not both")
