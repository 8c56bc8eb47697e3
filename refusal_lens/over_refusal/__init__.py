"""Over-refusal: a false-refusal direction, its selection on val, and its ablation (notebook 07).

The method follows Wang, Hu, Röttger & Plank, "Surgical, Cheap, and Flexible: Mitigating False
Refusal in Language Models via Single Vector Ablation" (ICLR 2025, arXiv 2410.03415; code
``mainlp/False-Refusal-Mitigation``, ``pipeline/run_pipeline.py`` and ``select_direction.py``):

1. **Candidates** (:mod:`.candidates`). ``w[p, l] = mean(look-risky) - mean(harmless)`` at ``resid_pre``
   of every layer ``l`` and end-of-instruction position ``p`` (theirs: OR-Bench-Hard pseudo-harmful prompts
   against Alpaca; here the project's ``over-refusal`` set against the everyday ``general`` requests of
   ``refusal-pairs``, :mod:`.prompts`). As their ``filter_or`` / ``filter_train``, the look-risky training
   prompts are those the model refuses (refusal score > 0) and the harmless ones those it answers (< 0).
2. **Partial orthogonalization** against the true refusal direction ``r``:
   ``w' = w - orthogonalize (w·r̂) r̂``, then normalized (their ``ortho_refusal_directions``;
   ``orthogonalize`` is their ``ortho_lambda``, λ: 1 = fully orthogonal, 0 = the plain difference in means).
3. **Selection on val** (:mod:`.selection`) in their ``"ablation"`` mode: the candidate whose ablation gives
   the lowest mean refusal score on the pseudo-harmful (look-risky) prompts, the *false-refusal score*, among
   those with mean KL on harmless prompts <= ``kl_max`` (their ``ablate_kl_threshold``, 0.2 nats) and a
   layer below ``int(0.8 * n_layers)``. The rule is a configuration of :mod:`refusal_lens.rule`, the
   machinery the refusal selection uses too.
4. **Intervention:** directional ablation of ``w'`` at every layer's ``resid_pre``, attention and
   MLP outputs (:func:`refusal_lens.ablate`), as for the refusal direction; measured on test and on the
   held-out split by :mod:`.evaluation`, against partial ablation of ``r`` (:mod:`.trade_off`); the main
   job's step is :mod:`.stage`.

Where this differs, and why:

* ``r`` is one vector, the refusal direction the caller selected (e.g. the main job's, at its own
  layer and position), not the harmful-minus-harmless candidate at the same ``(p, l)`` as each
  ``w[p, l]``, which their code orthogonalizes against: the refusal to preserve is the one that
  direction mediates, and ablation removes ``w'`` at every layer, not only at its source layer.
* **The false-refusal score is taken over the look-risky val prompts the model refuses** (greedy
  generation, substring judge: :func:`false_refusals`). Their OR-Bench-Hard prompts are mostly
  refused by the models they study; where a model answers most look-risky prompts, the mean over all of
  them is dominated by those it answers anyway and says little about the false refusals.
* **Two filters of ours**: a candidate must lower the false-refusal score (else "lowest" can pick a
  candidate that makes things worse), and with it ablated the share of harmful val prompts whose refusal
  score stays > 0 must be at least ``keep_harmful`` (0.90) of that share without it (``harmful_kept``).
  Their selection has no such filter and relies on orthogonality, but a candidate orthogonal to ``r`` can
  still remove refusal, so the rule guards the acceptance criterion (harmful refusal >= 90% of baseline on
  test).
* **orthogonalize** is chosen after the site, at that site, from a grid (default ``(1.0,)``, the paper's
  setting), by the same rule. The paper sets it by hand for calibration.
* **KL is read against a null** (:mod:`refusal_lens.kl_null`): the KL of ablating random unit directions
  on the same harmless prompts, reported as the candidate's quantile in it. ``kl_max`` may also be set as
  ``"null:q"``, that quantile of the null (as ``select_direction``).
* Their selection stops when nothing passes; here too (``best`` is ``None`` and the reason is in
  the table), unless ``fallback="lowest-kl"``: the lowest-KL candidate among those that pass the
  layer and true-refusal filters and at least halve the share of look-risky prompts with a refusal
  score > 0. It never ignores KL, and the result records which rule produced the pick.

Refusal *rates* on test use greedy generation and the substring judge (:func:`refusal_lens.is_refusal`)
with Wilson intervals (:func:`refusal_lens.stats.wilson_ci`); replies to harmful prompts are kept
only as verdicts (and at most 60 characters).
"""

import warnings

from ..rule import FALLBACKS
from .candidates import (
    PAPER_ORTHOGONALIZE,
    candidate_vector,
    false_refusal_candidates,
    false_refusal_direction,
    refusal_cosines,
    remove_component,
)
from .evaluation import evaluate_on_test, result_tables
from .prompts import OverRefusalPrompts, over_refusal_prompts
from .rates import by_kind, false_refusals, look_risky_refusals, rate_row
from .selection import (
    FALLBACK_RULE,
    KEEP_HARMFUL,
    MAX_LAYER_FRAC,
    PAPER_KL_MAX,
    PAPER_RULE,
    FalseRefusalSelection,
    select_false_refusal,
)
from .stage import OVER_REFUSAL_THRESHOLD, OverRefusalConfig, over_refusal_stage
from .trade_off import (
    METHOD_BOTH,
    METHOD_FALSE_REFUSAL,
    METHOD_REFUSAL,
    compare_methods,
    partial_ablation_scan,
    trade_off_alphas,
)

__all__ = [
    # prompts and candidates
    "OverRefusalPrompts", "over_refusal_prompts", "false_refusal_candidates", "false_refusal_direction",
    "candidate_vector", "refusal_cosines", "remove_component", "PAPER_ORTHOGONALIZE",
    # selection
    "select_false_refusal", "FalseRefusalSelection", "PAPER_KL_MAX", "MAX_LAYER_FRAC", "KEEP_HARMFUL", "FALLBACKS",
    "PAPER_RULE", "FALLBACK_RULE",
    # rates and evaluation
    "rate_row", "by_kind", "false_refusals", "look_risky_refusals", "evaluate_on_test", "result_tables",
    "partial_ablation_scan", "trade_off_alphas", "compare_methods", "METHOD_REFUSAL", "METHOD_FALSE_REFUSAL",
    "METHOD_BOTH",
    # the main job's step
    "OverRefusalConfig", "over_refusal_stage", "OVER_REFUSAL_THRESHOLD",
]


def __getattr__(name: str):
    """``PAPER_LAMBDA``: the deprecated name of :data:`PAPER_ORTHOGONALIZE`."""
    if name == "PAPER_LAMBDA":
        warnings.warn("over_refusal.PAPER_LAMBDA is deprecated; use PAPER_ORTHOGONALIZE", DeprecationWarning,
                      stacklevel=2)
        return PAPER_ORTHOGONALIZE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
