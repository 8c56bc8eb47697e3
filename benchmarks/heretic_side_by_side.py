"""heretic side by side with the refusal frontier, on the same organism and prompts, measured by the project.

heretic (``heretic-llm`` on PyPI, AGPL-3.0) searches per-layer ablation weights with Optuna, as
``rl.refusal_frontier`` does. This script runs it unattended on the organism exported with ``rl.save_hf``,
with the run's own prompts (train for its directions, val for its objectives), saves every trial of its
Pareto front, and measures each saved model with the project's metrics (refusal score, substring judge,
last-token KL against the unmodified organism) on the same val and test prompts as the frontier run. It
writes ``runs/<model>/frontier/heretic.json`` and redraws ``figures/frontier`` with heretic's points on it.

heretic runs in its own virtual environment (it pins its own transformers; never vendor its code)::

    python -m venv /work/heretic-venv && /work/heretic-venv/bin/pip install torch==2.13.0 heretic-llm
    python -m benchmarks.heretic_side_by_side --run runs/smollm2-135m-refusal \\
        --heretic-python /work/heretic-venv/bin/python --trials 40 --work /tmp/heretic

Adapting heretic to the project's setting: its chat prompts always carry a system message, the project's
none, so the exported copy's chat template leaves out an empty system message, and its tokenizer adds no second
``<|im_start|>`` when heretic tokenizes a rendered chat (the prompts heretic sees are token for token the
project's, checked in ``heretic.json``); its replies are cut at ``--judge-tokens`` (``max_response_length``), the
length the frontier judges its front at. The driver (``drive``, run with heretic's python; standard library
and optuna only; adapted from ``shared/peers/run_heretic.py``) answers heretic 1.4.0's numbered menus over a
pipe, saves the Pareto trials one after another, and reads every trial back from heretic's Optuna journal.
heretic prints no completions unless ``print_responses`` is set (it is not); this script stores none.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# The exported copy's chat template for heretic: ChatML, a system block only when its content is non-empty.
CHATML_OPTIONAL_SYSTEM = (
    "{% for message in messages %}{% if message['role'] != 'system' or message['content'] %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][AB0-2]|\r")


# ------------------------------------------------------------------ driver (heretic's python)
def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_config(a) -> None:
    """heretic 1.4.0's ``config.toml``: the model, the four prompt sets, budget, seed, reply length, merge export."""
    dataset = lambda name: {"dataset": str(Path(a.data, name).resolve()), "split": "train",  # noqa: E731
                            "column": "instruction"}
    config = {"model": str(Path(a.model).resolve()), "seed": a.seed, "n_trials": a.trials,
              "n_startup_trials": a.startup_trials, "batch_size": a.batch_size, "max_response_length": a.judge_tokens,
              "export_strategy": "merge", "system_prompt": "", "dtypes": ["float32"], "device_map": "cpu",
              "good_prompts": dataset("harmless_train"), "bad_prompts": dataset("harmful_train"),
              "good_evaluation_prompts": dataset("harmless_val"), "bad_evaluation_prompts": dataset("harmful_val")}
    Path(a.workdir, "config.toml").write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))


def _option(menu: str, title: str) -> str:
    return re.search(r"\[(\d+)\] " + re.escape(title), menu).group(1)


