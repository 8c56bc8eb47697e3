"""Reading activations at end-of-instruction positions, streamed batch by batch; one forward-pass helper.

Every function here runs the model over formatted prompts in batches, with
hooks on one site (``resid_pre`` by default) at the requested layers, and
reduces each batch inside the hook: nothing holds a full ``ActivationCache``.

Positions are negative offsets from the end of the prompt (``-1`` is the last
token). Prompts are left-padded, so the same offset names the same template
token in every row; the default is every end-of-instruction token, as in the
paper. Batched runs pass the attention mask, from which the bridge derives
position ids, so padding does not change activations (``batch_size=1`` runs
prompts one at a time, for comparison).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .chat import check_instructions
from .models import Model

SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
# Show a progress bar from this many batches on.
_PROGRESS_FROM_BATCHES = 8


def stop_before(model: Model, block: int) -> int | None:
    """``stop_at_layer`` for a forward pass that needs nothing from block ``block`` on (its ``resid_pre`` is
    the input of that block, computed before it), or ``None`` to run every block."""
    return block if 0 < block < model.cfg.n_layers else None


def hook_name(hook: str, layer: int) -> str:
    """TransformerLens hook name for a site (``"resid_pre"``) at a layer: ``blocks.{layer}.hook_resid_pre``."""
    if hook not in SITES:
        raise ValueError(f"unknown activation site {hook!r}; choose one of {', '.join(SITES)}")
    return SITES[hook].format(layer=layer)


def eoi_positions(model: Model) -> list[int]:
    """Negative offsets of all end-of-instruction tokens, e.g. ``[-6, ..., -1]`` for ChatML."""
    return list(range(-len(model.chat.eoi_tokens), 0))


def _resolve(model: Model, positions, layers) -> tuple[list[int], list[int]]:
    positions = eoi_positions(model) if positions is None else [int(p) for p in positions]
    if not positions or any(p >= 0 for p in positions):
        raise ValueError(
            f"positions must be negative offsets from the end of the prompt (-1 = last token), got {positions}"
        )
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    if not layers or any(not 0 <= l < n_layers for l in layers):
        raise ValueError(f"layers must lie in [0, {n_layers}), got {layers}")
    return positions, layers


def stream(
    model: Model,
    prompts: Sequence[str],
    reduce: Callable[[Int[Tensor, " batch"], int, Float[Tensor, "batch pos d_model"]], None],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
    system: str | None = None,
    progress: bool | None = None,
    sort_by_length: bool = True,
) -> tuple[list[int], list[int]]:
    """Run ``model`` over ``prompts`` and hand each batch's activations to ``reduce``.

    ``reduce(rows, layer_index, acts)`` receives the activations at ``positions`` of one layer
    (``acts[b, p]`` is prompt ``rows[b]`` at ``positions[p]``, in the model's dtype, on the layer's
    device) and must not keep them. Batches are formed from prompts sorted by token length (stable),
    so little compute goes to padding; ``sort_by_length=False`` keeps the given order. The forward
    pass stops after the last block needed (never reaching the unembedding unless the last block's
    output is asked for). Returns the resolved ``(positions, layers)``.
    """
    prompts = check_instructions(prompts, model.chat)
    positions, layers = _resolve(model, positions, layers)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pos_index = torch.tensor(positions)
    check_eoi = bool(len(positions)) and min(positions) >= -len(model.chat.eoi_tokens)
    # resid_pre of layer L is the input of block L: blocks 0..L-1 suffice. Other sites need block L.
    stop_at_layer = stop_before(model, max(layers) + (0 if hook == "resid_pre" else 1))
    if sort_by_length:
        lengths = model.chat.tokenize(prompts, system=system)["attention_mask"].sum(-1)
        order = torch.sort(lengths, stable=True).indices
    else:
        order = torch.arange(len(prompts))

    def make_hook(layer_index: int):
        def hook_fn(activation: Tensor, hook) -> None:
            reduce(rows, layer_index, activation[:, pos_index.to(activation.device)])

        return hook_fn

    fwd_hooks = [(hook_name(hook, layer), make_hook(i)) for i, layer in enumerate(layers)]
    batches = order.split(batch_size)
    show = len(batches) >= _PROGRESS_FROM_BATCHES if progress is None else progress
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        for rows in tqdm(batches, disable=not show, desc=f"{hook} activations", unit="batch"):
            forward_chat(model, [prompts[i] for i in rows], system=system, stop_at_layer=stop_at_layer,
                         check_eoi=check_eoi)
    return positions, layers


def forward_chat(
    model: Model,
    instructions: Sequence[str],
    *,
    system: str | None = None,
    stop_at_layer: int | None = None,
    check_eoi: bool = False,
):
    """One forward pass over ``instructions`` in the model's chat format, left-padded, on the model's device.

    Call it inside ``torch.no_grad()`` and ``model.hooks(...)``; returns what the model returns (logits
    ``[batch, pos, d_vocab]``, or the residual when ``stop_at_layer`` is set). ``check_eoi`` raises when a
    prompt's last tokens are not the end-of-instruction tokens (its end merged with the template).
    """
    batch = model.chat.tokenize(list(instructions), system=system)
    ids = batch["input_ids"]
    if check_eoi:
        eoi = torch.tensor(model.chat.eoi_tokens)
        if not (ids[:, -len(eoi):] == eoi).all():
            row = int((ids[:, -len(eoi):] != eoi).any(-1).nonzero()[0])
            raise ValueError(
                f"prompt {instructions[row][:60]!r} does not end with the end-of-instruction "
                "tokens after tokenization (its last characters merge with the template); edit it"
            )
    device = model.cfg.device
    return model(ids.to(device), attention_mask=batch["attention_mask"].to(device), stop_at_layer=stop_at_layer)


def mean_activations(
    model: Model,
    prompts: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
    system: str | None = None,
    progress: bool | None = None,
    sort_by_length: bool = True,
) -> Float[Tensor, "pos layer d_model"]:
    """Mean activation over prompts at each position and layer, accumulated in float64 (CPU).

    Memory is one ``[pos, layer, d_model]`` float64 sum, whatever the number of prompts.
    ``layer`` indexes ``layers`` (default: all layers, so it is the layer number).
    ``sort_by_length=False`` batches the prompts in their given order (see :func:`stream`).
    """
    prompts = check_instructions(prompts, model.chat)
    positions, layers = _resolve(model, positions, layers)
    total = torch.zeros(len(positions), len(layers), model.cfg.d_model, dtype=torch.float64)

    def accumulate(_rows: Tensor, layer_index: int, acts: Tensor) -> None:
        total[:, layer_index] += acts.to(torch.float64).sum(0).cpu()  # [pos, d_model]

    stream(model, prompts, accumulate, positions=positions, layers=layers, hook=hook,
           batch_size=batch_size, system=system, progress=progress, sort_by_length=sort_by_length)
    return total / len(prompts)


def activations(
    model: Model,
    prompts: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
    system: str | None = None,
    progress: bool | None = None,
) -> Float[Tensor, "batch pos layer d_model"]:
    """Per-prompt activations in float32 on CPU, for statistics; ``layer`` indexes ``layers``."""
    prompts = check_instructions(prompts, model.chat)
    positions, layers = _resolve(model, positions, layers)
    out = torch.empty(len(prompts), len(positions), len(layers), model.cfg.d_model, dtype=torch.float32)

    def store(rows: Tensor, layer_index: int, acts: Tensor) -> None:
        out[rows, :, layer_index] = acts.float().cpu()

    stream(model, prompts, store, positions=positions, layers=layers, hook=hook,
           batch_size=batch_size, system=system, progress=progress)
    return out


def projections(
    model: Model,
    prompts: Sequence[str],
    unit_directions: Float[Tensor, "pos layer d_model"],
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    hook: str = "resid_pre",
    batch_size: int = 16,
    system: str | None = None,
    progress: bool | None = None,
) -> Float[Tensor, "batch pos layer"]:
    """Scalar projection of each prompt's activation onto a unit direction per (position, layer), float64, CPU.

    ``unit_directions[p, l]`` is used at ``positions[p]`` and ``layers[l]``; computed
    in float32 on the model's device, so only ``[batch, pos, layer]`` scalars are kept.
    """
    prompts = check_instructions(prompts, model.chat)
    positions, layers = _resolve(model, positions, layers)
    expected = (len(positions), len(layers), model.cfg.d_model)
    if tuple(unit_directions.shape) != expected:
        raise ValueError(
            f"unit_directions has shape {tuple(unit_directions.shape)}; expected {expected} "
            "(positions, layers, d_model) for the positions and layers requested"
        )
    out = torch.empty(len(prompts), len(positions), len(layers), dtype=torch.float64)
    directions32 = unit_directions.float()

    def project(rows: Tensor, layer_index: int, acts: Tensor) -> None:
        direction = directions32[:, layer_index].to(acts.device)  # [pos, d_model]
        out[rows, :, layer_index] = (acts.float() * direction).sum(-1).double().cpu()

    stream(model, prompts, project, positions=positions, layers=layers, hook=hook,
           batch_size=batch_size, system=system, progress=progress)
    return out
