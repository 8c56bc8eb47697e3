"""Direct feature attribution (DFA): which components write the refusal direction.

The residual stream entering block ``L`` is a sum of everything written before it::

    resid_pre[L] = resid_pre[0] + sum_{l < L} (attn_out[l] + mlp_out[l])
    attn_out[l]  = sum_h z[l, h] @ W_O[l, h] + b_O[l]

(``resid_pre[0]`` is the embedding, plus positional embeddings where a model has
them). Projecting every term onto the unit direction ``v`` splits the residual's
projection ``resid_pre[L] . v`` into one number per embedding, head, attention
bias and MLP. The split is exact for models whose blocks add their sublayer
outputs straight into the residual stream (Llama, Qwen, Mistral, Phi-3, GPT-2
...); models with post-sublayer norms (Gemma 2/3) are refused with a clear error,
because there a head's write is not linear in its ``z``.

:func:`decompose` returns per-prompt terms and checks that they sum back to the
total; :func:`head_attribution` turns them into a table per (layer, head);
:func:`mean_ablate_heads` is the causal cross-check: it replaces chosen heads'
outputs at the end-of-instruction positions by their mean over reference prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .activations import check_prompts, eoi_positions, forward_chat, hook_name
from .directions import InvalidDirectionError
from .interventions import Intervention
from .stats import bootstrap_mean_ci

# Completeness tolerance: |sum of terms - total| <= COMPLETENESS_RTOL * mean |total|.
COMPLETENESS_RTOL = 1e-3


class AttributionError(ValueError):
    """The residual stream of this model cannot be split exactly into per-head terms."""


@dataclass
class Decomposition:
    """Per-prompt terms of ``resid_pre[layer] . v`` at one position, float64 on CPU.

    ``heads[b, l, h]`` is head ``h`` of layer ``l``'s write, ``mlp[b, l]`` and
    ``attn_bias[b, l]`` those of layer ``l``'s MLP and attention bias, ``embed[b]``
    the embedding's; their sum equals ``total[b]`` (checked on construction).
    """

    embed: Float[Tensor, "batch"]
    heads: Float[Tensor, "batch layer head"]
    attn_bias: Float[Tensor, "batch layer"]
    mlp: Float[Tensor, "batch layer"]
    total: Float[Tensor, "batch"]
    layer: int
    position: int

    def __post_init__(self) -> None:
        error = (self.sum_of_terms() - self.total).abs().max()
        scale = self.total.abs().mean().clamp_min(1e-12)
        if error > COMPLETENESS_RTOL * scale:
            raise AttributionError(
                f"terms sum to the residual's projection only within {float(error):.3g} (mean |total| "
                f"{float(scale):.3g}): the model writes to the residual stream in a way DFA does not model"
            )

    def sum_of_terms(self) -> Float[Tensor, "batch"]:
        return self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1)


def _unit(direction: Tensor, d_model: int) -> Float[Tensor, "d_model"]:
    """``direction / |direction|`` in float64, sign kept (attribution is signed; a QR basis such as
    ``interventions.orthonormal_basis`` may flip it)."""
    v = torch.as_tensor(direction).detach().to(torch.float64).cpu()
    if v.shape != (d_model,):
        raise InvalidDirectionError(f"direction of shape {tuple(v.shape)} does not fit the model: expected [{d_model}]")
    if not torch.isfinite(v).all() or v.norm() == 0:
        raise InvalidDirectionError("the direction is zero or contains NaN/inf values")
    return v / v.norm()


def _output_projection(model, layer: int):
    """The attention output projection (an ``nn.Linear``: weight ``[d_model, n_heads * d_head]``) of a block."""
    return model.blocks[layer].attn.o.original_component


def _check_position(model, position: int) -> int:
    position = int(position)
    if position >= 0:
        raise ValueError(f"position must be a negative offset from the end of the prompt (-1 = last), got {position}")
    return position


def decompose(
    model,
    prompts: Sequence[str],
    direction: Float[Tensor, "d_model"],
    *,
    layer: int,
    position: int = -1,
    batch_size: int = 16,
) -> Decomposition:
    """Split ``resid_pre[layer] . v`` at ``position`` into embedding, head, bias and MLP terms for each prompt."""
    prompts = check_prompts(prompts)
    position = _check_position(model, position)
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    if not 0 < layer < n_layers:
        raise ValueError(f"layer must lie in [1, {n_layers}) (resid_pre of layer 0 is the embedding), got {layer}")
    v = _unit(direction, model.cfg.d_model)
    # Head h of layer l writes z[l, h] @ W_O[:, h]^T, so its projection on v is z[l, h] . (W_O[:, h]^T v).
    readouts, bias_terms = [], []
    for l in range(layer):
        proj = _output_projection(model, l)
        w = proj.weight.detach().double().cpu()  # [d_model, n_heads * d_head]
        readouts.append((v @ w).reshape(n_heads, d_head))
        bias_terms.append(float(proj.bias.detach().double().cpu() @ v) if proj.bias is not None else 0.0)
    readout = torch.stack(readouts)  # [layer, head, d_head] float64

    n = len(prompts)
    embed, total = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    heads = torch.empty(n, layer, n_heads, dtype=torch.float64)
    mlp = torch.empty(n, layer, dtype=torch.float64)
    attn_check = torch.empty(n, layer, dtype=torch.float64)  # attn_out . v, to verify heads + bias
    start = 0

    def at_position(x: Tensor) -> Tensor:
        return x[:, position].double().cpu()

    def make_hook(kind: str, l: int):
        def hook_fn(x: Tensor, hook) -> None:
            rows = slice(start, start + x.shape[0])
            if kind == "z":
                heads[rows, l] = (at_position(x) * readout[l]).sum(-1)
            elif kind == "attn_out":
                attn_check[rows, l] = at_position(x) @ v
            elif kind == "mlp_out":
                mlp[rows, l] = at_position(x) @ v
            elif kind == "embed":
                embed[rows] = at_position(x) @ v
            else:
                total[rows] = at_position(x) @ v

        return hook_fn

    hooks = [(hook_name("resid_pre", 0), make_hook("embed", 0)), (hook_name("resid_pre", layer), make_hook("total", 0))]
    for l in range(layer):
        hooks += [(f"blocks.{l}.attn.hook_z", make_hook("z", l)),
                  (hook_name("attn_out", l), make_hook("attn_out", l)),
                  (hook_name("mlp_out", l), make_hook("mlp_out", l))]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for start in range(0, n, batch_size):
            forward_chat(model, prompts[start : start + batch_size], stop_at_layer=layer)
    attn_bias = torch.tensor(bias_terms, dtype=torch.float64).expand(n, layer).clone()
    mismatch = (heads.sum(-1) + attn_bias - attn_check).abs().max()
    if mismatch > COMPLETENESS_RTOL * attn_check.abs().mean().clamp_min(1e-12):
        raise AttributionError(
            f"heads' z @ W_O does not add up to hook_attn_out (max error {float(mismatch):.3g}); this "
            "architecture's attention output is not a plain per-head sum"
        )
    return Decomposition(embed=embed, heads=heads, attn_bias=attn_bias, mlp=mlp, total=total, layer=layer,
                         position=position)


def head_attribution(
    model,
    prompts: Sequence[str],
    direction: Float[Tensor, "d_model"],
    *,
    layer: int,
    position: int = -1,
    baseline: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Mean direct contribution of every head in layers ``< layer`` to ``resid_pre[layer] . v``.

    Columns: ``layer, head, harmful`` (mean over ``prompts``), and with ``baseline``
    (the harmless prompts) ``harmless`` and ``difference`` (harmful - harmless),
    plus ``ci_low, ci_high``: a percentile bootstrap over prompts of the
    difference (of the mean without ``baseline``). Sorted by ``difference``
    (or ``harmful``), largest first. Units: residual-stream units along the unit direction.
    """
    pos_terms = decompose(model, prompts, direction, layer=layer, position=position, batch_size=batch_size).heads
    neg_terms = (decompose(model, baseline, direction, layer=layer, position=position, batch_size=batch_size).heads
                 if baseline is not None else None)
    low, high = bootstrap_mean_ci(pos_terms, neg_terms, n_boot=n_boot, ci=ci, seed=seed)  # [layer, head] each
    grid_l, grid_h = torch.meshgrid(torch.arange(layer), torch.arange(model.cfg.n_heads), indexing="ij")
    table = {"layer": grid_l.flatten().numpy(), "head": grid_h.flatten().numpy(),
             "harmful": pos_terms.mean(0).flatten().numpy()}
    key = "harmful"
    if neg_terms is not None:
        table["harmless"] = neg_terms.mean(0).flatten().numpy()
        table["difference"] = table["harmful"] - table["harmless"]
        key = "difference"
    table["ci_low"], table["ci_high"] = low.flatten().numpy(), high.flatten().numpy()
    return pd.DataFrame(table).sort_values(key, ascending=False, ignore_index=True)


