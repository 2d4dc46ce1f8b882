"""The one patch dispatcher per attention key.

ComfyUI allows a single replace patch per key (``attn1``/``attn2`` and
``(block, number, index)``). Several Likeness methods, and other packs, want
the same layers, so the key gets one :class:`AttentionDispatcher` that

* keeps whatever was registered on the key before (another pack's replace
  patch included) and runs it as the innermost attention, or ComfyUI's own
  optimized attention when there was none;
* runs another pack's patch placed later as well: one registered on the
  2-part key ComfyUI looks up after ours (adopted when sampling starts), or
  one added through the callback-container protocol other packs use on a key
  they find occupied (``add(callback, **kwargs)``, ComfyUI_IPAdapter_plus'
  ``Attn2Replace`` convention: ``out += callback(out, q, k, v, extra_options,
  **kwargs)`` within ``kwargs``' sigma_start/sigma_end);
* when a Likeness processor needs an attention mask, which another pack's
  patch cannot take, computes the masked attention itself and adds what the
  other patch adds to plain attention on the same q, k, v
  (``f(q, k, v) − Attn(q, k, v)``): exact for patches that add to the
  attention output, as IPAdapter_plus, InstantID and PuLID do;
* runs the Likeness processors around it in a defined order: lower
  ``order`` first, then registration order. Each processor receives the
  projected q/k/v and an ``attend`` continuation, so it can change q/k/v,
  call ``attend`` several times, or change the result;
* runs a processor only in the passes it is designed for (``passes``): a
  model call is the image being made unless the patch that runs it for its
  own inputs marks it (:class:`Pass`, under :data:`PASS` in the options).

Dispatchers are only ever placed on a ``clone()`` of a ModelPatcher, so the
model the user passed in keeps computing what it computed before.
"""

from __future__ import annotations

import copy
import logging
from enum import Enum
from typing import Callable, Iterable, Protocol

import torch

from .layer_table import BlockKey

Attend = Callable[..., torch.Tensor]
ATTENTION_KINDS = ("attn1", "attn2")
CLEANUP_WRAPPER_KEY = "likeness_cleanup"
# extra_options key under which an attention mask reaches the innermost attention.
ATTENTION_MASK = "likeness_attention_mask"

log = logging.getLogger("likeness")

# transformer_options key: which pass a model call is. Absent: the image being made.
PASS = "likeness_pass"


class Pass(str, Enum):
    """The model calls Likeness runs. Auxiliary passes are those a patch runs for its own inputs;
    another Likeness patch acts in one only where it is designed for it (its ``passes``)."""

    IMAGE = "image"  # the picture being made (Infinite-ID's text stream is this pass)
    FACE_REFERENCE = "face reference"  # Face Fusion's pass of the reference face(s)
    IDENTITY_STREAM = "identity stream"  # Infinite-ID's identity stream of the same latent


# What a patch that says nothing acts in: the image only.
IMAGE_ONLY = frozenset({Pass.IMAGE})


def pass_of(options: dict) -> Pass:
    """The pass of a model call, from its transformer_options (or an attention's extra_options)."""
    return options.get(PASS, Pass.IMAGE)


def acts_in(patch, options: dict) -> bool:
    """Whether ``patch`` (a processor, input patch or wrapper with ``passes``) acts in this call."""
    return pass_of(options) in getattr(patch, "passes", IMAGE_ONLY)


