"""Small faces (MagicStyle with MagicID's DIIR): a square region around a face, its crop at the
model's native size, and the restored crop blended back under a feathered mask.

A face that fills a small part of the photo gets few latent pixels, so the
model cannot keep its features; restoring the face region at the model's
native size gives it the full resolution, and only that region is put back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ComfyUI's VAEEncode crops an image to a multiple of its downscale ratio,
# centred (comfy.sd.VAE.vae_encode_crop_pixels): the ratios of the VAEs it ships.
VAE_RATIOS = (8, 16, 32, 64)


@dataclass(frozen=True)
class FaceRegion:
    """Where a crop came from: a square ``box`` (x0, y0, x1, y1 in whole pixels, x1/y1 exclusive)
    in an image of ``source`` (height, width), resized to ``size`` × ``size``; the mask's soft edge
    is ``feather`` pixels of that image wide."""

    box: tuple[int, int, int, int]
    source: tuple[int, int]
    size: int
    feather: float

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def scale(self) -> float:
        """Crop pixels per image pixel (above 1: the face is enlarged)."""
        return self.size / self.side


def _round(value: float) -> int:
    return math.floor(value + 0.5)  # halves up, unlike round()'s banker's rounding


def square_box(bbox, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The face box ``bbox`` (x1, y1, x2, y2) grown into a square whose side is its longer side
    × (1 + ``margin``), centred on it, in whole pixels of a ``height`` × ``width`` image.

    At a border the square is shifted inside rather than clipped, so the crop stays square and
    holds no padding the model would have to restore; a square larger than the image's shorter
    side becomes that side (the largest that fits), placed as near the face's centre as it can.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"face box {(x1, y1, x2, y2)}: expected x2 > x1 and y2 > y1")
    side = min(max(_round(max(x2 - x1, y2 - y1) * (1.0 + margin)), 1), height, width)
    x0 = min(max(_round((x1 + x2) / 2 - side / 2), 0), width - side)
    y0 = min(max(_round((y1 + y2) / 2 - side / 2), 0), height - side)
    return x0, y0, x0 + side, y0 + side


def feathered_mask(height: int, width: int, box: tuple[int, int, int, int], feather: float,
                   device=None) -> torch.Tensor:
    """(H, W) float32: 0 outside ``box``; inside, a linear ramp over ``feather`` pixels from each
    edge up to 1. A pixel whose centre is d pixels inside the nearest edge gets min(d / feather, 1),
    so the edge pixels get 0.5 / feather. The feather is capped at (shorter side − 1) / 2 so the
    centre pixel is always 1; 0 gives a hard box."""
    x0, y0, x1, y1 = box
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    inside = torch.minimum(torch.minimum(xs - x0, x1 - xs)[None, :], torch.minimum(ys - y0, y1 - ys)[:, None])
    feather = min(float(feather), (min(x1 - x0, y1 - y0) - 1) / 2)
    if feather <= 0:
        return (inside > 0).float()
    return (inside / feather).clamp(0.0, 1.0)


def resample(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W, C) images resized to ``height`` × ``width``, float32 in 0..1.

    Bicubic in float (ComfyUI's lanczos goes through 8-bit PIL images, which would quantise the
    crop twice), antialiased so that shrinking the restored crop back into a small box filters
    instead of aliasing (PyTorch's antialias widens the cubic kernel by the shrink factor; when
    enlarging it is plain bicubic). Both reproduce a linear ramp exactly away from the edges, which
    is what makes the round trip close to the identity. Cubic overshoot is clamped to 0..1.
    """
    pixels = images.movedim(-1, 1).float()
    resized = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0).movedim(1, -1)


def crop_region(image: torch.Tensor, region: FaceRegion) -> torch.Tensor:
    """(H, W, C) image → (size, size, C) crop of the region's box."""
    x0, y0, x1, y1 = region.box
    return resample(image[None, y0:y1, x0:x1], region.size, region.size)[0]