def drive(a) -> None:
    """Run heretic unattended (see the module docstring); write ``--out`` with its trials and saved folders.

    Long because it is one loop over heretic's menus (numbered, answered over a pipe: heretic asks with
    ``input()`` when ``KAGGLE_KERNEL_RUN_TYPE`` is set): after the optimization, each of the first
    ``--save-front`` Pareto trials is selected, saved merged, and the menu returned to; then heretic exits.
    """
    import subprocess

    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    write_config(a)
    env = dict(os.environ, KAGGLE_KERNEL_RUN_TYPE="Batch", PYTHONUNBUFFERED="1", COLUMNS="220", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.time()
    proc = subprocess.Popen([a.heretic], cwd=a.workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    log = open(Path(a.workdir, "heretic.log"), "w")
    pending, marks, saved, front, current = "", {}, {}, [], None

    def answer(text: str) -> None:
        nonlocal pending
        proc.stdin.write((text + "\n").encode())
        proc.stdin.flush()
        log.write(f"\n[{time.time() - started:8.1f}s] >>> {text}\n")
        pending = ""

    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        text = _ANSI.sub("", chunk.decode(errors="replace"))
        log.write(text)
        log.flush()
        pending += text
        for key in ("Running trial 1 ", "Optimization finished!"):
            if key in pending and key not in marks:
                marks[key] = round(time.time() - started, 1)
        if pending.rstrip().endswith("Enter number:"):
            menu = pending
            if "Which trial do you want to use?" in menu:
                listed = {int(t): n for n, t in re.findall(r"\[(\d+)\] \[Trial\s+(\d+)\]", menu)}
                front = list(listed)
                todo = [t for t in front[: a.save_front] if t not in saved]
                current = todo[0] if todo else None
                answer(listed[current] if todo else _option(menu, "Exit program"))
            elif "What do you want to do with the decensored model?" in menu:
                answer(_option(menu, "Save the model to a local folder") if current not in saved
                       else _option(menu, "Return to the trial selection menu"))
            elif "How would you like to proceed?" in menu:
                answer(_option(menu, "Exit program"))  # a study already in --workdir: never mix two runs
        elif "Path to the folder:" in pending and pending.rstrip().endswith(":"):
            saved[current] = str(Path(a.save_dir, f"trial_{current}").resolve())
            answer(saved[current])
    rc = proc.wait()
    log.close()
    json.dump({"rc": rc, "wall_s": round(time.time() - started, 1), "marks_s": marks, "pareto_front": front,
               "saved": saved, "trials": _journal(a.workdir)}, open(a.out, "w"), indent=1)


def _journal(workdir: str) -> list[dict]:
    """Every trial of heretic's study: its index, parameters and its own scores (refusal count, KL)."""
    import glob

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    files = glob.glob(os.path.join(workdir, "checkpoints", "*.jsonl"))
    if not files:
        return []
    study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(files[0])))
    return [{"index": t.user_attrs.get("index"), "state": t.state.name, "values": t.values,
             "refusals": t.user_attrs.get("refusals"), "kl_divergence": t.user_attrs.get("kl_divergence"),
             "direction_index": t.user_attrs.get("direction_index"), "params": t.params} for t in study.trials]


# ------------------------------------------------------------------ orchestration (the project's python)
def prepare(model, data: dict, work: Path) -> Path:
    """The exported organism and heretic's prompt folders. The export's tokenizer renders no empty system block
    and adds no BOS of its own (heretic tokenizes rendered chats with special tokens; the template has one)."""
    import refusal_lens as rl

    exported = work / "organism"
    if not (exported / "config.json").exists():
        rl.save_hf(model, exported)
        tokenizer = model.tokenizer
        kept = tokenizer.chat_template, tokenizer.add_bos_token
        if model.chat.family == "chatml":  # other families keep their template; check_prompts says if they match
            tokenizer.chat_template = CHATML_OPTIONAL_SYSTEM
        tokenizer.add_bos_token = False
        try:
            tokenizer.save_pretrained(exported)
        finally:
            tokenizer.chat_template, tokenizer.add_bos_token = kept
    for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        folder = work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in data[name]))
    return exported


def check_prompts(model, exported: Path, prompts: list[str]) -> bool:
    """Whether heretic's rendering of ``prompts`` (empty system prompt) gives the project's token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    chats = [[{"role": "system", "content": ""}, {"role": "user", "content": p}] for p in prompts]
    theirs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    return [tokenizer(t)["input_ids"] for t in theirs] == [
        model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in model.chat.format(prompts)]


def measure(model, edited, data: dict, *, judge_tokens: int, max_new_tokens: int, batch_size: int = 32) -> dict:
    """The project's metrics of an edited copy against the unmodified model: val score, KL and judge rate (the
    frontier's axes), and the test numbers ``rl.frontier.evaluate_profile`` reports (rates, score, KL)."""
    import refusal_lens as rl
    from refusal_lens.metrics import kl_divergence, last_token_logits, refusal_rate

    def kl(prompts):
        return float(kl_divergence(last_token_logits(model, prompts, batch_size=batch_size),
                                   last_token_logits(edited, prompts, batch_size=batch_size)).mean())

    def rate(prompts, tokens):
        return refusal_rate(rl.generate(edited, prompts, max_new_tokens=tokens, batch_size=batch_size,
                                        progress=False))

    return {"val_refusal_score": float(rl.refusal_score(edited, data["harmful_val"]).mean()),
            "val_kl": kl(data["harmless_val"]), "val_refusal_rate": rate(data["harmful_val"], judge_tokens),
            "test": {"harmful_refusal_rate": rate(data["harmful_test"], max_new_tokens),
                     "harmless_refusal_rate": rate(data["harmless_test"], max_new_tokens),
                     "harmful_refusal_score": float(rl.refusal_score(edited, data["harmful_test"]).mean()),
                     "harmless_kl": kl(data["harmless_test"]), "n_harmful": len(data["harmful_test"]),
                     "n_harmless": len(data["harmless_test"]), "max_new_tokens": max_new_tokens}}


