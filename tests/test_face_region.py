"""Small faces: Likeness Face Region Crop and Likeness Paste Back on the real host.

The faces come from a tiny insightface pack (tests/tiny/tiny_insightface.py) that reports faces at
known places, loaded by insightface itself through Likeness Face Analysis; the face size in the
crop is measured on the shipped example photo with dlib, an independent detector (test-only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.paths import REPO
from test_face_analysis import dlib_models
from tiny import tiny_insightface as tiny

W = 512
# The astronaut's face (100×116 px at 172,62 in the 512×512 photo), one near the top-right corner
# (0.8×) and a small one (0.5×): largest first, so indexes 0, 1, 2.
CORNER_FACE = tiny.TinyFace().scaled(0.8, (0.9, 0.1))
SMALL_FACE = tiny.TinyFace().scaled(0.5, (0.25, 0.78))
FACES = (tiny.TinyFace(), CORNER_FACE, SMALL_FACE)


@pytest.fixture(scope="module")
def analysis(comfy, tmp_path_factory):
    """The pack in a registered insightface folder (as extra_model_paths.yaml adds one), so the
    models folder's packs that other tests write are left alone."""
    import folder_paths

    root = tmp_path_factory.mktemp("insightface")
    tiny.write_pack(root, "buffalo_l", FACES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(root)], set()))
        yield comfy.run_node("LikenessFaceAnalysis", model_name="buffalo_l", provider="CPU")[0]


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(data.astronaut()).float().div(255)[None]


def region_crop(comfy, analysis, image, index=0, margin=1.0, size=512, feather=16):
    return comfy.run_node("LikenessFaceRegionCrop", analysis=analysis, image=image, index=index, margin=margin,
                          size=size, feather=feather)


def paste_back(comfy, image, restored, region):
    return comfy.run_node("LikenessPasteBack", image=image, restored=restored, region=region)[0]


def ramp(height: int, width: int) -> torch.Tensor:
    """(1, H, W, 3) linear in x and y: bicubic resampling reproduces it exactly (away from edges)."""
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                            indexing="ij")
    return torch.stack([0.1 + 0.6 * xs, 0.2 + 0.5 * ys, 0.3 + 0.2 * xs + 0.3 * ys], -1)[None]


def blurred(image: torch.Tensor, sigma: float) -> torch.Tensor:
    from skimage import filters

    return torch.from_numpy(filters.gaussian(image[0].numpy(), sigma=sigma, channel_axis=-1)).float()[None]


def face_box(face: tiny.TinyFace, height: int, width: int) -> tuple[float, ...]:
    """Where the tiny detector reports ``face`` in a height×width image: SCRFD letterboxes the image
    into its square input, top-left, so both axes scale by the longer side."""
    longer = max(height, width)
    return tuple(v * longer for v in face.box)


