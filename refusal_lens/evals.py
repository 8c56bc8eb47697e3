"""Capability benchmarks through lm-evaluation-harness, on a model with or without an intervention.

``RefusalLensLM`` is an lm-eval ``LM`` around a refusal_lens model: plain, with
hooks active (``rl.ablate`` / ``rl.add``), or an ``rl.orthogonalize_weights``
copy. ``evaluate`` runs tasks through ``lm_eval.simple_evaluate``. Standard tasks
(arc_easy, boolq, hellaswag, piqa, truthfulqa_mc1, winogrande, mmlu) download
their data from the hub; offline, the project's own multiple-choice task
``refusal_lens_mc`` (64 items in ``refusal_lens/tasks/``) runs end to end.

Texts are scored raw (no chat template), as lm-eval does for base and chat
models alike unless asked otherwise. Sequences are right-padded, so padding
never moves a real token's position.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path

import torch

from .metrics import continuation_logprobs
from .models import Model

# The paper's and seeds' capability suite; each needs hub access for its data.
STANDARD_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "truthfulqa_mc1", "winogrande", "mmlu")
LOCAL_TASK = "refusal_lens_mc"


def tasks_dir() -> Path:
    """The folder of task YAMLs shipped with the package (pass as lm-eval ``--include_path``)."""
    return Path(str(files("refusal_lens") / "tasks"))


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("refusal_lens.evals needs lm-evaluation-harness: pip install 'lm-eval==0.4.13'") from error
    from lm_eval.api.model import LM

    return LM


class RefusalLensLM(_require_lm_eval()):
    """lm-eval ``LM`` over a refusal_lens model, with ``hooks`` (``(hook_name, fn)`` pairs, e.g.
    ``rl.ablate(model, direction)``) active in every forward pass and during generation."""

    def __init__(self, model: Model, *, hooks: Iterable = (), batch_size: int = 16, max_length: int | None = None):
        super().__init__()
        self.model, self.hooks, self.batch_size = model, list(hooks), batch_size
        self.tokenizer = model.tokenizer
        config_length = getattr(model.original_model.config, "max_position_embeddings", None) or 2048
        self.max_length = max_length or min(config_length, 2048)
        # A rolling loglikelihood needs a token to condition the first one on.
        self.prefix_token_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation; trailing spaces of the context move to the continuation
        (as lm-eval's HF model does) so that ' Paris' is one token, not ' ' + 'Paris'."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self._encode(context) if context else [self.prefix_token_id]
        return context_ids, self._encode(continuation)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return continuation_logprobs(self.model, pairs, hooks=self.hooks, batch_size=self.batch_size,
                                     max_length=self.max_length)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self._encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            totals.append(sum(score for score, _ in self._score(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations of raw contexts, cut at the first stop string (``until``)."""
        outputs = []
        tokenizer, device = self.tokenizer, self.model.cfg.device
        with torch.no_grad(), self.model.hooks(fwd_hooks=self.hooks):
            for request in requests:
                context, options = request.args
                until = options.get("until") or [tokenizer.decode([tokenizer.eos_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                ids = torch.tensor([self._encode(context)[-self.max_length :]], device=device)
                generated = self.model.original_model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=int(options.get("max_gen_toks", 256)), pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                outputs.append(text)
        return outputs


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's task index with the package's tasks included; built once per process (~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()))


def evaluate(model: Model, tasks: Sequence[str] = (LOCAL_TASK,), *, hooks: Iterable = (), limit: int | None = None,
             batch_size: int = 16, num_fewshot: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on ``model`` with ``hooks`` active.

    The package's own tasks are always findable; standard task names need hub access for their data.
    Metric names are lm-eval's without the filter suffix (``acc``, ``acc_stderr``, ``acc_norm`` ...).
    """
    import lm_eval

    unknown_local = [t for t in tasks if t.startswith("refusal_lens") and t != LOCAL_TASK]
    if unknown_local:
        raise ValueError(f"unknown refusal_lens task(s) {unknown_local}; the package ships {LOCAL_TASK!r}")
    results = lm_eval.simple_evaluate(
        model=RefusalLensLM(model, hooks=hooks, batch_size=batch_size), tasks=list(tasks),
        task_manager=_task_manager(), limit=limit, num_fewshot=num_fewshot,
        log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    return {task: {metric.split(",")[0]: value for metric, value in metrics.items()
                   if "," in metric and isinstance(value, (int, float))}
            for task, metrics in results["results"].items()}


def local_task_items() -> list[dict]:
    """The items of ``refusal_lens_mc`` as dicts."""
    import json

    path = tasks_dir() / LOCAL_TASK / f"{LOCAL_TASK}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hub_offline() -> bool:
    """True when Hugging Face hub downloads are switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    import os

    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def runnable_tasks(tasks: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``tasks`` split into those that can run here and ``{task: why it is skipped}``."""
    if not hub_offline():
        return list(tasks), {}
    runnable = [t for t in tasks if t == LOCAL_TASK]
    reason = (
        "needs its data from the Hugging Face hub, which is switched off here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    )
    return runnable, {t: reason for t in tasks if t != LOCAL_TASK}


def capability_table(conditions: dict[str, tuple[object, Sequence]], tasks: Sequence[str] = (LOCAL_TASK,), *,
                     limit: int | None = None, batch_size: int = 16):
    """Accuracy per ``{condition: (model, hooks)}`` and task, e.g. baseline / ablated / orthogonalized.

    Returns ``(table, skipped)``: a DataFrame (condition, task, acc, acc_stderr, acc_norm, acc_norm_stderr; the
    metrics each task reports) and ``{task: reason}`` for tasks that cannot run here.
    """
    import pandas as pd

    runnable, skipped = runnable_tasks(tasks)
    rows = [{"condition": name, "task": task, **metrics}
            for name, (model, hooks) in (conditions.items() if runnable else ())
            for task, metrics in evaluate(model, runnable, hooks=hooks, limit=limit, batch_size=batch_size).items()]
    return pd.DataFrame(rows), skipped