def orchestrate(a) -> None:
    """Long because it is the whole benchmark in order: data, export, heretic, measurement, files, figure."""
    import subprocess

    import refusal_lens as rl
    from refusal_lens.frontier.run import run_data
    from refusal_lens.runs import RunFolder

    folder = RunFolder(Path(a.run), Path(a.run) / "figures")
    report = json.loads((folder.path / "report.json").read_text())
    model = rl.load_model(a.model, device="cpu", chat=a.chat)
    data = run_data(model, report, n_val=a.n_val, n_test=a.n_test)
    data["harmful_train"] = _harmful_train(model, report, a.n_train)
    data["harmless_train"] = data["harmless_train"][: a.n_train]
    work = Path(a.work)
    exported = prepare(model, data, work)
    same_prompts = check_prompts(model, exported, data["harmful_val"][:8] + data["harmless_val"][:8])
    driver_out = work / "driver.json"
    if not driver_out.exists():
        started = time.time()
        subprocess.run([a.heretic_python, __file__, "drive", "--model", str(exported), "--data", str(work / "data"),
                        "--workdir", str(work / "heretic"), "--save-dir", str(work / "saved"), "--out",
                        str(driver_out), "--trials", str(a.trials), "--startup-trials", str(a.startup_trials),
                        "--seed", str(a.seed), "--judge-tokens", str(a.judge_tokens), "--save-front",
                        str(a.save_front), "--heretic", str(Path(a.heretic_python).parent / "heretic")], check=True)
        print(f"heretic: {time.time() - started:.0f} s")
    driven = json.loads(driver_out.read_text())
    max_new_tokens = report["config"].get("max_new_tokens", 48)
    points = []
    for trial, path in driven["saved"].items():
        edited = rl.load_model(path, chat=model.chat, device="cpu")
        own = next((t for t in driven["trials"] if t["index"] == int(trial)), {})
        points.append({"trial": int(trial), "heretic_refusals": own.get("refusals"),
                       "heretic_kl": own.get("kl_divergence"), "params": own.get("params"),
                       "direction_index": own.get("direction_index"),
                       **measure(model, edited, data, judge_tokens=a.judge_tokens, max_new_tokens=max_new_tokens)})
        del edited
    record = {"heretic": _versions(a.heretic_python), "n_trials": a.trials, "n_startup_trials": a.startup_trials,
              "seed": a.seed, "wall_s": driven["wall_s"], "marks_s": driven["marks_s"], "rc": driven["rc"],
              "prompts_token_identical": same_prompts, "pareto_front": driven["pareto_front"],
              "data": {k: {"n": len(v), "sha256": rl.manifest.text_hash(v)} for k, v in data.items()},
              "points": points, "trials": driven["trials"]}
    out = folder.path / "frontier" / "heretic.json"
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    rl.frontier.draw(folder)
    for p in points:
        print(f"heretic trial {p['trial']}: val KL {p['val_kl']:.3f}, val refusal {p['val_refusal_rate']:.1%}; test "
              f"harmful {p['test']['harmful_refusal_rate']:.1%}, KL {p['test']['harmless_kl']:.3f}")
    print(f"wrote {out}")


def _harmful_train(model, report: dict, n: int | None) -> list[str]:
    from refusal_lens.data import load_splits

    config = report["config"]
    train = load_splits(config.get("harmful"), config.get("harmless"), seed=config.get("seed", 0))["train"]
    return train.harmful_texts[:n]


def _versions(python: str) -> str:
    import subprocess

    found = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('heretic-llm'), "
                            "m.version('torch'), m.version('transformers'), m.version('optuna'))"],
                           capture_output=True, text=True)
    return found.stdout.strip() or found.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = parser
    run.add_argument("--model", default="smollm2-135m-refusal")
    run.add_argument("--chat", default=None, help="chat-format family when the model's cannot be detected")
    run.add_argument("--run", default="runs/smollm2-135m-refusal", help="the run folder the frontier was written to")
    run.add_argument("--heretic-python", default="/work/heretic-venv/bin/python")
    run.add_argument("--work", default="/tmp/heretic-side-by-side", help="scratch folder (export, heretic's study)")
    run.add_argument("--trials", type=int, default=40)
    run.add_argument("--startup-trials", type=int, default=12)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--n-train", type=int, default=128, help="train prompts per side for heretic's directions")
    run.add_argument("--n-val", type=int, default=None)
    run.add_argument("--n-test", type=int, default=None)
    run.add_argument("--judge-tokens", type=int, default=24)
    run.add_argument("--save-front", type=int, default=6, help="how many Pareto trials to save and measure")
    d = sub.add_parser("drive", help="(heretic's python) run heretic unattended")
    for flag in ("--model", "--data", "--workdir", "--save-dir", "--out", "--heretic"):
        d.add_argument(flag, required=True)
    for flag, default in (("--trials", 40), ("--startup-trials", 12), ("--seed", 0), ("--judge-tokens", 24),
                          ("--save-front", 6), ("--batch-size", 32)):
        d.add_argument(flag, type=int, default=default)
    a = parser.parse_args(argv)
    if a.command == "drive":
        drive(a)
    else:
        orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
