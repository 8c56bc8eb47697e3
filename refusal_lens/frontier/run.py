"""``refusal-lens frontier``: the frontier of a run folder, written to ``runs/<model>/frontier/``.

Reads the run's candidates (``directions.safetensors``), its config and data hashes and the random-direction
KL null (``report.json``) and, when present, its selection table (``selection.csv``: every paper candidate's
val bypass and KL). Rebuilds the same val prompts (checked against the run's hashes), writes
``frontier.json`` with the seed, budget, search space and choice rule **before** the search, then the trials
(``trials.csv``), the front (``front.csv``), the chosen point's profile (``chosen.safetensors`` + ``chosen.json``,
``chosen_profile.csv``), its test numbers (in ``frontier.json``), an HF export of the edited model where the
weight edit equals the hooks (``chosen_hf/``, with a reload check), the figure (``figures/frontier.html`` /
``.png``) and ``manifest.json``. Points of heretic's front measured with the project's metrics
(``heretic.json``, written by ``benchmarks/heretic_side_by_side.py``) join the figure when present.
No reply to a harmful prompt is stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from ..data import load_splits
from ..directions import Directions
from ..generation import generate
from ..manifest import text_hash, write_manifest
from ..metrics import refusal_rate
from ..models import Model
from ..runs import RunFolder
from ..streaming import mean_activations
from .plot import frontier_figure, profile_figure
from .profile import Profile, apply_profile, profile_hooks, resolve, weight_edit_exact
from .search import ChoiceRule, Frontier, SearchSpace, evaluate_profile, profile_table, refusal_frontier

DEFAULT_RULE, DEFAULT_SPACE = ChoiceRule(), SearchSpace()
_PROBE = ("Give three tips for staying healthy.", "Write a short poem about the sea, in three lines.")


def run_data(model: Model, report: dict, *, n_val: int | None = None, n_test: int | None = None,
             n_mean: int | None = None) -> dict[str, list[str]]:
    """The run's val (filtered as the run did, first ``n_val`` per side), test (first ``n_test``) and harmless
    train prompts (first ``n_mean``, for the harmless means), from the run's config; raises when the val prompts'
    hashes differ from the run's (different data or code)."""
    config = report["config"]
    splits = load_splits(config.get("harmful"), config.get("harmless"), seed=config.get("seed", 0))
    val = splits["val"].filter_by_refusal(model) if config.get("filter_by_refusal", True) else splits["val"]
    recorded = report.get("data", {}).get("val", {})
    if recorded and (val.hashes()["harmful_sha256"], val.hashes()["harmless_sha256"]) != (
            recorded.get("harmful_sha256"), recorded.get("harmless_sha256")):
        raise ValueError("the val prompts rebuilt from the run's config do not match the run's data hashes "
                         "(report.json data.val): rerun `refusal-lens run` with this version first")
    n_val = config.get("n_val") if n_val is None else n_val
    n_test = config.get("n_test") if n_test is None else n_test
    test = splits["test"]
    return {"harmful_val": val.harmful_texts[:n_val], "harmless_val": val.harmless_texts[:n_val],
            "harmful_test": test.harmful_texts[:n_test], "harmless_test": test.harmless_texts[:n_test],
            "harmless_train": splits["train"].harmless_texts[:n_mean]}


def save_profile(folder: Path, name: str, profile: Profile, direction: torch.Tensor, n_layers: int,
                 record: dict) -> list[Path]:
    """``<name>.safetensors`` (unit direction float64, per-layer ``attn`` / ``mlp`` weights, ``embed``) and
    ``<name>.json`` (the profile's parameters and ``record``)."""
    table = profile_table(profile, n_layers)
    tensors = {"direction": direction.detach().double().cpu().contiguous(),
               "attn": torch.tensor(table.attn.values, dtype=torch.float64),
               "mlp": torch.tensor(table.mlp.values, dtype=torch.float64),
               "embed": torch.tensor([profile.embed_weight], dtype=torch.float64)}
    meta = {"profile": json.dumps(profile.to_dict())}
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata=meta)
    (folder / f"{name}.json").write_text(json.dumps({"profile": profile.to_dict(), **record}, indent=2) + "\n")
    table.to_csv(folder / f"{name}_profile.csv", index=False)
    return [folder / f"{name}.safetensors", folder / f"{name}.json", folder / f"{name}_profile.csv"]