def expected_box(face_xyxy, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The square worked out independently: side = longer side × (1 + margin), rounded half up,
    at most the shorter image side; centred on the face, then shifted inside the image."""
    x1, y1, x2, y2 = face_xyxy
    side = min(math.floor(max(x2 - x1, y2 - y1) * (1 + margin) + 0.5), height, width)
    x0 = min(max(math.floor((x1 + x2) / 2 - side / 2 + 0.5), 0), width - side)
    y0 = min(max(math.floor((y1 + y2) / 2 - side / 2 + 0.5), 0), height - side)
    return x0, y0, x0 + side, y0 + side


def outside(mask: torch.Tensor) -> torch.Tensor:
    return (mask == 0)[..., None].expand(*mask.shape, 3)


def test_box_scale_and_mask_worked_out_by_hand(comfy, analysis, astronaut):
    # Face box 172,62 → 272,178 (100×116), centre (222, 120); margin 0.5: side round(116 × 1.5) = 174,
    # x0 = 222 − 87 = 135, y0 = 120 − 87 = 33; scale 512 / 174.
    crop, (region,), mask = region_crop(comfy, analysis, astronaut, margin=0.5, feather=8)
    assert region.box == (135, 33, 309, 207) and region.source == (512, 512) and region.size == 512
    assert region.scale == pytest.approx(512 / 174)
    assert crop.shape == (1, 512, 512, 3) and crop.dtype == torch.float32 and mask.shape == (1, 512, 512)
    # Feather 8: the edge pixel's centre is 0.5 px inside → 0.5/8; 3.5 px inside → 3.5/8; 8 px and more → 1.
    column = mask[0, :, 222]
    assert column[32] == 0 and column[33] == 0.0625 and column[36] == 0.4375 and column[41] == 1
    assert column[206] == 0.0625 and column[207] == 0
    assert mask[0, 120, 134] == 0 and mask[0, 120, 135] == 0.0625 and mask[0, 120, 308] == 0.0625
    assert mask[0, 120, 309] == 0 and mask[0, 120, 222] == 1
    assert torch.equal(mask[0, :33], torch.zeros(33, W)) and torch.equal(mask[0, 207:], torch.zeros(W - 207, W))
    assert mask[0].count_nonzero() == 174 * 174
    # The crop is that box enlarged: OpenCV's bicubic resize of the same pixels agrees (another kernel
    # parameter, so not bit for bit).
    import cv2

    theirs = cv2.resize(astronaut[0, 33:207, 135:309].numpy(), (512, 512), interpolation=cv2.INTER_CUBIC)
    assert np.abs(crop[0].numpy() - theirs.clip(0, 1)).mean() < 0.01


# Round trip with an identity "restoration": the crop enlarged with bicubic, shrunk back with an
# antialiased bicubic. The bound, in 0..1 units: a linear ramp comes back within 1e-4 everywhere (both
# resamplers reproduce linear functions; float rounding aside); the photo within 0.01 on average inside
# the mask and 0.3 at worst (its sharpest edges, where the round trip acts as a low-pass filter); the
# photo blurred with σ = 2 px (nothing above what the resampling passes) within 0.005 everywhere.
@pytest.mark.parametrize("margin", [0.5, 1.0, 3.0])
def test_identity_restoration_round_trips_within_resampling_error(comfy, analysis, astronaut, margin):
    for image, worst, mean in ((ramp(W, W), 1e-4, 1e-5), (astronaut, 0.3, 0.01), (blurred(astronaut, 2), 5e-3, 5e-4)):
        crop, region, mask = region_crop(comfy, analysis, image, margin=margin)
        assert region[0].box == expected_box(face_box(tiny.TinyFace(), W, W), margin, W, W)
        back = paste_back(comfy, image, crop, region)
        error = (back - image).abs()
        assert error.max() <= worst and error[(mask > 0)[..., None].expand_as(error)].mean() <= mean
        assert torch.equal(back[outside(mask)], image[outside(mask)])


def test_pixels_outside_the_mask_are_bit_identical_and_the_rest_blends(comfy, analysis, astronaut):
    crop, region, mask = region_crop(comfy, analysis, astronaut, feather=24)
    stylised = torch.rand(1, W, W, 3, generator=torch.Generator().manual_seed(0))
    restored = torch.full_like(crop, 0.25)
    back = paste_back(comfy, stylised, restored, region)
    assert torch.equal(back[outside(mask)], stylised[outside(mask)])
    # Inside: image + (restored − image) × mask, the restored constant resampled being that constant.
    m = mask[..., None]
    torch.testing.assert_close(back, stylised + (0.25 - stylised) * m, atol=2e-6, rtol=0)
    assert (mask == 1).sum() > 0 and ((mask > 0) & (mask < 1)).sum() > 0
    torch.testing.assert_close(back[(mask == 1)[..., None].expand_as(back)], torch.full(((mask == 1).sum() * 3,),
                               0.25), atol=2e-6, rtol=0)


def test_face_at_the_border_is_shifted_inside(comfy, analysis, astronaut):
    # The corner face: 80×92.8 px centred at (460.8, 51.2); margin 1: side round(185.6) = 186; centred
    # it would span x 368..554 and y −42..144, so it is shifted into the top-right corner.
    crop, (region,), mask = region_crop(comfy, analysis, astronaut, index=1, margin=1.0, feather=8)
    assert region.box == (326, 0, 512, 186) == expected_box(face_box(CORNER_FACE, W, W), 1.0, W, W)
    x1, y1, x2, y2 = face_box(CORNER_FACE, W, W)
    assert region.box[0] <= x1 and region.box[1] <= y1 and x2 <= region.box[2] and y2 <= region.box[3]
    assert crop.shape == (1, 512, 512, 3) and mask[0].count_nonzero() == 186 * 186
    back = paste_back(comfy, astronaut, crop, (region,))
    assert torch.equal(back[outside(mask)], astronaut[outside(mask)])
    assert (back - astronaut).abs()[(mask > 0)[..., None].expand_as(back)].mean() <= 0.01


def test_a_square_larger_than_the_image_becomes_the_image(comfy, analysis, astronaut):
    # margin 4: side round(116 × 5) = 580 > 512, so the whole (square) photo; on a 512×256 photo, the
    # largest square that fits, 256, as near the face (centre 222, 120) as it can: x0 94, y0 0.
    crop, (region,), mask = region_crop(comfy, analysis, astronaut, margin=4.0, size=256)
    assert region.box == (0, 0, 512, 512) and region.scale == 0.5
    assert crop.shape == (1, 256, 256, 3) and mask[0].min() == 0.5 / 16 and mask[0, 256, 256] == 1  # feathered edge
    wide = astronaut[:, 128:384]  # 256 high, 512 wide
    _, (region,), _ = region_crop(comfy, analysis, wide, margin=4.0)
    assert region.box == expected_box(face_box(tiny.TinyFace(), 256, 512), 4.0, 256, 512)
    assert region.box == (94, 0, 350, 256)


def test_several_faces_each_restored_in_turn(comfy, analysis, astronaut):
    stylised = torch.rand(1, W, W, 3, generator=torch.Generator().manual_seed(1))
    image, masks = stylised, []
    for index, value in ((0, 0.2), (1, 0.9)):
        crop, region, mask = region_crop(comfy, analysis, astronaut, index=index, margin=0.5)  # of the original
        image = paste_back(comfy, image, torch.full_like(crop, value), region)
        masks.append(mask[0])
    first, second = masks
    assert not ((first > 0) & (second > 0)).any(), "the two regions overlap; pick other faces"
    for mask, value in zip(masks, (0.2, 0.9), strict=True):
        inside = image[0][mask == 1]
        torch.testing.assert_close(inside, torch.full_like(inside, value), atol=2e-6, rtol=0)
        blend = stylised[0] + (value - stylised[0]) * mask[..., None]
        torch.testing.assert_close(image[0][mask > 0], blend[mask > 0], atol=2e-6, rtol=0)
    neither = (first == 0) & (second == 0)
    assert torch.equal(image[0][neither], stylised[0][neither])
    # The small face (index 2) is another region again.
    _, (region,), _ = region_crop(comfy, analysis, astronaut, index=2, margin=0.5)
    assert region.box == expected_box(face_box(SMALL_FACE, W, W), 0.5, W, W)


@pytest.mark.parametrize("height,width", [(333, 517), (517, 333)])
def test_odd_sizes(comfy, analysis, astronaut, height, width):
    photo = F.interpolate(astronaut.movedim(-1, 1), size=(height, width), mode="bilinear",
                          align_corners=False).movedim(1, -1)
    for image in (photo, ramp(height, width)):
        crop, (region,), mask = region_crop(comfy, analysis, image, margin=1.0, size=320, feather=8)
        assert region.box == expected_box(face_box(tiny.TinyFace(), height, width), 1.0, height, width)
        assert region.source == (height, width) and crop.shape == (1, 320, 320, 3) and mask.shape == (1, height, width)
        back = paste_back(comfy, image, crop, (region,))
        assert torch.equal(back[outside(mask)], image[outside(mask)])
    assert (back - image).abs().max() <= 1e-4  # the ramp


def test_paste_into_a_vae_cropped_or_scaled_image(comfy, analysis, astronaut):
    image = ramp(333, 517) * 0.5 + 0.25 * torch.rand(1, 333, 517, 3, generator=torch.Generator().manual_seed(2))
    crop, region, _ = region_crop(comfy, analysis, image, margin=0.5, feather=8)
    restored = torch.rand_like(crop)
    full = paste_back(comfy, image, restored, region)
    # VAEEncode crops 333×517 to 328×512, centred: offset (333 % 8) // 2 = 2, (517 % 8) // 2 = 2.
    vae_cropped = image[:, 2:330, 2:514]
    assert torch.equal(paste_back(comfy, vae_cropped, restored, region), full[:, 2:330, 2:514])
    # Twice the size: the box and the feather twice as large.
    doubled = paste_back(comfy, torch.zeros(1, 666, 1034, 3), torch.ones_like(crop), region)
    x0, y0, x1, y1 = (2 * v for v in region[0].box)
    changed = doubled[0].amax(-1) > 0
    assert changed[y0:y1, x0:x1].all() and changed.sum() == (x1 - x0) * (y1 - y0)
    assert doubled[0, y0, (x0 + x1) // 2, 0] == pytest.approx(0.5 / 16)
    with pytest.raises(ValueError, match=r"image is 300×300 px but the region was cut from a 517×333 image"):
        paste_back(comfy, torch.zeros(1, 300, 300, 3), restored, region)


def test_batches_one_region_per_image_or_broadcast(comfy, analysis, astronaut):
    images = torch.cat([astronaut, astronaut.flip(2)])
    crop, region, mask = region_crop(comfy, analysis, images, margin=0.5)
    assert crop.shape == (2, 512, 512, 3) and mask.shape == (2, W, W) and len(region) == 2
    # each image's own pixels (the tiny detector's box is the same; the second image is mirrored)
    assert (crop[0] - crop[1]).abs().max() > 0.1
    back = paste_back(comfy, torch.zeros(2, W, W, 3), torch.ones(2, 64, 64, 3), region)
    torch.testing.assert_close(back.amax(-1), mask, atol=2e-6, rtol=0)
    # One region, one restored crop for a batch of images: broadcast.
    back = paste_back(comfy, torch.zeros(3, W, W, 3), torch.ones(1, 64, 64, 3), region[:1])
    assert back.shape == (3, W, W, 3) and torch.equal(back[0], back[2])
    with pytest.raises(ValueError, match=r"image=3, restored=2, region=2: expected each to be 1 or 3"):
        paste_back(comfy, torch.zeros(3, W, W, 3), torch.ones(2, 64, 64, 3), region)


def test_no_face_and_a_bad_index_are_clear_errors(comfy, analysis, astronaut):
    with pytest.raises(ValueError, match=r"^image: no face found in image 1 of the batch of 2"):
        region_crop(comfy, analysis, torch.cat([astronaut, torch.zeros_like(astronaut)]))
    with pytest.raises(ValueError, match=r"index=3 cannot be used: image 0 has 3 face\(s\); expected 0\.\.2"):
        region_crop(comfy, analysis, astronaut, index=3)


@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_the_face_is_larger_in_the_crop_by_its_scale_measured_with_dlib(comfy, analysis, margin):
    """On the shipped example photo, with dlib: the face's box width and eye distance in the full
    photo and in the 512 crop. Their ratio is the crop's scale: the eye distance (from the 68
    landmarks, ~1 px accurate) within 5%; the box width within 20%, as dlib's boxes come from an
    image pyramid in steps of 6/5, so each width is only known to about ±10%."""
    from PIL import Image

    detector, landmarks68, _, _ = dlib_models()
    photo = np.array(Image.open(REPO / "workflows" / "examples" / "likeness_portrait.png").convert("RGB"))
    crop, (region,), _ = region_crop(comfy, analysis, torch.from_numpy(photo).float().div(255)[None], margin=margin)
    crop_pixels = (crop[0].numpy() * 255).round().astype(np.uint8)
    widths, eyes = [], []
    for image in (photo, crop_pixels):
        rects, scores, _ = detector.run(image, 1, 0)
        face = rects[int(np.argmax(scores))]
        points = np.array([[p.x, p.y] for p in landmarks68(image, face).parts()], float)
        widths.append(face.width())
        eyes.append(float(np.linalg.norm(points[36:42].mean(0) - points[42:48].mean(0))))
    print(f"\nmargin {margin}: crop of box {region.box} at {region.size}×{region.size}, scale {region.scale:.2f}; "
          f"dlib face width {widths[0]} px in the {photo.shape[1]}×{photo.shape[0]} photo, {widths[1]} px in the "
          f"crop ({widths[1] / widths[0]:.2f}×); eye distance {eyes[0]:.1f} px → {eyes[1]:.1f} px "
          f"({eyes[1] / eyes[0]:.2f}×)")
    assert eyes[1] / eyes[0] == pytest.approx(region.scale, rel=0.05)
    assert widths[1] / widths[0] == pytest.approx(region.scale, rel=0.2)


def test_the_restoration_chain_on_a_tiny_model_changes_only_the_face_region(comfy, analysis, astronaut,
                                                                            tiny_checkpoints):
    """The workflow's restoration through real ComfyUI nodes (tiny SD1.5, 4 steps): the crop VAE-encoded,
    inverted, AdaIN'd and FFA'd against a style, sampled, decoded and pasted back. Outside the mask the
    stylised image is bit for bit the input; inside, the face region changed well beyond rounding."""
    from skimage import data

    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    (empty,) = comfy.run_node("CLIPTextEncode", clip=clip, text="")
    (positive,) = comfy.run_node("CLIPTextEncode", clip=clip, text="a portrait")

    def invert(latent, capture):
        return comfy.run_node("LikenessInvert", model=model, conditioning=empty, latent=latent, steps=4,
                              capture=capture, layers="all", cache_on="auto", precision="fp16")

    photo = F.interpolate(astronaut.movedim(-1, 1), size=(128, 128), mode="area").movedim(1, -1)
    style = torch.from_numpy(data.coffee()[:, 100:500]).float().div(255)[None]
    style = F.interpolate(style.movedim(-1, 1), size=(64, 64), mode="area").movedim(1, -1)
    stylised = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(3))  # stands in for MagicStyle's
    crop, region, mask = region_crop(comfy, analysis, photo, margin=1.0, size=64, feather=4)
    style_latent, style_features = invert(comfy.run_node("VAEEncode", pixels=style, vae=vae)[0], "kv")
    content_latent, content_features = invert(comfy.run_node("VAEEncode", pixels=crop, vae=vae)[0], "qkv")
    (latent,) = comfy.run_node("LikenessAdaINLatent", content=content_latent, style=style_latent)
    (patched,) = comfy.run_node("LikenessFeatureFusionAttention", model=model, content=content_features,
                                style=style_features, alpha=0.8, beta=0.2, temperature=1.0, layers="all",
                                style_index=0, start_percent=0.0, end_percent=1.0)
    (sampled,) = comfy.run_node("KSamplerAdvanced", model=patched, add_noise="disable", noise_seed=0, steps=4,
                                cfg=1.0, sampler_name="euler", scheduler="ddim_uniform", positive=positive,
                                negative=empty, latent_image=latent, start_at_step=0, end_at_step=10000,
                                return_with_leftover_noise="disable")
    (restored,) = comfy.run_node("VAEDecode", samples=sampled, vae=vae)
    assert restored.shape == (1, 64, 64, 3) and torch.isfinite(restored).all()
    back = paste_back(comfy, stylised, restored, region)
    assert torch.equal(back[outside(mask)], stylised[outside(mask)])
    inside = (mask == 1)[..., None].expand_as(back)
    assert (back - stylised)[inside].abs().max() > 1e-2 * stylised.abs().max()
