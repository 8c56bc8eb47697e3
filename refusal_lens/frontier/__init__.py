"""The refusal/KL frontier: what it costs to remove refusal, and where in depth removal matters.

A seeded multi-objective search (Optuna TPE, as heretic) over parameterised ablations (a direction, or an
interpolation between two layers' directions; per-layer weight kernels for the attention and MLP writers; the
paper's projection or heretic's norm-preserving edit; the direction optionally orthogonalized against the
harmless mean), scored on val by the project's refusal score and KL; its Pareto front, judged with the
substring judge; a point chosen by a rule fixed before the search and evaluated once on test.

* :mod:`~refusal_lens.frontier.profile`: kernels, profiles, their hooks and the equivalent weight edit.
* :mod:`~refusal_lens.frontier.search`: :func:`refusal_frontier`, the front, the rule, test evaluation.
* :mod:`~refusal_lens.frontier.run`: ``refusal-lens frontier`` on a run folder (files, export, figure).
* :mod:`~refusal_lens.frontier.plot`: the figure.
"""

from .plot import frontier_figure, profile_figure
from .profile import (
    EDITS,
    Kernel,
    Profile,
    ProfileError,
    Resolved,
    apply_profile,
    norm_preserving_map,
    profile_direction,
    profile_hooks,
    resolve,
    weight_edit_exact,
)
from .run import (
    draw,
    evaluate_reference,
    export_profile,
    load_profile,
    result_figure,
    result_table,
    run_data,
    run_frontier,
    save_profile,
    strongest_candidate,
)
from .search import (
    ChoiceRule,
    Frontier,
    SearchSpace,
    ValScorer,
    ablation_equivalence,
    candidate_profiles,
    choose,
    evaluate_profile,
    pareto_mask,
    profile_table,
    refusal_frontier,
)

__all__ = [
    "refusal_frontier", "Frontier", "SearchSpace", "ChoiceRule", "choose", "pareto_mask", "ValScorer",
    "evaluate_profile", "profile_table", "candidate_profiles", "ablation_equivalence",
    "Kernel", "Profile", "ProfileError", "Resolved", "EDITS", "resolve", "profile_direction", "profile_hooks",
    "apply_profile", "norm_preserving_map", "weight_edit_exact",
    "run_frontier", "run_data", "result_table", "result_figure", "save_profile", "load_profile", "export_profile",
    "strongest_candidate", "evaluate_reference",
    "draw",
    "frontier_figure", "profile_figure",
]