def fit_region(region: FaceRegion, height: int, width: int) -> tuple[tuple[int, int, int, int], float]:
    """The region's box and feather in an image of ``height`` × ``width`` (the box may then reach
    past the image's border; the paste-back drops that part).

    The same size: as is. The size ComfyUI's VAEEncode crops the source to (a multiple of 8, 16, 32
    or 64, centred): the box shifted by that crop's offset. The same aspect within a pixel (the image
    scaled): the box scaled. Anything else is refused, naming both sizes.
    """
    source_h, source_w = region.source
    x0, y0, x1, y1 = region.box
    if (height, width) == (source_h, source_w):
        return region.box, region.feather
    for ratio in VAE_RATIOS:
        if (height, width) == (source_h - source_h % ratio, source_w - source_w % ratio):
            dy, dx = (source_h % ratio) // 2, (source_w % ratio) // 2
            return (x0 - dx, y0 - dy, x1 - dx, y1 - dy), region.feather
    sy, sx = height / source_h, width / source_w
    if abs(sy - sx) * max(source_h, source_w) <= 1.0:
        box = (_round(x0 * sx), _round(y0 * sy), _round(x1 * sx), _round(y1 * sy))
        if box[2] > box[0] and box[3] > box[1]:
            return box, region.feather * (sx + sy) / 2
    raise ValueError(
        f"image is {width}×{height} px but the region was cut from a {source_w}×{source_h} image; expected "
        f"that size, that size scaled (same aspect ratio), or VAEEncode's crop of it to a multiple of 8. "
        f"Paste back into the image the face region was taken from (or its stylised twin).")


def paste_back(image: torch.Tensor, crop: torch.Tensor, region: FaceRegion) -> torch.Tensor:
    """(H, W, C) image with the (S, S, C) ``crop`` resized onto the region's box and blended under
    its feathered mask. Only pixels where the mask is above 0 are written: every other pixel is
    the input's, bit for bit."""
    height, width = image.shape[0], image.shape[1]
    (x0, y0, x1, y1), feather = fit_region(region, height, width)
    restored = resample(crop[None], y1 - y0, x1 - x0)[0].to(image.device)
    # The part of the box inside the image (a fitted box may reach past it).
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    out = image.clone()
    if cx1 <= cx0 or cy1 <= cy0:
        return out
    mask = feathered_mask(height, width, (x0, y0, x1, y1), feather, device=image.device)[cy0:cy1, cx0:cx1, None]
    before = image[cy0:cy1, cx0:cx1]
    after = restored[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].to(image.dtype)
    blended = before + (after - before) * mask.to(image.dtype)
    out[cy0:cy1, cx0:cx1] = torch.where(mask > 0, blended, before)
    return out


def crop_regions(images: torch.Tensor, regions: list[FaceRegion]) -> tuple[torch.Tensor, torch.Tensor]:
    """One region per image of (B, H, W, C) ``images`` → (B, S, S, C) crops and (B, H, W) masks."""
    crops = torch.stack([crop_region(image, region) for image, region in zip(images, regions, strict=True)])
    masks = torch.stack([feathered_mask(image.shape[0], image.shape[1], region.box, region.feather,
                                        device=image.device) for image, region in zip(images, regions, strict=True)])
    return crops, masks


def paste_back_batch(images: torch.Tensor, crops: torch.Tensor, regions: list[FaceRegion]) -> torch.Tensor:
    """``paste_back`` image by image. Images, crops and regions come one per image of the batch, or
    one for all of it (broadcast); the result has the largest of the three counts."""
    counts = {"image": len(images), "restored": len(crops), "region": len(regions)}
    batch = max(counts.values())
    wrong = {name: count for name, count in counts.items() if count not in (1, batch)}
    if wrong:
        raise ValueError(f"batch sizes image={counts['image']}, restored={counts['restored']}, "
                         f"region={counts['region']}: expected each to be 1 or {batch} (one per image, or one "
                         "for the whole batch)")
    if crops.shape[-1] != images.shape[-1]:
        raise ValueError(f"restored has {crops.shape[-1]} channels and image {images.shape[-1]}: expected the same")
    return torch.stack([paste_back(images[i % len(images)], crops[i % len(crops)], regions[i % len(regions)])
                        for i in range(batch)])
