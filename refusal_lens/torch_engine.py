"""Generation on the plain Hugging Face modules, with interventions as plain torch hooks.

Why: ``rl.generate`` runs Hugging Face ``generate`` on the bridge's wrapped model, so every decode step pays
for TransformerLens' per-component wrappers (HookPoints, re-implemented attention and norms, kwarg
filtering) even when only a few residual-stream sites are hooked (BENCHMARKS.md has the ratio to plain HF
``generate``). Here :func:`plain_hf` temporarily puts every wrapped HF module back in
its parent (the bridge is restored on exit, also when the body raises) and turns each ``(hook_name, fn)``
pair into a torch forward(-pre) hook on the HF module whose input or output that bridge HookPoint reads:

* ``blocks.{l}.hook_resid_pre``: the input hidden states of decoder layer ``l``; ``hook_resid_post``: its
  output (``output[0]`` when it returns a tuple);
* ``hook_resid_mid``: the input of the pre-MLP norm (the MLP's input where there is none);
* ``hook_attn_out`` / ``hook_mlp_out``: the attention's ``output[0]`` and the MLP's output, or on Gemma 2/3
  the output of the post-attention / post-feedforward norm, which is what the bridge hooks there.

The translation is not written per architecture: a name is resolved to its HookPoint as the bridge
resolves it, and the HookPoint must be the ``hook_in`` or ``hook_out`` of a bridge component that fires it
on exactly its HF module's first input or first output (:data:`VERIFIED_COMPONENTS`: the wrappers of the
8 architectures of the test matrix, where both engines give bit-identical activations and the same tokens).
The user's fn gets the same tensor and the same HookPoint object as under the bridge, and its return value
(``None``: unchanged) replaces the tensor. Anything else (a filter function, an attention-internal hook, a
wrapper not checked) does not translate, :func:`translate` says so, and ``engine="auto"`` uses the bridge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import Model

ENGINES = ("auto", "bridge", "torch")
# The residual-stream sites the torch engine translates (the names rl.hook_name builds).
TRANSLATABLE = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)")
# Bridge components whose hook_in / hook_out fire on exactly their HF module's first input / output, checked
# (bit-identical values at every site, same greedy tokens) on the 8 architectures of tests/test_architectures.py.
# Exact classes: a subclass may hook a transformed tensor (e.g. a scaled contribution), so it is not assumed.
VERIFIED_COMPONENTS = frozenset({
    "BlockBridge", "RMSNormalizationBridge", "PositionEmbeddingsAttentionBridge", "GatedMLPBridge",
    "JointQKVPositionEmbeddingsAttentionBridge", "JointGateUpMLPBridge",
})
# Every bridge component class found in those 8 architectures (and SmolLM2): models made only of these are
# unwrapped; any other wrapper may patch its HF module in ways not checked, so such a model stays on the bridge.
UNWRAP_CHECKED = VERIFIED_COMPONENTS | {"EmbeddingBridge", "LinearBridge", "RotaryEmbeddingBridge", "UnembeddingBridge"}


class UntranslatableHookError(ValueError):
    """A hook has no plain-torch equivalent; run it with ``engine="bridge"``."""


@dataclass(frozen=True)
class TorchHook:
    """One translated hook: call ``fn(tensor, hook=hook_point)`` on ``module``'s first input (``"in"``) or
    first output (``"out"``)."""

    name: str
    module: nn.Module  # the HF module (a bridge component's original_component)
    side: str  # "in" or "out"
    fn: Callable
    hook_point: nn.Module  # the bridge HookPoint, passed to fn as ``hook`` (it has .name, .ctx, .layer())


def _components():
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    return GeneralizedComponent


def _untranslatable(name: object, why: str) -> UntranslatableHookError:
    return UntranslatableHookError(
        f"hook {name!r} cannot run on the torch engine: {why}. Pass engine=\"bridge\" to rl.generate / "
        f"rl.generation.generate_tokens (engine=\"auto\" does that by itself)"
    )


def translate(model: Model, hooks: Iterable) -> list[TorchHook]:
    """``(hook_name, fn)`` pairs → :class:`TorchHook` s on HF modules; raises
    :class:`UntranslatableHookError` (a ``ValueError``) naming the first hook that has no torch equivalent."""
    from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map

    component_type = _components()
    hook_dict = model.hook_dict
    aliases = build_alias_to_canonical_map(hook_dict)
    owners = {}  # id(HookPoint) -> (bridge component, side)
    for component in model.modules():
        if isinstance(component, component_type):
            for side in ("in", "out"):
                point = getattr(component, f"hook_{side}", None)
                if point is not None:
                    owners.setdefault(id(point), (component, side))
    translated = []
    for name, fn in hooks:
        if not isinstance(name, str) or not TRANSLATABLE.fullmatch(name):
            raise _untranslatable(name, "only blocks.{l}.hook_resid_pre/_mid/_post, hook_attn_out and "
                                        "hook_mlp_out are translated")
        try:
            _, point = model._resolve_hook_point(name, aliases, hook_dict)
        except Exception as error:  # noqa: BLE001 - the bridge says why; we add the fix
            raise _untranslatable(name, f"the bridge does not resolve it ({error})") from error
        component, side = owners.get(id(point), (None, None))
        module = getattr(component, "original_component", None)
        if module is None:
            raise _untranslatable(name, "its HookPoint is not the plain input or output of one HF module "
                                        "in this architecture")
        if type(component).__name__ not in VERIFIED_COMPONENTS:
            raise _untranslatable(name, f"its bridge wrapper {type(component).__name__} is not one the torch "
                                        f"engine is checked against ({', '.join(sorted(VERIFIED_COMPONENTS))})")
        translated.append(TorchHook(name, module, side, fn, point))
    return translated


def _first_tensor_edit(hook: TorchHook, x: Tensor) -> Tensor:
    """The user's fn on ``x`` ``[batch, pos, d_model]``, as a HookPoint applies it: through the HookPoint's
    shape conversion if it has one (identity on these 3-D tensors), and ``None`` keeps ``x``."""
    conversion = getattr(hook.hook_point, "hook_conversion", None)
    result = hook.fn(x if conversion is None else conversion.convert(x), hook=hook.hook_point)
    if result is None:
        return x
    return result if conversion is None else conversion.revert(result)


def _register(hook: TorchHook) -> torch.utils.hooks.RemovableHandle:
    """Register ``hook`` on its module: a pre-hook on the first positional arg or ``hidden_states``, or a
    forward hook on the output tensor or the output tuple's first element (as BlockBridge and
    AttentionBridge hook them)."""
    if hook.side == "in":
        def on_input(module, args, kwargs):
            if args and isinstance(args[0], Tensor):
                return (_first_tensor_edit(hook, args[0]), *args[1:]), kwargs
            if isinstance(kwargs.get("hidden_states"), Tensor):
                return args, {**kwargs, "hidden_states": _first_tensor_edit(hook, kwargs["hidden_states"])}
            raise RuntimeError(f"torch engine: {hook.name} found no hidden-states input on "
                               f"{type(module).__name__}; use engine=\"bridge\"")

        return hook.module.register_forward_pre_hook(on_input, with_kwargs=True)

    def on_output(module, args, output):
        if isinstance(output, Tensor):
            return _first_tensor_edit(hook, output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (_first_tensor_edit(hook, output[0]), *output[1:])
        raise RuntimeError(f"torch engine: {hook.name} found no tensor output on {type(module).__name__}; "
                           f"use engine=\"bridge\"")

    return hook.module.register_forward_hook(on_output)


def _unwrap(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put every bridge component's HF module back in its parent, top down; returns ``(parent, name,
    bridge)`` swaps in the order made. Raises ValueError (after undoing) for a component with no HF module."""
    component_type = _components()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    stack = [root]
    try:
        while stack:
            parent = stack.pop()
            for name, child in list(parent._modules.items()):
                if isinstance(child, component_type):
                    original = child.original_component
                    if original is None:
                        raise ValueError(f"bridge component {type(child).__name__} at {name!r} wraps no HF module")
                    parent._modules[name] = original
                    swaps.append((parent, name, child))
                    child = original
                if child is not None:
                    stack.append(child)
    except BaseException:
        _rewrap(swaps)
        raise
    return swaps