def load_profile(path: str | Path) -> Profile:
    """The :class:`Profile` stored by :func:`save_profile` (``.json`` or ``.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return Profile.from_dict(json.loads(handle.metadata()["profile"]))
    return Profile.from_dict(json.loads(path.read_text())["profile"])


def export_profile(model: Model, directions: Directions, profile: Profile, out: Path, *, provenance: dict,
                   harmless_means: torch.Tensor | None = None) -> dict:
    """Export the weight-edited model to ``out`` (``rl.save_hf``), reload it and compare its logits with the
    hooks' on probe prompts; ``{"exported": False, "reason": ...}`` where the weight edit is not exact."""
    from ..export import save_hf
    from ..models import load_model

    reason = weight_edit_exact(model)
    if reason is not None:
        return {"exported": False, "reason": reason}
    resolved = resolve(directions, profile, model.cfg.n_layers, harmless_means)
    edited = apply_profile(model, resolved, provenance=provenance)
    save_hf(edited, out, card=edited.info.edit)
    (out / "README.md").write_text(_card(model, provenance))
    del edited
    reloaded = load_model(str(out), device=str(model.cfg.device), chat=model.chat)
    batch = model.chat.tokenize(list(_PROBE)).to(model.cfg.device)
    with torch.no_grad():
        with model.hooks(fwd_hooks=profile_hooks(model, resolved)):
            hooked = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        exported = reloaded(batch["input_ids"], attention_mask=batch["attention_mask"])
    return {"exported": True, "folder": out.name,
            "reload_max_logit_diff_vs_hooks": float((exported - hooked).abs().max())}


def _card(model: Model, provenance: dict) -> str:
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- refusal_lens", "- refusal-frontier", "---", "",
        f"# {model.info.spec} - a refusal_frontier edit", "",
        "The residual-stream writers of this model were edited against one direction with per-layer weights "
        "(`refusal_lens.json`: direction, weights per layer for attention and MLP writers and the embedding, "
        "the edit). It exists to measure where refusal is written and what removing it costs; **its refusal "
        "behaviour has been weakened on purpose**: do not deploy it.", "",
        f"Chosen by: {provenance.get('rule')}. Its logits equal the base model's under the same edit applied as "
        "hooks (`refusal_lens.frontier.profile_hooks`); the reload check is in the run's `frontier.json`.", ""])


def _read_run(folder: RunFolder) -> tuple[Directions, dict, pd.DataFrame | None]:
    report_path = folder.path / "report.json"
    if not report_path.exists():
        raise FileNotFoundError(f"{report_path} does not exist: run `refusal-lens run --model ...` first; the "
                                "frontier reads the run's directions, config and random-direction KL null")
    report = json.loads(report_path.read_text())
    selection = folder.path / "selection.csv"
    return folder.directions(), report, pd.read_csv(selection) if selection.exists() else None


