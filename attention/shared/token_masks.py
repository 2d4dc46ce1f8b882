"""Masks resized to the token grid of an attention layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_grid(original_shape: list[int] | tuple[int, ...], tokens: int) -> tuple[int, int]:
    """(height, width) of the layer whose sequence has ``tokens`` tokens.

    The UNet halves the latent with stride-2 convolutions (odd sizes round
    up), so the grid is found by halving the latent size until it matches
    rather than by a square root, which fails for odd aspect ratios.
    """
    height, width = int(original_shape[-2]), int(original_shape[-1])
    grid_h, grid_w = height, width
    while grid_h * grid_w > tokens and (grid_h > 1 or grid_w > 1):
        grid_h, grid_w = (grid_h + 1) // 2, (grid_w + 1) // 2
    if grid_h * grid_w != tokens:
        raise ValueError(f"{tokens} tokens do not match any downsampling of a {height}x{width} latent")
    return grid_h, grid_w


def mask_to_tokens(mask: torch.Tensor, original_shape, tokens: int, *, device=None, dtype=None) -> torch.Tensor:
    """Resize a ComfyUI MASK ((H, W) or (B, H, W), any size) to (B, tokens).

    The mask is stretched onto the latent's aspect first (as the image it was
    drawn on was), then area-averaged down to the layer's grid.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (H, W) or (B, H, W)")
    grid_h, grid_w = token_grid(original_shape, tokens)
    resized = mask.unsqueeze(1).float()
    # Each axis on its own: area averaging down (it keeps a hard edge hard where the grid divides
    # the mask), bilinear only where a small mask is stretched up; a mask can be taller than the
    # grid but narrower.
    for axis, size in ((-2, grid_h), (-1, grid_w)):
        shape = list(resized.shape[-2:])
        growing, shape[axis] = resized.shape[axis] < size, size
        resized = F.interpolate(resized, size=tuple(shape), mode="bilinear" if growing else "area",
                                **({"align_corners": False} if growing else {}))
    resized = resized.reshape(mask.shape[0], grid_h * grid_w)
    return resized.to(device=device or mask.device, dtype=dtype or torch.float32)



def region_on_grid(mask: torch.Tensor | None, extra_options: dict, queries: int, device=None) -> torch.Tensor | None:
    """(queries,) booleans: where a (1, H, W) region mask is above 0.5 on this attention layer's
    token grid (odd sizes round up at each stride-2 step, down to 1x1); None: everywhere."""
    if mask is None:
        return None
    grid = extra_options.get("activations_shape", extra_options["original_shape"])
    inside = mask_to_tokens(mask, grid, queries, device=device)[0] > 0.5
    return None if bool(inside.all()) else inside

OVERLAY_COLOUR = (1.0, 0.15, 0.1)  # red: where the edit mask says to edit


def mask_overlay(mask: torch.Tensor, image: torch.Tensor | None = None, opacity: float = 0.5) -> torch.Tensor:
    """The mask (B, H, W) over the image (B, H, W, 3; resized to the mask), tinted where it is 1;
    without an image, the mask alone in grey and red."""
    mask = mask.float().clamp(0, 1)
    if image is None:
        base = torch.full((*mask.shape, 3), 0.5)
    else:
        base = image[..., :3].float()
        if base.shape[1:3] != mask.shape[1:]:
            base = F.interpolate(base.movedim(-1, 1), size=mask.shape[1:], mode="bilinear",
                                 align_corners=False).movedim(1, -1)
        base = base.expand(mask.shape[0], -1, -1, -1) if base.shape[0] == 1 else base
    tint = torch.tensor(OVERLAY_COLOUR).view(1, 1, 1, 3)
    alpha = (mask * opacity).unsqueeze(-1)
    return (base * (1 - alpha) + tint * alpha).clamp(0, 1)
