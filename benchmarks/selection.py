"""Selection benchmark: ``select_direction`` vs a reference loop written like the paper's code.

The reference scores every candidate at every layer with one forward pass per
score (ablated harmful prompts -> bypass, ablated harmless -> KL, harmless with
addition -> induce), unembedding every position, then filters and picks the
lowest bypass. Both run on the same model, directions and validation prompts in
this process; the headline is the time ratio, and both must pick the same candidate.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def reference_selection(model, directions, harmful, harmless, *, kl_max=0.1, max_layer_frac=0.8, induce_min=0.0,
                        batch_size=32):
    """Paper-style: score everything, one full forward per score; returns (best (pos, layer), table rows)."""
    import refusal_lens as rl
    from refusal_lens.metrics import kl_divergence, refusal_log_odds

    device = model.cfg.device

    def last_logits(prompts, hooks=()):
        rows = []
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            for s in range(0, len(prompts), batch_size):
                batch = model.chat.tokenize(prompts[s : s + batch_size])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                rows.append(model(ids, attention_mask=mask)[:, -1].float().cpu())
        return torch.cat(rows)

    tokens = model.chat.refusal_tokens
    reference = last_logits(harmless)
    rows = []
    unit = directions.unit()
    for p, pos in enumerate(directions.positions):
        for l, layer in enumerate(directions.layers):
            if not directions.valid[p, l]:
                continue
            ablation = rl.ablate(model, unit[p, l]).hooks
            bypass = float(refusal_log_odds(last_logits(harmful, ablation), tokens).mean())
            kl = float(kl_divergence(reference, last_logits(harmless, ablation)).mean())
            addition = rl.add(model, directions.vectors[p, l], layer=layer).hooks
            induce = float(refusal_log_odds(last_logits(harmless, addition), tokens).mean())
            rows.append({"pos": pos, "layer": layer, "bypass": bypass, "induce": induce, "kl": kl})
    max_layer = int(max_layer_frac * model.cfg.n_layers)  # the paper's filter_fn
    kept = [r for r in rows if r["induce"] >= induce_min and r["kl"] <= kl_max and r["layer"] < max_layer]
    best = min(kept, key=lambda r: r["bypass"]) if kept else None
    return ((best["pos"], best["layer"]) if best else None), rows


def compare(model_spec: str = "smollm2-135m-refusal", n_val: int = 16, positions=(-1, -3, -5),
            kl_max: float = 0.1, induce_min: float = 0.0, device: str = "cpu", dtype: str | None = None) -> dict:
    """Time both on the organism's directions (train split) and val prompts (first ``n_val`` of each).

    ``kl_max`` is the KL filter for both (the paper's 0.1 by default; the organism passes no candidate
    there, so a looser one shows the two agreeing on a pick that exists); ``induce_min`` is the induce
    filter for both (the paper's 0).
    """
    import refusal_lens as rl

    from .models import synchronize

    model = rl.load_model(model_spec, device=device, dtype=dtype)
    train = rl.load_contrast("refusal-pairs", split="train")
    val = rl.load_contrast("refusal-pairs", split="val")
    directions = rl.diff_in_means(model, train.harmful_texts, train.harmless_texts, positions=list(positions))
    harmful, harmless = val.harmful_texts[:n_val], val.harmless_texts[:n_val]
    synchronize(device)
    started = time.perf_counter()
    ours = rl.select_direction(model, directions, harmful, harmless, kl_max=kl_max, induce_min=induce_min, n_boot=0,
                               progress=False)
    synchronize(device)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference_best, _ = reference_selection(model, directions, harmful, harmless, kl_max=kl_max, induce_min=induce_min)
    synchronize(device)
    reference_seconds = time.perf_counter() - started
    return {
        "model": model_spec, "device": device, "dtype": model.info.dtype,
        "n_val": n_val, "positions": list(positions), "n_layers": model.cfg.n_layers,
        "kl_max": kl_max, "induce_min": induce_min if math.isfinite(induce_min) else str(induce_min),  # JSON has no inf
        "candidates": int(directions.valid.sum()),
        "scores_by_ours": {k: int(ours.table[k].notna().sum()) for k in ("bypass", "induce", "kl")},
        "ours_seconds": ours_seconds, "reference_seconds": reference_seconds,
        "speed_ratio": reference_seconds / ours_seconds,
        "ours_best": ours.best, "reference_best": reference_best, "same_pick": ours.best == reference_best,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-refusal")
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--kl-max", type=float, default=0.1)
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.model, args.n_val, kl_max=args.kl_max), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
