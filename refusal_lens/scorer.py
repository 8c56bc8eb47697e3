"""Scoring one prompt set under interventions: the last position's logits, tokenized once.

Both selections (:func:`refusal_lens.select_direction` and
:func:`refusal_lens.over_refusal.select_false_refusal`) and the random-direction KL null
(:mod:`refusal_lens.kl_null`) score candidates through a :class:`Scorer`: the prompts are formatted and
tokenized once, the unmodified logits are computed once (the KL reference), and only the last position is
unembedded. For an intervention that changes nothing before ``resid_pre`` of some layer (activation
addition at that layer), the forward pass can start there from the block inputs recorded during the
unmodified run (:meth:`Scorer.enable_replay`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .chat import check_instructions
from .metrics import LAST_POSITION_ONLY, kl_divergence, refusal_log_odds
from .models import Model

__all__ = ["Scorer"]


class Scorer:
    """Last-position logits of pre-tokenized batches of ``instructions`` (raw) under a list of hooks.

    ``logits(record_from=l)`` also keeps, per batch, the input of every block from ``l`` on (hidden
    states and the keyword arguments the model passed: mask, position ids, rotary tables), so that
    ``logits_from(layer)`` can run only blocks ``layer..n_layers-1``: the same result as a full pass
    whose hooks change nothing before ``resid_pre`` of ``layer``.
    """

    def __init__(self, model: Model, instructions: Sequence[str], batch_size: int):
        instructions = check_instructions(instructions, model.chat)
        self.model, self.n_prompts = model, len(instructions)
        self.batches = [
            model.chat.tokenize(instructions[s : s + batch_size]) for s in range(0, len(instructions), batch_size)
        ]
        self.block_inputs: list[dict[int, tuple[Tensor, dict]]] = []
        self._reference: Tensor | None = None

    def logits(self, hooks: Iterable = (), *, record_from: int | None = None) -> Float[Tensor, "batch d_vocab"]:
        """Logits after the last prompt token (float32, CPU) with ``hooks`` active."""
        device = self.model.cfg.device
        recorded: dict[int, tuple[Tensor, dict]] = {}

        def record(layer: int):
            def pre_hook(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
                recorded[layer] = (hidden, {**kept, "use_cache": False})
            return pre_hook

        layers = [] if record_from is None else range(record_from, self.model.cfg.n_layers)
        handles = [self.model.blocks[l].register_forward_pre_hook(record(l), with_kwargs=True) for l in layers]
        rows = []
        try:
            with torch.no_grad(), self.model.hooks(fwd_hooks=[*hooks, LAST_POSITION_ONLY]):
                for batch in self.batches:
                    out = self.model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                    rows.append(out[:, -1].float().cpu())
                    if layers:
                        self.block_inputs.append(dict(recorded))
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(rows)

    def logits_from(self, layer: int, hooks: Iterable = ()) -> Float[Tensor, "batch d_vocab"]:
        """Last-position logits from the recorded input of block ``layer`` on, with ``hooks`` active."""
        model, rows = self.model, []
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            for recorded in self.block_inputs:
                hidden = recorded[layer][0]
                for block in range(layer, model.cfg.n_layers):
                    out = model.blocks[block](hidden, **recorded[block][1])
                    hidden = out[0] if isinstance(out, tuple) else out
                rows.append(model.unembed(model.ln_final(hidden[:, -1:]))[:, -1].float().cpu())
        return torch.cat(rows)

    @property
    def reference(self) -> Float[Tensor, "batch d_vocab"]:
        """The unmodified logits (computed on first use, or by :meth:`enable_replay`)."""
        if self._reference is None:
            self._reference = self.logits()
        return self._reference

    def enable_replay(self, layer: int) -> bool:
        """Compute the unmodified logits recording block inputs from ``layer`` on, and check that replaying
        them reproduces the full pass; if not (warned), drop the recording: :meth:`refusal` then runs full
        passes (slower, same result). Returns whether replay is on."""
        self._reference = self.logits(record_from=layer)
        try:
            error = float((self.logits_from(layer) - self._reference).abs().max())
        except Exception as exc:  # an architecture whose blocks need more than their recorded inputs
            error, reason = math.inf, f"{type(exc).__name__}: {exc}"
        else:
            reason = f"max |difference| {error:.2e}"
        if error <= 1e-4 * max(1.0, float(self._reference.abs().max())):
            return True
        warnings.warn(f"replaying blocks from layer {layer} does not reproduce the full forward pass on this model "
                      f"({reason}); scoring uses full forward passes instead (slower, same result)", stacklevel=3)
        self.block_inputs.clear()
        return False

    def refusal(self, hooks: Iterable = (), *, from_layer: int | None = None) -> Float[Tensor, " batch"]:
        """Per-prompt refusal score (float64 nats, :func:`refusal_lens.metrics.refusal_log_odds`) with ``hooks``;
        ``from_layer``: hooks that change nothing before that layer, replayed from it when replay is on; no hooks:
        from the unmodified logits."""
        hooks = list(hooks)
        if not hooks:
            logits = self.reference
        elif from_layer is not None and self.block_inputs:
            logits = self.logits_from(from_layer, hooks)
        else:
            logits = self.logits(hooks)
        return refusal_log_odds(logits, self.model.chat.refusal_tokens)

    def kl(self, hooks: Iterable) -> Float[Tensor, " batch"]:
        """Per-prompt next-token KL(unmodified || with ``hooks``), float64 nats (the paper's ``kl_div_fn``)."""
        return kl_divergence(self.reference, self.logits(hooks))