def head_means(
    model, prompts: Sequence[str], *, layers: Sequence[int], positions: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Float[Tensor, "pos layer head d_head"]:
    """Mean ``z`` (each head's output before ``W_O``) over ``prompts`` at ``positions`` (default: the eoi tokens)."""
    prompts = check_prompts(prompts)
    positions = eoi_positions(model) if positions is None else [_check_position(model, p) for p in positions]
    layers = list(layers)
    total = torch.zeros(len(positions), len(layers), model.cfg.n_heads, model.cfg.d_head, dtype=torch.float64)
    index = torch.tensor(positions)

    def make_hook(i: int):
        def hook_fn(z: Tensor, hook) -> None:
            total[:, i] += z[:, index.to(z.device)].double().sum(0).cpu()

        return hook_fn

    hooks = [(f"blocks.{l}.attn.hook_z", make_hook(i)) for i, l in enumerate(layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for start in range(0, len(prompts), batch_size):
            forward_chat(model, prompts[start : start + batch_size],
                         stop_at_layer=max(layers) + 1 if max(layers) + 1 < model.cfg.n_layers else None)
    return total / len(prompts)


def mean_ablate_heads(
    model, heads: Sequence[tuple[int, int]], reference: Sequence[str], *, positions: Sequence[int] | None = None,
) -> Intervention:
    """Replace each ``(layer, head)``'s ``z`` at ``positions`` (default: the eoi tokens) by its mean over ``reference``.

    Mean ablation removes what a head says about *these* prompts while keeping
    what it says on average, so the rest of the network stays on-distribution.
    """
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("no heads to ablate")
    bad = [(l, h) for l, h in heads if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads)]
    if bad:
        raise ValueError(f"heads {bad} do not exist (n_layers={model.cfg.n_layers}, n_heads={model.cfg.n_heads})")
    positions = eoi_positions(model) if positions is None else [_check_position(model, p) for p in positions]
    layers = sorted({l for l, _ in heads})
    means = head_means(model, reference, layers=layers, positions=positions)  # [pos, layer, head, d_head]
    index = torch.tensor(positions)

    def make_hook(i: int, chosen: list[int]):
        def hook_fn(z: Tensor, hook) -> Tensor:
            z = z.clone()
            idx = index.to(z.device)
            for h in chosen:
                z[:, idx, h] = means[:, i, h].to(z.device, z.dtype)
            return z

        return hook_fn

    hooks = [(f"blocks.{l}.attn.hook_z", make_hook(i, [h for hl, h in heads if hl == l])) for i, l in enumerate(layers)]
    return Intervention(model, hooks, f"mean-ablate {len(heads)} heads")


def head_ablation_check(
    model,
    table: pd.DataFrame,
    direction: Float[Tensor, "d_model"],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int,
    position: int = -1,
    k: int = 8,
    n_random: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Causal cross-check of DFA: mean-ablate the top-``k`` heads of ``table`` vs ``n_random`` sets of ``k`` random heads.

    Heads' ``z`` at the eoi positions of the ``harmful`` prompts are replaced by
    their mean over ``harmless``. Returns one row per condition (``none``,
    ``top-k``, ``random-k #i``) with the mean projection of ``resid_pre[layer]`` at
    ``position`` onto the unit direction and the mean refusal score (log-odds) on ``harmful``.
    """
    from .activations import projections
    from .metrics import refusal_score

    v = _unit(direction, model.cfg.d_model)
    unit = v.float()[None, None]  # [pos=1, layer=1, d_model]

    def measure(condition: str, heads: list[tuple[int, int]] | None) -> dict:
        def scores() -> dict:
            proj = projections(model, harmful, unit, positions=[position], layers=[layer])
            return {"projection": float(proj.mean()), "refusal_score": float(refusal_score(model, harmful).mean())}

        if heads is None:
            return {"condition": condition, "heads": "", **scores()}
        with mean_ablate_heads(model, heads, harmless):
            return {"condition": condition, "heads": " ".join(f"L{l}H{h}" for l, h in heads), **scores()}

    top = [(int(r.layer), int(r.head)) for r in table.head(k).itertuples()]
    everything = [(l, h) for l in range(layer) for h in range(model.cfg.n_heads)]
    rng = torch.Generator().manual_seed(seed)
    rows = [measure("none", None), measure(f"top-{k}", top)]
    for i in range(n_random):
        pick = torch.randperm(len(everything), generator=rng)[:k].tolist()
        rows.append(measure(f"random-{k} #{i + 1}", [everything[j] for j in pick]))
    return pd.DataFrame(rows)
