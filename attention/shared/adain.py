"""AdaIN (MagicStyle Eq. 4) and AdaIN-mean (Infinite-ID Eq. 8)."""

from __future__ import annotations

import torch

from .token_masks import mask_to_tokens

EPS = 1e-5


def adain(content: torch.Tensor, style: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Give ``content`` the mean and std of ``style`` over ``dims``.

    Statistics are taken in float32 (fp16/bf16 variances over thousands of
    tokens lose most of their digits) and the result is cast back.
    """
    content32, style32 = content.float(), style.float()
    # Population std: a 1×1 layer (SD's middle block at small sizes) has one
    # token, where the sample std is undefined; AdaIN then gives μ_s.
    c_std, c_mean = torch.std_mean(content32, dims, correction=0, keepdim=True)
    s_std, s_mean = torch.std_mean(style32, dims, correction=0, keepdim=True)
    return ((content32 - c_mean) / (c_std + EPS) * s_std + s_mean).to(content.dtype)


def adain_latent(content: torch.Tensor, style: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per image and channel over H×W, for (B, C, H, W) latents.

    A single style image is applied to every content image. With a ``mask`` (a ComfyUI MASK, one
    or one per content image, any size; stretched onto the latent as masks.mask_to_tokens does for
    Infinite-ID's latent blend) the result is AdaIN where the mask is 1, the content's own values
    where it is 0 (bit for bit) and the blend m·AdaIN + (1 − m)·content in between. The statistics
    are the whole latent's, as Eq. 4 takes them.
    """
    if style.shape[0] not in (1, content.shape[0]):
        raise ValueError(f"style batch {style.shape[0]} must be 1 or match the content batch {content.shape[0]}")
    if style.shape[1] != content.shape[1]:
        raise ValueError(f"style has {style.shape[1]} latent channels, content {content.shape[1]}: "
                         "both must come from the same VAE")
    out = adain(content, style.expand(content.shape[0], *style.shape[1:]), dims=(-2, -1))
    if mask is None:
        return out
    height, width = content.shape[-2:]
    m = mask_to_tokens(mask, content.shape, height * width, device=content.device)
    if m.shape[0] not in (1, content.shape[0]):
        raise ValueError(f"{m.shape[0]} masks for {content.shape[0]} content latents: give one mask, or one per latent")
    m = m.view(-1, 1, height, width)
    # lerp is exact at both ends (weight 1 gives AdaIN itself); where the mask is 0 the content is kept as is.
    blended = torch.lerp(content.float(), out.float(), m).to(content.dtype)
    return torch.where(m > 0, blended, content)


def adain_tokens(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per channel over tokens, for (B, N, C) features (MagicStyle's V)."""
    return adain(content, style, dims=(-2,))


def adain_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x − μ(x) + μ(y), μ over tokens per channel (Infinite-ID Eq. 8)."""
    x32 = x.float()
    return (x32 - x32.mean(-2, keepdim=True) + y.float().mean(-2, keepdim=True)).to(x.dtype)
