"""Infinite-ID inference: identity stream and text stream on one latent.

Each model call runs two streams on the same latent and prompt: the text
stream, exactly what the unpatched model computes (so its prediction is the
original model's), and the identity stream, which reads the text stream's
self-attention K_t/V_t of the same layer:

* self-attention of the identity stream — mixed attention (Eq. 5):
  K̂ = [K_id; K_t], V̂ = [V_id; V_t], K_t/V_t from the text stream's same layer;
* cross-attention of the identity stream — image cross-attention on the
  identity tokens c_id, plus the text cross-attention when merging (Eq. 6);
* AdaIN-mean (Eq. 7–8) aligns K_id/V_id (and K'_id/V'_id) to the text ones.

The identity stream is IP-Adapter FaceID-PlusV2's model: its LoRA (q, k, v,
out of every attention layer, trained with the identity tokens) acts in the
identity stream only (attention/infinite_id/faceid_lora.py); the text stream stays the
original model, as Eq. 5 defines it.

Several identities (A.7) are stacked: the identity stream attends to every
reference's tokens, each reference's keys biased by log(weight) so its share
of the attention follows its weight (equal weights: plain attention over the
concatenated tokens; a weight of 0 removes that person exactly). The other
mode averages the tokens, Σ w_r·c_r / Σw: Fig. 14's linear interpolation.

The result is ε_text + weight·(ε_id − ε_text): weight 1 is the identity
stream's prediction (the paper), 0 the text-only model exactly.

Identities in regions: an identity with a mask M is confined to it. Its
prediction is blended in by M resized to the latent, ε_text + weight·M·(ε_id −
ε_text), and in its stream the image cross-attention is restricted to the
queries inside M on each layer's token grid (M > 0.5 there): a query outside
gives its image tokens exactly zero weight (it attends to one null key of
value 0 instead) and reads the text cross-attention only. Chained nodes add
identities to one patch: one text stream, then one identity stream per person
(each reads only its own tokens), ε_text + Σ_i weight_i·M_i·(ε_id,i − ε_text);
with complementary masks each region is its own person's stream exactly.

The streams share one UNet call where they can (stream_calls.py: rows per
stream, the processors here each handling their own identity's rows), or take
a call each. What the identity stream reads (c_id, several references'
mixing, the "no face" tokens) is built in identity_tokens.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..shared.adain import adain_mean
from ..shared.dispatch import Pass, pass_of
from ..shared.layer_table import BlockKey, layer_key
from ..shared.rows import UNCOND, row_mask
from ..shared.sigmas import SigmaRange
from ..shared.token_masks import mask_to_tokens, region_on_grid
from .faceid_lora import FaceIDLoRA
from .stream_calls import (ACTIVE_IDENTITY, IDENTITY_STREAM, LORA_STATE, STREAM_ROWS, TEXT_STREAM, InfiniteIDWrapper,
                           count_stream_rows_in_estimate, in_own_block, own_rows_output, per_step)

ORDER = 120
WRAPPER_KEY = "likeness_infinite_id"


def mixed_attention(q, k_id, v_id, k_t, v_t, extra_options, attend, *, mixed: bool, align: bool):
    """Eq. 5 (and Eq. 7's first line): attention of the identity queries."""
    if align:
        k_id, v_id = adain_mean(k_id, k_t), adain_mean(v_id, v_t)
    if not mixed:
        return attend(q, k_id, v_id, extra_options)
    return attend(q, torch.cat([k_id, k_t], 1), torch.cat([v_id, v_t], 1), extra_options)


def merged_cross_attention(q, k_img, v_img, k_t, v_t, extra_options, attend, *, merge: bool, align: bool,
                           image_bias: torch.Tensor | None = None, region: torch.Tensor | None = None):
    """Eq. 6 (and Eq. 7's second line): image cross-attention, plus the text's when merging.
    ``image_bias`` (keys,) is added to the image tokens' logits (stacked identities' weights).
    ``region`` (queries,) booleans: only the queries inside attend to the image tokens; those
    outside give them exactly zero weight and read the text cross-attention alone."""
    if align:
        k_img, v_img = adain_mean(k_img, k_t), adain_mean(v_img, v_t)
    if region is None:
        mask = None if image_bias is None else image_bias.to(q).view(1, 1, -1)
        out = attend(q, k_img, v_img, extra_options, mask=mask)
        return out + attend(q, k_t, v_t, extra_options) if merge else out
    k_null, v_null = k_img[:, :1] * 0, v_img[:, :1] * 0  # one key of value 0 (finite: image keys are)
    out = attend(q, torch.cat([k_img, k_null], 1), torch.cat([v_img, v_null], 1), extra_options,
                 mask=region_bias(region, k_img.shape[1], image_bias).to(q))
    text = attend(q, k_t, v_t, extra_options)
    return out + (text if merge else text * (~region).view(1, -1, 1).to(text))


def region_bias(region: torch.Tensor, image_tokens: int, image_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(1, queries, image_tokens + 1) additive bias over [image tokens; null key]: a query inside the
    region sees the image tokens (plus ``image_bias``) and never the null key; one outside sees only
    the null key, whose value is 0, so its image attention is exactly 0 (and never a softmax of all −inf)."""
    inside = region.view(-1, 1)
    image = torch.where(inside, 0.0, float("-inf")).expand(-1, image_tokens)
    if image_bias is not None:
        image = image + image_bias.to(image).view(1, -1)
    null = torch.where(inside, float("-inf"), 0.0)
    return torch.cat([image, null], 1).unsqueeze(0)


@dataclass
class InfiniteID:
    """One patch's settings; shared (never copied) between clones."""

    tokens: torch.Tensor  # (1, T, context) identity tokens c_id (several references: stacked or mixed)
    uncond_tokens: torch.Tensor  # (1, T, context) for the uncond rows (the adapter's "no face" identity)
    kv: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # image W_k, W_v per layer
    token_bias: torch.Tensor | None = None  # (T,) log-weights of stacked references' tokens
    lora: FaceIDLoRA | None = None  # FaceID's LoRA, applied to the identity rows
    weight: float = 1.0
    mixed_attention: bool = True
    cross_attention_merge: bool = True
    adain_mean: bool = False
    sigma_range: SigmaRange = field(default_factory=SigmaRange.always)
    mask: torch.Tensor | None = None  # (H, W) this identity's region, any size; None = everywhere
    _kv_on_device: dict = field(default_factory=dict, repr=False)
    reported: set = field(default_factory=set, repr=False, compare=False)  # stream-call paths logged this run

    def __deepcopy__(self, memo):
        return self

    def kv_for(self, like: torch.Tensor, key: BlockKey) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's image K/V weights on the sampling device and dtype, moved
        once per run (freed by ``release`` when sampling ends)."""
        place = (like.device, like.dtype)
        if place not in self._kv_on_device:
            self._kv_on_device[place] = {k: (w_k.to(like), w_v.to(like)) for k, (w_k, w_v) in self.kv.items()}
        return self._kv_on_device[place][key]

    def release(self) -> None:
        self._kv_on_device.clear()
        self.reported.clear()  # each run logs its stream-call path once
        if self.lora is not None:
            self.lora.release()

    def active(self, extra_options: dict) -> bool:
        return self.weight > 0 and self.sigma_range.active(extra_options)

    def blend(self, x: torch.Tensor) -> float | torch.Tensor | None:
        """weight·M on the latent grid of ``x`` (rows, C, h, w): the plain weight where the mask is
        absent or 1 everywhere, None where it is 0 everywhere (the stream need not run)."""
        if self.mask is None:
            return self.weight
        height, width = x.shape[-2:]
        m = mask_to_tokens(self.mask, x.shape, height * width, device=x.device)[0]
        if not bool((m > 0).any()):
            return None
        if bool((m == 1).all()):
            return self.weight
        return (self.weight * m).view(1, 1, height, width).to(x.dtype)

    def region(self, extra_options: dict, queries: int, device) -> torch.Tensor | None:
        """(queries,) booleans, this identity's region on the layer's token grid; None: everywhere."""
        return region_on_grid(self.mask, extra_options, queries, device)


def _runs_for(settings: InfiniteID, extra_options: dict) -> bool:
    return extra_options.get(ACTIVE_IDENTITY) is settings


def _lora_inputs(settings: InfiniteID, kind: str, key: BlockKey, extra_options: dict):
    """The (x, context, value) this layer's projections saw in the identity stream, when a LoRA applies here."""
    if settings.lora is None or not settings.lora.covers(kind, key):
        return None
    return extra_options.get(LORA_STATE, {}).get(kind)


def _with_lora(settings: InfiniteID, kind: str, key: BlockKey, inputs, q, k, v):
    """q, k, v with s·U·D·x added to each projection."""
    if inputs is None:
        return q, k, v
    out = []
    for name, projected, source in zip(("q", "k", "v"), (q, k, v), inputs):
        delta = settings.lora.delta(kind, key, name, source)
        out.append(projected if delta is None else projected + delta)
    return tuple(out)


def _keep_for_output(extra_options: dict, kind: str, inputs, hidden: torch.Tensor) -> None:
    if inputs is not None:
        extra_options[LORA_STATE][f"{kind}_out"] = hidden


class _StreamProcessor:
    """A dispatcher processor of one identity: its stream's rows in a call holding both streams (the
    rest passed on), or the whole call when the streams run apart."""

    order = ORDER
    passes = frozenset({Pass.IMAGE, Pass.IDENTITY_STREAM})
    reads_text_kv = False  # whether the identity rows read the text rows' K/V of the same layer

    def __init__(self, settings: InfiniteID) -> None:
        self.settings = settings

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options, attend):
        if STREAM_ROWS in extra_options:
            return in_own_block(self.settings, q, k, v, extra_options, attend, self._stream,
                                text_kv=self.reads_text_kv)
        return self._stream(q, k, v, extra_options, attend)

    def _stream(self, q, k, v, extra_options, attend):
        raise NotImplementedError


class MixedAttentionProcessor(_StreamProcessor):
    """attn1: keeps K_t/V_t in the text stream; mixed attention (Eq. 5) in the identity stream."""

    reads_text_kv = True

    def _stream(self, q, k, v, extra_options, attend):
        key = layer_key(extra_options)
        text_kv = extra_options.get(TEXT_STREAM)
        if text_kv is not None:
            text_kv[key] = (k, v)
        identity_of = extra_options.get(IDENTITY_STREAM)
        if identity_of is None or not _runs_for(self.settings, extra_options):
            return attend(q, k, v, extra_options)
        s = self.settings
        k_t, v_t = identity_of.get(key, (None, None))
        if k_t is None and (s.mixed_attention or s.adain_mean):  # no text stream ran this layer
            return attend(q, k, v, extra_options)
        inputs = _lora_inputs(s, "attn1", key, extra_options)
        q, k, v = _with_lora(s, "attn1", key, inputs, q, k, v)
        out = mixed_attention(q, k, v, k_t, v_t, extra_options, attend, mixed=s.mixed_attention, align=s.adain_mean)
        _keep_for_output(extra_options, "attn1", inputs, out)
        return out


class CrossAttentionMergeProcessor(_StreamProcessor):
    """attn2: image cross-attention (+ the text's, Eq. 6) in the identity stream; the text stream as it is."""

    def cleanup(self) -> None:
        self.settings.release()

    def _stream(self, q, k, v, extra_options, attend):
        key = layer_key(extra_options)
        s = self.settings
        if IDENTITY_STREAM not in extra_options or key not in s.kv or not _runs_for(s, extra_options):
            return attend(q, k, v, extra_options)
        uncond = row_mask(UNCOND, extra_options["cond_or_uncond"], q.shape[0], device=q.device)
        tokens = torch.where(uncond.view(-1, 1, 1), s.uncond_tokens.to(q), s.tokens.to(q))
        w_k, w_v = s.kv_for(q, key)
        k_img, v_img = F.linear(tokens, w_k), F.linear(tokens, w_v)
        inputs = _lora_inputs(s, "attn2", key, extra_options)
        q, k, v = _with_lora(s, "attn2", key, inputs, q, k, v)
        out = merged_cross_attention(q, k_img, v_img, k, v, extra_options, attend, merge=s.cross_attention_merge,
                                     align=s.adain_mean, image_bias=s.token_bias,
                                     region=s.region(extra_options, q.shape[1], q.device))
        _keep_for_output(extra_options, "attn2", inputs, out)
        return out


class LoRAInputs:
    """attn1_patch / attn2_patch: keeps what the identity stream's projections will see, for the LoRA."""

    sees_final_inputs = True  # Likeness patches that change the inputs go before it (dispatch.add_input_patch)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        # (a call holding every stream: the whole call's, each identity takes its rows)
        if pass_of(extra_options) is Pass.IDENTITY_STREAM or STREAM_ROWS in extra_options:
            extra_options.setdefault(LORA_STATE, {})[self.kind] = (n, context, value)
        return n, context, value


class LoRAOutput:
    """attn1_output_patch / attn2_output_patch: the LoRA of to_out in the identity stream."""

    def __init__(self, settings: InfiniteID, kind: str) -> None:
        self.settings, self.kind = settings, kind

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, extra_options):
        if STREAM_ROWS in extra_options:
            found = own_rows_output(self.settings, self.kind, extra_options)
            if found is None:
                return n
            rows, hidden = found
            delta = self.settings.lora.delta(self.kind, layer_key(extra_options), "out", hidden)
            return n if delta is None else torch.cat([n[:rows.start], n[rows] + delta, n[rows.stop:]])
        if pass_of(extra_options) is not Pass.IDENTITY_STREAM or not _runs_for(self.settings, extra_options):
            return n
        hidden = extra_options.get(LORA_STATE, {}).pop(f"{self.kind}_out", None)
        if hidden is None:
            return n
        delta = self.settings.lora.delta(self.kind, layer_key(extra_options), "out", hidden)
        return n if delta is None else n + delta