def run_frontier(
    model: Model,
    folder: RunFolder,
    *,
    n_trials: int = 60,
    seed: int = 0,
    rule: ChoiceRule = DEFAULT_RULE,
    space: SearchSpace = DEFAULT_SPACE,
    n_val: int | None = None,
    n_test: int | None = None,
    n_mean: int | None = 128,
    judge_tokens: int = 24,
    max_new_tokens: int | None = None,
    capability: bool = True,
    export: bool = True,
    static: bool = True,
    batch_size: int = 32,
    log=print,
) -> dict:
    """Search, choose, evaluate on test, save and draw, for a run folder; returns ``frontier.json``'s record.

    ``n_val`` / ``n_test``: prompts per side (default: the run's); ``n_mean``: harmless train prompts whose mean
    the direction may be orthogonalized against; ``judge_tokens``: greedy reply length for judging the front on
    val; ``max_new_tokens``: reply length on test (default: the run's); ``capability``: the ``refusal_lens_mc``
    check of the chosen point; ``export``: the HF export with its reload check."""
    started = time.perf_counter()
    directions, report, selection = _read_run(folder)
    out = folder.path / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    data = run_data(model, report, n_val=n_val, n_test=n_test, n_mean=n_mean)
    max_new_tokens = max_new_tokens or report["config"].get("max_new_tokens", 48)
    record = {"model": model.info.spec, "seed": seed, "n_trials": n_trials, "rule": rule.describe(),
              "rule_params": asdict(rule), "space": asdict(space), "judge_tokens": judge_tokens,
              "test_max_new_tokens": max_new_tokens, "run": str(folder.path),
              "data": {name: {"n": len(texts), "sha256": text_hash(texts)} for name, texts in data.items()},
              "status": "searching"}
    (out / "frontier.json").write_text(json.dumps(record, indent=2) + "\n")  # the rule is on disk before the search
    log(f"frontier: {n_trials} trials on {len(data['harmful_val'])}+{len(data['harmless_val'])} val prompts; "
        f"rule: {rule.describe()}")
    means = None
    if True in space.orthogonalize:
        means = mean_activations(model, data["harmless_train"], positions=directions.positions,
                                 layers=directions.layers, batch_size=batch_size)
    frontier = refusal_frontier(model, directions, data["harmful_val"], data["harmless_val"], n_trials=n_trials,
                                seed=seed, space=space, rule=rule, harmless_means=means, judge_tokens=judge_tokens,
                                batch_size=batch_size)
    record["seconds_search"] = round(time.perf_counter() - started, 1)
    frontier.trials.to_csv(out / "trials.csv", index=False)
    frontier.front.to_csv(out / "front.csv", index=False)
    record.update(status="searched", settings=frontier.settings, n_front=len(frontier.front),
                  front=frontier.front[["trial", "edit", "orthogonalize", "direction_index", "val_refusal_score",
                                        "val_kl", "val_refusal_rate"]].round(5).to_dict(orient="records"),
                  chosen_trial=frontier.chosen, closest_trial=frontier.closest, goal_met=frontier.chosen is not None)
    point = frontier.chosen if frontier.chosen is not None else frontier.closest
    if point is not None:
        record["chosen"] = _evaluate_point(model, directions, frontier, point, data, means, out, record,
                                           max_new_tokens=max_new_tokens, capability=capability, export=export,
                                           batch_size=batch_size, log=log)
    record["random_direction_kl"] = {k: report.get("kl_random_directions", {}).get(k) for k in ("median", "min", "max")}
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["status"] = "done"
    (out / "frontier.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    record = evaluate_reference(model, folder, data=data, capability=capability, batch_size=batch_size, log=log)
    draw(folder, static=static)
    write_manifest(out, model=asdict(model.info), seed=seed, n_trials=n_trials, rule=rule.describe(),
                   data=record["data"], run_data=report.get("data"), positions=directions.positions,
                   outputs=sorted(p.name for p in out.iterdir()))
    log(f"frontier: wrote {out}/ in {record['seconds']:.0f} s")
    return record


def strongest_candidate(selection: pd.DataFrame | None) -> tuple[int, int] | None:
    """``(position, layer)`` of the paper candidate whose full ablation lowers the harmful val refusal score most,
    among those the run's selection scored (``selection.csv`` rows with bypass and KL); None without any."""
    scored = selection.dropna(subset=["bypass", "kl"]) if selection is not None else None
    if scored is None or not len(scored):
        return None
    row = scored.loc[scored.bypass.idxmin()]
    return int(row.pos), int(row.layer)


def evaluate_reference(model: Model, folder: RunFolder, *, data: dict[str, list[str]] | None = None,
                       capability: bool = True, batch_size: int = 32, log=print) -> dict:
    """One direction removed everywhere, beside the searched profile: the :func:`strongest_candidate` ablated at
    full weight in every layer (``Profile.full``), judged on the frontier's val prompts and evaluated on its test
    prompts exactly as the chosen point; added to ``frontier.json`` as ``reference`` (:func:`draw` redraws the
    figure with it). ``data``: the frontier's prompts (:func:`run_data`), rebuilt from the run when None.
    Returns the updated record; it is unchanged when the run's selection scored no candidate."""
    out = folder.path / "frontier"
    directions, report, selection = _read_run(folder)
    record = json.loads((out / "frontier.json").read_text())
    candidate = strongest_candidate(selection)
    if candidate is None:
        return record
    names = ("harmful_val", "harmful_test", "harmless_test")
    data = data or run_data(model, report, n_val=None, n_test=None, n_mean=0)
    data = {name: data[name][: record["data"][name]["n"]] for name in names}  # the frontier's prompts, per side
    if any(text_hash(data[name]) != record["data"][name]["sha256"] for name in names):
        raise ValueError(f"the prompts rebuilt for {out / 'frontier.json'} differ from the frontier's: rerun "
                         "`refusal-lens frontier`")
    profile = Profile.full(*candidate, model.cfg.n_layers)
    log(f"frontier: the strongest paper candidate (position {candidate[0]}, layer {candidate[1]}) ablated "
        "everywhere, on val and test")
    row = selection[(selection.pos == candidate[0]) & (selection.layer == candidate[1])].iloc[0]
    hooks = profile_hooks(model, resolve(directions, profile, model.cfg.n_layers))
    judged = refusal_rate(generate(model, data["harmful_val"], hooks=hooks, max_new_tokens=record["judge_tokens"],
                                   batch_size=batch_size, progress=False))  # as the front is judged
    test = evaluate_profile(model, directions, profile, data["harmful_test"], data["harmless_test"],
                            max_new_tokens=record["test_max_new_tokens"], batch_size=batch_size, capability=capability)
    record["reference"] = {"position": candidate[0], "layer": candidate[1], "profile": profile.to_dict(),
                           "val": {"val_refusal_score": float(row.bypass), "val_kl": float(row.kl),
                                   "val_refusal_rate": judged},
                           "test": test}
    (out / "frontier.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    return record


def _evaluate_point(model: Model, directions: Directions, frontier: Frontier, point: int, data: dict,
                    means, out: Path, record: dict, *, max_new_tokens: int, capability: bool, export: bool,
                    batch_size: int, log) -> dict:
    profile = frontier.profiles[point]
    val = frontier.point(point)["val"]
    log(f"frontier: trial {point} ({'chosen' if frontier.chosen == point else 'closest; rule not met'}); "
        "evaluating on test")
    test = evaluate_profile(model, directions, profile, data["harmful_test"], data["harmless_test"],
                            harmless_means=means, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            capability=capability)
    direction = resolve(directions, profile, model.cfg.n_layers, means).direction
    provenance = {"rule": frontier.rule.describe(), "trial": point, "seed": record["seed"],
                  "data": record["data"], "val": val}
    save_profile(out, "chosen", profile, direction, model.cfg.n_layers,
                 {"trial": point, "chosen_by_rule": frontier.chosen == point, "val": val, "test": test})
    exported = (export_profile(model, directions, profile, out / "chosen_hf", provenance=provenance,
                               harmless_means=means) if export else {"exported": False, "reason": "export=False"})
    return {"trial": point, "by_rule": frontier.chosen == point, "profile": profile.to_dict(), "val": val,
            "test": test, "export": exported}


def result_figure(run: str | Path):
    """The frontier figure of a run folder (``<run>/frontier/``: every trial, the front, the paper candidates the
    run's selection scored, the random-direction null band, the chosen point and heretic's points where
    ``heretic.json`` exists); None when the run has no frontier yet."""
    run = Path(run)
    out = run / "frontier"
    if not (out / "trials.csv").exists():
        return None
    report = json.loads((run / "report.json").read_text())
    record = json.loads((out / "frontier.json").read_text())
    selection = run / "selection.csv"
    heretic = out / "heretic.json"
    val = record["data"]["harmful_val"]["n"], record["data"]["harmless_val"]["n"]
    title = (f"{record['model']}: what removing refusal costs, {record['n_trials']} trials "
             f"(seed {record['seed']}) on {val[0]} harmful + {val[1]} harmless val prompts")
    return frontier_figure(pd.read_csv(out / "trials.csv"), pd.read_csv(out / "front.csv"),
                           candidates=pd.read_csv(selection) if selection.exists() else None,
                           null_kl=report.get("kl_random_directions", {}).get("values"),
                           chosen=record.get("chosen"), max_refusal=record["rule_params"]["max_refusal"],
                           heretic=json.loads(heretic.read_text()) if heretic.exists() else None,
                           reference=record.get("reference"), title=title)


def draw(folder: RunFolder, *, static: bool = True) -> list[Path]:
    """(Re)draw ``figures/frontier`` (and ``figures/frontier_profile``, the chosen point's weights) from the
    files in ``frontier/`` (and ``heretic.json`` when present)."""
    out = folder.path / "frontier"
    record = json.loads((out / "frontier.json").read_text())
    figures = RunFolder(out, out / "figures")
    written = figures.save_figure(result_figure(folder.path), "frontier", static=static)
    chosen = record.get("chosen")
    if chosen:
        profile = Profile.from_dict(chosen["profile"])
        n_layers = len(pd.read_csv(out / "chosen_profile.csv"))
        title = (f"{record['model']}: where the {'chosen' if chosen['by_rule'] else 'closest'} point (trial "
                 f"{chosen['trial']}, {profile.edit}, direction index {profile.direction_index:.1f} at position "
                 f"{profile.position}) removes")
        written += figures.save_figure(profile_figure(profile_table(profile, n_layers),
                                                      embed_weight=profile.embed_weight, title=title),
                                       "frontier_profile", static=static)
    return written


def result_table(run: str | Path) -> pd.DataFrame | None:
    """The frontier run's points side by side, from ``<run>/frontier/frontier.json`` (and ``heretic.json``):
    one row per point (the chosen or closest point, the strongest paper candidate ablated everywhere, then
    heretic's saved Pareto trials) with its val KL and
    judged val refusal rate and its test numbers. None when the run has no finished frontier."""
    out = Path(run) / "frontier"
    path = out / "frontier.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    rows = []
    chosen = record.get("chosen")
    if chosen:
        label = "frontier: chosen by rule" if chosen["by_rule"] else "frontier: closest (rule not met)"
        rows.append({"point": label, "trial": chosen["trial"], **chosen["val"], **_test_columns(chosen["test"])})
    reference = record.get("reference")
    if reference:
        rows.append({"point": f"paper candidate ({reference['position']}, {reference['layer']}), full ablation",
                     "trial": None, **reference["val"], **_test_columns(reference["test"])})
    heretic = out / "heretic.json"
    if heretic.exists():
        for p in json.loads(heretic.read_text()).get("points", []):
            rows.append({"point": "heretic Pareto trial", "trial": p["trial"],
                         **{k: p[k] for k in ("val_refusal_score", "val_kl", "val_refusal_rate")},
                         **_test_columns(p["test"])})
    return pd.DataFrame(rows)


def _test_columns(test: dict) -> dict:
    keys = ("harmful_refusal_rate", "harmless_refusal_rate", "harmful_refusal_score", "harmless_kl", "ce_reply_tokens")
    return {f"test_{k}": test.get(k) for k in keys}
