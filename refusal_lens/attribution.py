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

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from .chat import check_instructions
from .directions import unit_direction
from .interventions import Intervention
from .models import Model
from .stats import bootstrap_mean_ci
from .streaming import eoi_positions, forward_chat, hook_name, stop_before

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

    embed: Float[Tensor, " batch"]
    heads: Float[Tensor, "batch layer head"]
    attn_bias: Float[Tensor, "batch layer"]
    mlp: Float[Tensor, "batch layer"]
    total: Float[Tensor, " batch"]
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

    def sum_of_terms(self) -> Float[Tensor, " batch"]:
        return self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1)


def _output_projection(model: Model, layer: int):
    """The attention output projection (an ``nn.Linear``: weight ``[d_model, n_heads * d_head]``) of a block."""
    return model.blocks[layer].attn.o.original_component


def _check_position(model: Model, position: int) -> int:
    position = int(position)
    if position >= 0:
        raise ValueError(f"position must be a negative offset from the end of the prompt (-1 = last), got {position}")
    return position


def _head_readouts(
    model: Model, v: Tensor, layer: int
) -> tuple[Float[Tensor, "layer head d_head"], Float[Tensor, " layer"]]:
    """Per head of layers ``< layer``: the vector ``W_O[:, h]^T v`` whose dot product with the head's ``z`` is
    its write along ``v``; and per layer the attention bias's projection ``b_O . v`` (float64, CPU)."""
    readouts, biases = [], []
    for l in range(layer):
        proj = _output_projection(model, l)
        w = proj.weight.detach().double().cpu()  # [d_model, n_heads * d_head]
        readouts.append(rearrange(v @ w, "(head d_head) -> head d_head", head=model.cfg.n_heads))
        biases.append(float(proj.bias.detach().double().cpu() @ v) if proj.bias is not None else 0.0)
    return torch.stack(readouts), torch.tensor(biases, dtype=torch.float64)


def _record_projections(model: Model, prompts: list[str], v: Tensor, readout: Tensor, *, layer: int, position: int,
                        batch_size: int) -> dict[str, Tensor]:
    """One pass over ``prompts`` up to ``resid_pre[layer]``, recording at ``position`` the projection on ``v`` of
    the embedding (``embed``), the total (``total``), every head's write (``heads [n, layer, head]``) and every
    attention and MLP output (``attn``, ``mlp``: ``[n, layer]``), float64."""
    n, n_heads = len(prompts), model.cfg.n_heads
    found = {"embed": torch.empty(n, dtype=torch.float64), "total": torch.empty(n, dtype=torch.float64),
             "heads": torch.empty(n, layer, n_heads, dtype=torch.float64),
             "attn": torch.empty(n, layer, dtype=torch.float64), "mlp": torch.empty(n, layer, dtype=torch.float64)}
    rows = slice(0, 0)

    def along_v(key: str, l: int | None = None):
        def hook_fn(x: Tensor, hook) -> None:
            value = x[:, position].double().cpu() @ v
            if l is None:
                found[key][rows] = value
            else:
                found[key][rows, l] = value
        return hook_fn

    def head_writes(l: int):
        def hook_fn(z: Tensor, hook) -> None:
            z_here = z[:, position].double().cpu()
            found["heads"][rows, l] = einsum(z_here, readout[l], "batch head d_head, head d_head -> batch head")
        return hook_fn

    hooks = [(hook_name("resid_pre", 0), along_v("embed")), (hook_name("resid_pre", layer), along_v("total"))]
    for l in range(layer):
        hooks += [(f"blocks.{l}.attn.hook_z", head_writes(l)), (hook_name("attn_out", l), along_v("attn", l)),
                  (hook_name("mlp_out", l), along_v("mlp", l))]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            forward_chat(model, prompts[rows], stop_at_layer=stop_before(model, layer))
    return found


def decompose(
    model: Model,
    prompts: Sequence[str],
    direction: Float[Tensor, " d_model"],
    *,
    layer: int,
    position: int = -1,
    batch_size: int = 16,
) -> Decomposition:
    """Split ``resid_pre[layer] . v`` at ``position`` into embedding, head, bias and MLP terms for each prompt."""
    prompts = check_instructions(prompts, model.chat)
    position = _check_position(model, position)
    if not 0 < layer < model.cfg.n_layers:
        raise ValueError(
            f"layer must lie in [1, {model.cfg.n_layers}) (resid_pre of layer 0 is the embedding), got {layer}"
        )
    v = unit_direction(direction, model.cfg.d_model)
    readout, bias = _head_readouts(model, v, layer)
    found = _record_projections(model, prompts, v, readout, layer=layer, position=position, batch_size=batch_size)
    attn_bias = bias.expand(len(prompts), layer).clone()
    mismatch = (found["heads"].sum(-1) + attn_bias - found["attn"]).abs().max()
    if mismatch > COMPLETENESS_RTOL * found["attn"].abs().mean().clamp_min(1e-12):
        raise AttributionError(
            f"heads' z @ W_O does not add up to hook_attn_out (max error {float(mismatch):.3g}); this "
            "architecture's attention output is not a plain per-head sum"
        )
    return Decomposition(embed=found["embed"], heads=found["heads"], attn_bias=attn_bias, mlp=found["mlp"],
                         total=found["total"], layer=layer, position=position)


def head_attribution(
    model: Model,
    prompts: Sequence[str],
    direction: Float[Tensor, " d_model"],
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
    model: Model, prompts: Sequence[str], *, layers: Sequence[int], positions: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Float[Tensor, "pos layer head d_head"]:
    """Mean ``z`` (each head's output before ``W_O``) over ``prompts`` at ``positions`` (default: the eoi tokens)."""
    prompts = check_instructions(prompts, model.chat)
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
                         stop_at_layer=stop_before(model, max(layers) + 1))
    return total / len(prompts)


def mean_ablate_heads(
    model: Model, heads: Sequence[tuple[int, int]], reference: Sequence[str], *, positions: Sequence[int] | None = None,
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
    model: Model,
    table: pd.DataFrame,
    direction: Float[Tensor, " d_model"],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int,
    position: int = -1,
    k: int = 8,
    n_random: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Causal cross-check of DFA: mean-ablate the top-``k`` heads of ``table`` vs ``n_random`` sets of ``k``
    random heads.

    Heads' ``z`` at the eoi positions of the ``harmful`` prompts are replaced by
    their mean over ``harmless``. Returns one row per condition (``none``,
    ``top-k``, ``random-k #i``) with the mean projection of ``resid_pre[layer]`` at
    ``position`` onto the unit direction and the mean refusal score (log-odds) on ``harmful``.
    """
    from .metrics import refusal_score
    from .streaming import projections

    v = unit_direction(direction, model.cfg.d_model)
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