def apply_infinite_id(model, settings: InfiniteID, layers: list[BlockKey]):
    """A clone of ``model`` running Infinite-ID's streams; on a model that already runs Infinite-ID,
    the identity is added (one text stream, one identity stream per identity)."""
    import comfy.patcher_extension

    from ..shared.dispatch import patched_clone

    wrapper_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    existing = model.get_wrappers(wrapper_type, WRAPPER_KEY)
    identities = [*existing[0].identities, settings] if existing else [settings]
    mixed, merge = MixedAttentionProcessor(settings), CrossAttentionMergeProcessor(settings)
    placements = [("attn1", key, mixed) for key in layers] + [("attn2", key, merge) for key in layers]
    patched = patched_clone(model, placements)
    if settings.lora is not None:
        patches = patched.model_options["transformer_options"].get("patches", {})
        for kind in ("attn1", "attn2"):
            if not any(isinstance(p, LoRAInputs) and p.kind == kind for p in patches.get(f"{kind}_patch", [])):
                getattr(patched, f"set_model_{kind}_patch")(LoRAInputs(kind))
        patched.set_model_attn1_output_patch(LoRAOutput(settings, "attn1"))
        patched.set_model_attn2_output_patch(LoRAOutput(settings, "attn2"))
    # Each wrapper holds the identities it serves: a chained identity replaces them all.
    wrapper, kinds = InfiniteIDWrapper(identities), comfy.patcher_extension.WrappersMP
    for kind, each in ((kinds.CALC_COND_BATCH, per_step(wrapper)),
                       (kinds.PREPARE_SAMPLING, count_stream_rows_in_estimate(wrapper)), (wrapper_type, wrapper)):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, each)
    return patched
