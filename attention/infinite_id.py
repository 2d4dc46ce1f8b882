"""Infinite-ID inference: identity stream and text stream on one latent.

Each model call runs both streams as extra batch rows: the rows ComfyUI
built are the identity stream, and a copy of them (same latent, same
prompt, listed again in ``cond_or_uncond`` so row helpers keep working) is
the text stream, the plain model.

* self-attention of the identity rows — mixed attention (Eq. 5):
  K̂ = [K_id; K_t], V̂ = [V_id; V_t], K_t/V_t from the text rows of the same layer;
* cross-attention of the identity rows — image cross-attention on the
  identity tokens c_id, plus the text cross-attention when merging (Eq. 6);
* AdaIN-mean (Eq. 7–8) aligns K_id/V_id (and K'_id/V'_id) to the text ones.

The result is ε_text + weight·(ε_id − ε_text): weight 1 is the identity
stream's prediction (the paper), 0 the text-only model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adain import adain_mean
from .rows import UNCOND, row_mask
from .schedule import SigmaRange, current_sigma
from .unet_layers import BlockKey

STREAM_ROWS = "likeness_infinite_id_rows"  # how many leading rows are the identity stream
ORDER = 120
WRAPPER_KEY = "likeness_infinite_id"


def mix_identities(tokens: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Identity mixing (A.7): a weighted mean of several people's identity tokens."""
    if len(tokens) != len(weights) or not tokens:
        raise ValueError(f"{len(tokens)} identities and {len(weights)} mixing weights: give one weight each")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixing weights {weights}: at least one must be above 0")
    return sum(t * (w / total) for t, w in zip(tokens, weights))


def mixed_attention(q, k_id, v_id, k_t, v_t, extra_options, attend, *, mixed: bool, align: bool):
    """Eq. 5 (and Eq. 7's first line): attention of the identity queries."""
    if align:
        k_id, v_id = adain_mean(k_id, k_t), adain_mean(v_id, v_t)
    if not mixed:
        return attend(q, k_id, v_id, extra_options)
    return attend(q, torch.cat([k_id, k_t], 1), torch.cat([v_id, v_t], 1), extra_options)


def merged_cross_attention(q, k_img, v_img, k_t, v_t, extra_options, attend, *, merge: bool, align: bool):
    """Eq. 6 (and Eq. 7's second line): image cross-attention, plus the text's when merging."""
    if align:
        k_img, v_img = adain_mean(k_img, k_t), adain_mean(v_img, v_t)
    out = attend(q, k_img, v_img, extra_options)
    return out + attend(q, k_t, v_t, extra_options) if merge else out


@dataclass
class InfiniteID:
    """One patch's settings; shared (never copied) between clones."""

    tokens: torch.Tensor  # (1, T, context) identity tokens c_id, mixed already
    uncond_tokens: torch.Tensor  # (1, T, context) for the uncond rows (the adapter's empty identity)
    kv: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # image W_k, W_v per layer
    weight: float = 1.0
    mixed_attention: bool = True
    cross_attention_merge: bool = True
    adain_mean: bool = False
    sigma_range: SigmaRange = field(default_factory=SigmaRange.always)
    _kv_on_device: dict = field(default_factory=dict, repr=False)

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

    def active(self, extra_options: dict) -> bool:
        return self.weight > 0 and self.sigma_range.active(extra_options)


def _key(extra_options: dict) -> BlockKey | None:
    block = extra_options.get("block")
    return None if block is None else (block[0], block[1], extra_options.get("block_index", 0))


