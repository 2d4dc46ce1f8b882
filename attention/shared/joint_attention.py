"""The one hook per DiT model: joint (text + image) attention through ComfyUI's per-call override.

ComfyUI's attention functions are wrapped (``comfy.ldm.modules.attention.wrap_attn``): when the
call's transformer_options hold ``optimized_attention_override``, it is called as
``override(func, q, k, v, heads, **kwargs)`` instead of ``func``. Likeness puts one
:class:`JointAttentionRouter` there on a ``clone()``; it

* keeps an override already there (another pack's) and runs it as the innermost attention, so
  that pack's change still happens (chain, never replace);
* knows which block a call is in from ``block_type`` / ``block_index`` (ComfyUI's Flux sets
  them; for an MMDiT, which does not, a ``patches_replace["dit"]`` marker per joint block sets
  them, running whatever block patch was there before) and how many text and image tokens the
  sequence holds (an APPLY_MODEL wrapper reads them off the call's latent and text);
* hands each Likeness joint processor q/k/v as the block's attention receives them (after
  modulation, QK-norm and RoPE), in (batch, heads, tokens, head width), text tokens first, and an
  ``attend`` continuation, as the UNet dispatcher does for attn1/attn2.

Flux.1 and SD3.5 plug in here; the next joint-attention family (Flux.2, Qwen-Image, HiDream)
needs its block keys in layer_table.py and, where its model names no block, a marker here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .dispatch import acts_in
from .layer_table import dit_block_key, dit_keys

OVERRIDE = "optimized_attention_override"
JOINT_TOKENS = "likeness_joint_tokens"  # transformer_options key: this call's JointTokens
WRAPPER_KEY = "likeness_joint_tokens"


@dataclass(frozen=True)
class JointTokens:
    """How a joint sequence is laid out: text tokens first, then the image's (grid rows × cols),
    then any others (Flux Kontext's reference latents)."""

    text: int
    grid: tuple[int, int]

    @property
    def image(self) -> int:
        return self.grid[0] * self.grid[1]

    def image_slice(self) -> slice:
        return slice(self.text, self.text + self.image)


JointAttend = Callable[..., torch.Tensor]


class JointProcessor(Protocol):
    """A Likeness change to joint attention: ``__call__(q, k, v, call, attend)`` with q/k/v in
    (batch, heads, tokens, head width) returns (batch, tokens, heads·width), what the block's
    attention returns; ``attend(q, k, v, mask=None)`` is the attention without this processor."""

    order: int
    passes: frozenset


@dataclass
class JointCall:
    """What a processor knows of one attention call."""

    key: tuple
    tokens: JointTokens
    options: dict  # the call's transformer_options (sigmas, cond_or_uncond, ...)
    heads: int


def _to_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    # (B, L, H·D), or (B, L, H, D) as MMDiT hands V: what ComfyUI's attention reshapes the same way
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class JointAttentionRouter:
    """The ``optimized_attention_override`` Likeness puts on a DiT model."""

    def __init__(self, previous: Callable | None = None) -> None:
        self.previous = previous
        self.processors: list = []

    def add(self, processor) -> None:
        self.processors = sorted([*self.processors, processor], key=lambda p: getattr(p, "order", 100))

    def _inner(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        key, tokens = dit_block_key(options), options.get(JOINT_TOKENS)
        active = [p for p in self.processors if acts_in(p, options)] if key is not None and tokens else []
        # A processor with nothing to do in this call (acts_on) leaves ComfyUI's own call untouched, bit for bit.
        active = [p for p in active if not hasattr(p, "acts_on") or p.acts_on(key, options)]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if not active or kwargs.get("skip_output_reshape") or len(args) < 3 or heads is None:
            return self._inner(func, args, kwargs)
        q, k, v = args[:3]
        skip = bool(kwargs.get("skip_reshape", False))
        q, k, v = (_to_heads(t, heads, skip) for t in (q, k, v))
        if q.shape[2] < tokens.text + tokens.image:
            return self._inner(func, args, kwargs)  # an image-only attention (MMDiT-X's second one): as is
        base = {name: value for name, value in kwargs.items() if name not in ("skip_reshape", "mask", "heads")}

        def innermost(q_, k_, v_, mask=None):
            return self._inner(func, (q_, k_, v_, heads, *args[4:]),
                               {**base, "skip_reshape": True, "mask": kwargs.get("mask") if mask is None else mask})

        attend: JointAttend = innermost
        call = JointCall(key, tokens, options, heads)
        for processor in reversed(active):
            attend = _bind(processor, call, attend)
        return attend(q, k, v)

    def to(self, device) -> "JointAttentionRouter":
        self.processors = [p.to(device) if hasattr(p, "to") else p for p in self.processors]
        return self

    def cleanup(self) -> None:
        for processor in self.processors:
            if hasattr(processor, "cleanup"):
                processor.cleanup()

    def __deepcopy__(self, memo: dict) -> "JointAttentionRouter":
        twin = JointAttentionRouter(copy.deepcopy(self.previous, memo))
        twin.processors = list(self.processors)
        return twin


def _bind(processor, call: JointCall, inner: JointAttend) -> JointAttend:
    def attend(q, k, v, mask=None):
        return processor(q, k, v, call, lambda q_, k_, v_, mask_=None: inner(q_, k_, v_, mask_ if mask_ is not None
                                                                             else mask))
    return attend


def joint_tokens(diffusion_model, x: torch.Tensor, context: torch.Tensor | None) -> JointTokens:
    """The layout of a call of ``diffusion_model`` on latent ``x`` with text ``context``: the text
    (plus an MMDiT's register tokens) and the latent's patch grid (odd sizes padded up, as ComfyUI's
    pad_to_patch_size does)."""
    patch_size = int(getattr(diffusion_model, "patch_size", 2))
    registers = int(getattr(diffusion_model, "register_length", 0) or 0)
    text = (0 if context is None else context.shape[1]) + registers
    return JointTokens(text, (-(-x.shape[-2] // patch_size), -(-x.shape[-1] // patch_size)))


def _record_tokens(diffusion_model):
    """APPLY_MODEL wrapper: the call's text and image token counts into its transformer_options (a
    wrapper that calls the model on another latent, such as Face Fusion's face pass, sets its own)."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        transformer_options = {**transformer_options, JOINT_TOKENS: joint_tokens(diffusion_model, x, c_crossattn)}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return wrapper


class BlockMarker:
    """``patches_replace["dit"]`` patch for a model that names no block (MMDiT): sets block_type /
    block_index for the block's attention, then runs the block (or the patch that was there)."""

    def __init__(self, index: int, previous: Callable | None = None) -> None:
        self.index, self.previous = index, previous

    def __call__(self, args: dict, extra: dict):
        options = args.get("transformer_options")
        if options is not None:
            options["block_type"], options["block_index"] = "double", self.index
        try:
            return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        finally:
            if options is not None:
                options.pop("block_type", None)


def router_of(model) -> JointAttentionRouter | None:
    found = model.model_options.get("transformer_options", {}).get(OVERRIDE)
    return found if isinstance(found, JointAttentionRouter) else None


def patched_joint_clone(model, processors: list):
    """A clone of ``model`` with ``processors`` in its joint attention (one router per model,
    chained onto any override another pack put there before)."""
    import comfy.patcher_extension

    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    router = router_of(clone)
    if router is None:
        router = JointAttentionRouter(previous=options.get(OVERRIDE))
        options[OVERRIDE] = router
        diffusion_model = clone.get_model_object("diffusion_model")
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                   _record_tokens(diffusion_model))
        if not hasattr(diffusion_model, "double_blocks"):  # MMDiT: ComfyUI names no block
            replace = options.setdefault("patches_replace", {}).setdefault("dit", {})
            for _, index, _ in dit_keys(diffusion_model):
                previous = replace.get(("double_block", index))
                if not isinstance(previous, BlockMarker):
                    replace[("double_block", index)] = BlockMarker(index, previous)
        comfy_cleanup(clone)
    for processor in processors:
        router.add(processor)
    return clone


def comfy_cleanup(clone) -> None:
    """Free the processors' per-run state when sampling ends."""
    import comfy.patcher_extension

    def scope(executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            found = router_of(executor.class_obj)
            if found is not None:
                found.cleanup()

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, scope)