def _rewrap(swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`_unwrap`'s swaps, last first."""
    for parent, name, bridge in reversed(swaps):
        parent._modules[name] = bridge


@contextmanager
def plain_hf(model: Model, hooks: Iterable = ()) -> Iterator[nn.Module]:
    """Inside: ``model.original_model`` is the plain HF model with ``hooks`` (``(hook_name, fn)`` pairs) as
    torch hooks; yields it. On exit, also on an exception, the torch hooks are removed and every bridge
    component is back. Raises :class:`UntranslatableHookError` before touching the model."""
    translated = translate(model, hooks)
    swaps = _unwrap(model.original_model)
    handles = []
    try:
        for hook in translated:
            handles.append(_register(hook))
        yield model.original_model
    finally:
        for handle in handles:
            handle.remove()
        _rewrap(swaps)


def bridge_hooks_active(model: Model) -> bool:
    """Whether any HookPoint of the bridge has a hook now (e.g. inside ``with rl.ablate(model, r):``); those
    would not fire on the plain HF modules."""
    from transformer_lens.hook_points import HookPoint

    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               for m in model.modules() if isinstance(m, HookPoint))


def choose_engine(model: Model, hooks: list, engine: str = "auto") -> str:
    """``"torch"`` or ``"bridge"`` for these hooks. ``"auto"``: torch when no bridge hook is active, every
    bridge wrapper in the model is a checked one and every hook translates, else bridge. ``"torch"`` raises
    ValueError (:class:`UntranslatableHookError` for a hook) where auto would take the bridge."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "bridge":
        return "bridge"
    try:
        if bridge_hooks_active(model):
            raise ValueError("engine=\"torch\" would skip the hooks already active on the bridge (e.g. inside "
                             "`with rl.ablate(...)`): pass them as hooks=..., or use engine=\"bridge\"")
        unknown = unchecked_components(model)
        if unknown:
            raise ValueError(f"the torch engine is not checked against this model's bridge wrappers "
                             f"({', '.join(unknown)}): use engine=\"bridge\"")
        translate(model, hooks)
    except ValueError:
        if engine == "torch":
            raise
        return "bridge"
    return "torch"


def unchecked_components(model: Model) -> list[str]:
    """Class names of the bridge components inside ``model.original_model`` that are not in
    :data:`UNWRAP_CHECKED` (or wrap no HF module): the torch engine is not used on such a model."""
    component_type = _components()
    return sorted({type(m).__name__ for m in model.original_model.modules() if isinstance(m, component_type)
                   and (type(m).__name__ not in UNWRAP_CHECKED or m.original_component is None)})
