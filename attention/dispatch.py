"""The one patch dispatcher per attention key.

ComfyUI allows a single replace patch per key (``attn1``/``attn2`` and
``(block, number, index)``). Several Likeness methods, and other packs, want
the same layers, so the key gets one :class:`AttentionDispatcher` that

* keeps whatever was registered on the key before (another pack's replace
  patch included) and runs it as the innermost attention, or ComfyUI's own
  optimized attention when there was none;
* runs the Likeness processors around it in a defined order: lower
  ``order`` first, then registration order. Each processor receives the
  projected q/k/v and an ``attend`` continuation, so it can change q/k/v,
  call ``attend`` several times, or change the result.

Dispatchers are only ever placed on a ``clone()`` of a ModelPatcher, so the
model the user passed in keeps computing what it computed before.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Iterable, Protocol

import torch

from .unet_layers import BlockKey

Attend = Callable[..., torch.Tensor]
ATTENTION_KINDS = ("attn1", "attn2")
CLEANUP_WRAPPER_KEY = "likeness_cleanup"
# extra_options key under which an attention mask reaches the innermost attention.
ATTENTION_MASK = "likeness_attention_mask"

log = logging.getLogger("likeness")


class AttentionProcessor(Protocol):
    """A Likeness change to one attention layer.

    ``__call__(q, k, v, extra_options, attend)`` returns the attention output
    (before ``to_out``). ``attend(q, k, v, extra_options, mask=None)`` computes
    what the layer would compute without this processor.
    """

    order: int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict, attend: Attend) -> torch.Tensor: ...


def default_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ComfyUI's CrossAttention computes from projected q/k/v."""
    # Looked up at call time: ComfyUI picks the implementation at start-up.
    import comfy.ldm.modules.attention as comfy_attention

    heads = extra_options["n_heads"]
    precision = extra_options.get("attn_precision")
    if mask is None:
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                   transformer_options=extra_options)
    return comfy_attention.optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                                      transformer_options=extra_options)


class AttentionDispatcher:
    """The replace patch Likeness puts on one attention key."""

    def __init__(self, kind: str, key: BlockKey, previous: Callable | None = None) -> None:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {ATTENTION_KINDS}")
        self.kind = kind
        self.key = key
        self.previous = previous
        self.processors: list[AttentionProcessor] = []
        self._warned_mask = False

    def add(self, processor: AttentionProcessor) -> None:
        self.processors.append(processor)
        # sorted() is stable: equal orders keep registration order.
        self.processors = sorted(self.processors, key=lambda p: getattr(p, "order", 100))

    def _innermost(self, q, k, v, extra_options, mask=None):
        mask = extra_options.get(ATTENTION_MASK) if mask is None else mask
        if self.previous is None:
            return default_attention(q, k, v, extra_options, mask)
        if mask is not None:
            # A foreign replace patch takes no mask; the mask is what the
            # Likeness processor needs, so plain attention runs instead.
            if not self._warned_mask:
                log.warning("Likeness: %s %s needs an attention mask; the replace patch another pack "
                            "placed on this layer is bypassed for those calls", self.kind, self.key)
                self._warned_mask = True
            return default_attention(q, k, v, extra_options, mask)
        return self.previous(q, k, v, extra_options)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        attend: Attend = self._innermost
        for processor in reversed(self.processors):
            attend = _bind(processor, attend)
        return attend(q, k, v, extra_options)

    def to(self, device) -> "AttentionDispatcher":
        # ModelPatcher.model_patches_to moves patches with the model.
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        self.processors = [p.to(device) if hasattr(p, "to") else p for p in self.processors]
        return self

    def cleanup(self) -> None:
        for processor in self.processors:
            if hasattr(processor, "cleanup"):
                processor.cleanup()

    def __deepcopy__(self, memo: dict) -> "AttentionDispatcher":
        # ModelPatcher.clone() deep-copies model_options. Processors are
        # configuration plus references to shared tensors: a clone gets its
        # own list (so adding to it leaves the original alone) but not copies
        # of what they hold. A foreign patch is copied as ComfyUI would.
        twin = AttentionDispatcher(self.kind, self.key, copy.deepcopy(self.previous, memo))
        twin.processors = list(self.processors)
        return twin

    def __repr__(self) -> str:
        names = [type(p).__name__ for p in self.processors]
        return f"AttentionDispatcher({self.kind}, {self.key}, processors={names}, previous={self.previous!r})"


def _bind(processor: AttentionProcessor, inner: Attend) -> Attend:
    def attend(q, k, v, extra_options, mask=None):
        if mask is not None:
            # Travels with the options to the innermost attention; a processor
            # in between that adds keys must widen it to match.
            extra_options = {**extra_options, ATTENTION_MASK: mask}
        return processor(q, k, v, extra_options, inner)
    return attend


def dispatchers(model) -> Iterable[AttentionDispatcher]:
    """The Likeness dispatchers on a ModelPatcher (or model_options)."""
    options = model if isinstance(model, dict) else model.model_options
    replace = options.get("transformer_options", {}).get("patches_replace", {})
    for kind in ATTENTION_KINDS:
        for patch in replace.get(kind, {}).values():
            if isinstance(patch, AttentionDispatcher):
                yield patch


def _cleanup_after_sampling(executor, *args, **kwargs):
    try:
        return executor(*args, **kwargs)
    finally:
        guider = executor.class_obj
        for dispatcher in dispatchers(guider.model_options):
            dispatcher.cleanup()


def add_input_patch(model, name: str, patch) -> None:
    """Append ``patch`` to ComfyUI's ``name`` list ("attn1_patch", "attn2_patch") of a clone, but
    before any patch marked ``sees_final_inputs``: those record what the projections will see, so
    they must come after every patch that changes it."""
    patches = model.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    current = patches.get(name, [])
    last = [p for p in current if getattr(p, "sees_final_inputs", False)]
    patches[name] = [p for p in current if not getattr(p, "sees_final_inputs", False)] + [patch] + last


def patched_clone(model, placements: Iterable[tuple[str, BlockKey, AttentionProcessor]]):
    """A clone of ``model`` with each processor placed on its (kind, key).

    The key is always the 3-part ``(block, number, index)``; a patch another
    pack registered on either that key or the 2-part ``(block, number)`` key
    (which ComfyUI falls back to) is kept and runs inside the dispatcher.
    """
    import comfy.patcher_extension

    clone = model.clone()
    transformer_options = clone.model_options.setdefault("transformer_options", {})
    for kind, key, processor in placements:
        replace = transformer_options.get("patches_replace", {}).get(kind, {})
        existing = replace.get(tuple(key), replace.get(tuple(key[:2])))
        if isinstance(existing, AttentionDispatcher) and existing.key == tuple(key):
            dispatcher = existing
        else:
            dispatcher = AttentionDispatcher(kind, tuple(key), previous=existing)
            clone.set_model_patch_replace(dispatcher, kind, key[0], key[1], key[2])
        dispatcher.add(processor)
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    # One cleanup per model however many Likeness nodes are chained.
    if not clone.get_wrappers(outer, CLEANUP_WRAPPER_KEY):
        clone.add_wrapper_with_key(outer, CLEANUP_WRAPPER_KEY, _cleanup_after_sampling)
    return clone