def _twice(value):
    """The same rows again for the text stream (tensors, lists of tensors, dicts of them)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, list):
        return [_twice(v) for v in value]
    if isinstance(value, dict):
        return {k: _twice(v) for k, v in value.items()}
    return value


class InfiniteIDWrapper:
    """DIFFUSION_MODEL wrapper: both streams in one call, then the weighted prediction."""

    def __init__(self, settings: InfiniteID) -> None:
        self.settings = settings

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if not self.settings.active(transformer_options) or current_sigma(transformer_options) is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        rows = x.shape[0]
        options = {**transformer_options, STREAM_ROWS: rows,
                   "cond_or_uncond": list(transformer_options["cond_or_uncond"]) * 2}
        out = executor(_twice(x), _twice(timesteps), _twice(context), _twice(y), _twice(control), options,
                       **{k: _twice(v) for k, v in kwargs.items()})
        identity, text = out[:rows], out[rows:]
        return text + self.settings.weight * (identity - text)


class MixedAttentionProcessor:
    """attn1: mixed attention for the identity rows, plain for the text rows."""

    order = ORDER

    def __init__(self, settings: InfiniteID) -> None:
        self.settings = settings

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options, attend):
        rows = extra_options.get(STREAM_ROWS)
        if rows is None:
            return attend(q, k, v, extra_options)
        s = self.settings
        identity = mixed_attention(q[:rows], k[:rows], v[:rows], k[rows:], v[rows:], extra_options, attend,
                                   mixed=s.mixed_attention, align=s.adain_mean)
        return torch.cat([identity, attend(q[rows:], k[rows:], v[rows:], extra_options)])


class CrossAttentionMergeProcessor:
    """attn2: image cross-attention (+ the text's) for the identity rows, plain for the text rows."""

    order = ORDER

    def __init__(self, settings: InfiniteID) -> None:
        self.settings = settings

    def __deepcopy__(self, memo):
        return self

    def cleanup(self) -> None:
        self.settings.release()

    def __call__(self, q, k, v, extra_options, attend):
        rows = extra_options.get(STREAM_ROWS)
        key = _key(extra_options)
        s = self.settings
        if rows is None or key not in s.kv:
            return attend(q, k, v, extra_options)
        uncond = row_mask(UNCOND, extra_options["cond_or_uncond"][:len(extra_options["cond_or_uncond"]) // 2],
                          rows, device=q.device)
        tokens = torch.where(uncond.view(-1, 1, 1), s.uncond_tokens.to(q), s.tokens.to(q))
        w_k, w_v = s.kv_for(q, key)
        k_img, v_img = F.linear(tokens, w_k), F.linear(tokens, w_v)
        identity = merged_cross_attention(q[:rows], k_img, v_img, k[:rows], v[:rows], extra_options, attend,
                                          merge=s.cross_attention_merge, align=s.adain_mean)
        return torch.cat([identity, attend(q[rows:], k[rows:], v[rows:], extra_options)])


def apply_infinite_id(model, settings: InfiniteID, layers: list[BlockKey]):
    """A clone of ``model`` running Infinite-ID's two streams."""
    import comfy.patcher_extension

    from .dispatch import patched_clone

    mixed, merge = MixedAttentionProcessor(settings), CrossAttentionMergeProcessor(settings)
    placements = [("attn1", key, mixed) for key in layers] + [("attn2", key, merge) for key in layers]
    patched = patched_clone(model, placements)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 InfiniteIDWrapper(settings))
    return patched


def identity_tokens(adapter, face_embeds: torch.Tensor, clip_hidden: torch.Tensor, empty_clip_hidden: torch.Tensor,
                    mix_weights: list[float], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """c_id for the cond rows (several references mixed, A.7) and for the uncond
    rows (the adapter's projection of no face: zero ArcFace, CLIP of a blank image)."""
    with torch.no_grad():
        each = adapter.image_tokens(face_embeds.float(), clip_hidden.float(), scale)
        empty = adapter.image_tokens(torch.zeros_like(face_embeds[:1]).float(), empty_clip_hidden.float(), scale)
    return mix_identities(list(each.split(1)), mix_weights), empty


def parse_mix_weights(text: str, references: int) -> list[float]:
    """"0.7, 0.3" → [0.7, 0.3]; empty → equal weights."""
    if not text.strip():
        return [1.0] * references
    try:
        weights = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"mix_weights={text!r}: expected numbers separated by commas, "
                         "one per reference image") from None
    if len(weights) != references:
        raise ValueError(f"mix_weights={text!r} gives {len(weights)} weights for {references} reference image(s): "
                         "give one per image, or leave it empty for equal weights")
    return weights
