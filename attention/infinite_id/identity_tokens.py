"""What Infinite-ID's identity stream reads: the identity tokens c_id of one or several reference
images (stacked, A.7, or averaged, Fig. 14), their mixing weights, and the "no face" tokens of the
uncond rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIXING = ("stack", "mean")


def _check_weights(tokens: list[torch.Tensor], weights: list[float]) -> None:
    if len(tokens) != len(weights) or not tokens:
        raise ValueError(f"{len(tokens)} identities and {len(weights)} mixing weights: give one weight each")
    if sum(weights) <= 0 or min(weights) < 0:
        raise ValueError(f"mixing weights {weights}: none may be negative and at least one must be above 0")


def mix_identities(tokens: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Identity mixing by averaging: a weighted mean of several people's tokens (the "mean" option)."""
    _check_weights(tokens, weights)
    total = sum(weights)
    return sum(t * (w / total) for t, w in zip(tokens, weights))


def stack_identities(tokens: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Identity mixing as A.7 does it: the references' tokens side by side, (1, R·T, C), and the
    additive attention bias log(w_r / Σw) on reference r's keys, (R·T,), or None when the weights
    are equal (the bias would cancel in the softmax). A reference of weight 0 is left out, which is
    what its bias of −inf would do, exactly."""
    _check_weights(tokens, weights)
    kept = [(t.reshape(1, -1, t.shape[-1]), w) for t, w in zip(tokens, weights) if w > 0]
    stacked = torch.cat([t for t, _ in kept], dim=1)
    if len({w for _, w in kept}) == 1:
        return stacked, None
    total = sum(w for _, w in kept)
    return stacked, torch.cat([torch.full((t.shape[1],), math.log(w / total)) for t, w in kept])



@dataclass(frozen=True)
class IdentityTokens:
    """What the identity stream reads: c_id, the stacked references' bias, and the "no face" tokens."""

    tokens: torch.Tensor  # (1, T, context)
    bias: torch.Tensor | None  # (T,) or None
    uncond: torch.Tensor  # (1, T, context), as many tokens as ``tokens``


def identity_tokens(adapter, face_embeds: torch.Tensor, clip_hidden: torch.Tensor, no_face_clip_hidden: torch.Tensor,
                    mix_weights: list[float], scale: float = 1.0, mixing: str = "stack") -> IdentityTokens:
    """c_id of the references (stacked or averaged, A.7) and, for the uncond rows, the adapter's
    projection of "no face": a zero ArcFace embedding and CLIP of a zero (normalised) image, as
    IP-Adapter FaceID's get_image_embeds computes it."""
    if mixing not in MIXING:
        raise ValueError(f"mixing={mixing!r}: expected one of {', '.join(MIXING)}")
    with torch.no_grad():
        each = adapter.image_tokens(face_embeds.float(), clip_hidden.float(), scale)
        empty = adapter.image_tokens(torch.zeros_like(face_embeds[:1]).float(), no_face_clip_hidden.float(), scale)
    references = list(each.split(1))
    if mixing == "mean":
        return IdentityTokens(mix_identities(references, mix_weights), None, empty)
    tokens, bias = stack_identities(references, mix_weights)
    # As many "no face" copies as tokens, under the same bias: attending over them is attending over one.
    return IdentityTokens(tokens, bias, empty.repeat(1, tokens.shape[1] // empty.shape[1], 1))


def no_face_clip_hidden(clip_vision) -> torch.Tensor:
    """CLIP's penultimate hidden states of an all-zero *normalised* image (the mean colour), the
    "no image" input of IP-Adapter FaceID. ComfyUI's encode_image would normalise (and round) a
    pixel image first, so the model is called on zeros directly."""
    import comfy.model_management

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    zeros = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    with torch.no_grad():
        out = clip_vision.model(pixel_values=zeros, intermediate_output=-2)
    return out[1].to(comfy.model_management.intermediate_device())


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