class AttentionProcessor(Protocol):
    """A Likeness change to one attention layer.

    ``__call__(q, k, v, extra_options, attend)`` returns the attention output
    (before ``to_out``). ``attend(q, k, v, extra_options, mask=None)`` computes
    what the layer would compute without this processor.
    """

    order: int
    passes: frozenset  # the Pass values it acts in (default: the image only)

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
        self.later: Callable | None = None  # a patch registered after ours on the 2-part key (this run)
        self.processors: list[AttentionProcessor] = []
        self.callbacks: list[tuple[Callable, dict]] = []  # other packs' callbacks, added on this key

    def add(self, processor, **kwargs) -> None:
        """A Likeness processor; or, from another pack that found this key occupied, a callback
        of the container protocol ``callback(out, q, k, v, extra_options, **kwargs)``."""
        if kwargs or not hasattr(processor, "order"):
            self.callbacks.append((processor, kwargs))
            return
        self.processors.append(processor)
        # sorted() is stable: equal orders keep registration order.
        self.processors = sorted(self.processors, key=lambda p: getattr(p, "order", 100))

    def _innermost(self, q, k, v, extra_options, mask=None):
        mask = extra_options.get(ATTENTION_MASK) if mask is None else mask
        foreign = [patch for patch in (self.previous, self.later) if patch is not None]
        if not foreign:
            return default_attention(q, k, v, extra_options, mask)
        if mask is None and len(foreign) == 1:
            return foreign[0](q, k, v, extra_options)
        # Another pack's patch takes no mask (and two of them cannot both be innermost): the
        # attention is computed here, and each patch adds what it adds to plain attention.
        out = default_attention(q, k, v, extra_options, mask)
        plain = default_attention(q, k, v, extra_options)
        for patch in foreign:
            out = out + (patch(q, k, v, extra_options) - plain)
        return out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        attend: Attend = self._innermost
        for processor in reversed(self.processors):
            if acts_in(processor, extra_options):
                attend = _bind(processor, attend)
        out = attend(q, k, v, extra_options)
        if self.callbacks:
            sigma = float(extra_options["sigmas"].detach().flatten()[0]) if "sigmas" in extra_options else 1e9
            for callback, kwargs in self.callbacks:
                if kwargs.get("sigma_end", float("-inf")) <= sigma <= kwargs.get("sigma_start", float("inf")):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out

    def to(self, device) -> "AttentionDispatcher":
        # ModelPatcher.model_patches_to moves patches with the model.
        for name in ("previous", "later"):
            if hasattr(getattr(self, name), "to"):
                setattr(self, name, getattr(self, name).to(device))
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
        twin.callbacks = list(self.callbacks)
        return twin

    def __repr__(self) -> str:
        names = [type(p).__name__ for p in self.processors]
        return (f"AttentionDispatcher({self.kind}, {self.key}, processors={names}, previous={self.previous!r}, "
                f"callbacks={len(self.callbacks)})")


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


def other_likeness_processors(transformer_options: dict, own: Callable[[object], bool]) -> set[str]:
    """Names of the Likeness processors on a model call's dispatchers that ``own`` does not claim:
    a patch that reshapes the call's rows (Face Fusion's face rows, Infinite-ID's streams in one
    call) leaves the call as it is where another Likeness patch, designed for whole calls, acts."""
    return {type(p).__name__ for d in dispatchers({"transformer_options": transformer_options})
            for p in d.processors if not own(p)}


def _adopt_later_patches(model_options: dict) -> None:
    """ComfyUI looks a 3-part key up before the 2-part one, so a patch another pack placed on the
    2-part key after Likeness took the 3-part one would never run: the dispatcher runs it."""
    replace = model_options.get("transformer_options", {}).get("patches_replace", {})
    for kind in ATTENTION_KINDS:
        patches = replace.get(kind, {})
        for dispatcher in [p for p in patches.values() if isinstance(p, AttentionDispatcher)]:
            later = patches.get(tuple(dispatcher.key[:2]))
            if later is not None and later is not dispatcher.previous and not isinstance(later, AttentionDispatcher):
                dispatcher.later = later


def _run_scope(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: adopt later patches as the run starts, free per-run state as it ends."""
    guider = executor.class_obj
    _adopt_later_patches(guider.model_options)
    try:
        return executor(*args, **kwargs)
    finally:
        for dispatcher in dispatchers(guider.model_options):
            dispatcher.later = None
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
        clone.add_wrapper_with_key(outer, CLEANUP_WRAPPER_KEY, _run_scope)
    return clone
