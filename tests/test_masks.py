"""Masks on a layer's token grid (attention/shared/token_masks.py, which FFA, Face Fusion and Infinite-ID use),
against a resize written out here: a mask smaller than the grid is stretched up bilinearly, a larger
one area-averaged down, each axis on its own (a mask can be taller than the grid but narrower).

The expected values are 1-D resampling matrices built from the definitions (bilinear: half-pixel
centres, clamped at the edges; area: each cell's mean over the pixels it covers), never the pack's
code or torch's interpolate.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.face_spies import TEXT_TOKENS, AttentionRecorder, face_latent, fuse
from harness.sampling import encode


def axis_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source): one axis resampled; area average when shrinking (or equal), bilinear when growing."""
    matrix = torch.zeros(target, source, dtype=torch.float64)
    for i in range(target):
        if source >= target:
            start, end = (i * source) // target, -(-((i + 1) * source) // target)
            matrix[i, start:end] = 1.0 / (end - start)
        else:
            x = max((i + 0.5) * source / target - 0.5, 0.0)
            left = min(int(math.floor(x)), source - 1)
            right = min(left + 1, source - 1)
            matrix[i, left] += 1.0 - (x - left)
            matrix[i, right] += x - left
    return matrix


def hand_resize(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) → grid, rows then columns."""
    return axis_matrix(mask.shape[0], grid[0]) @ mask.double() @ axis_matrix(mask.shape[1], grid[1]).T


def layer_grids(height: int, width: int) -> list[tuple[int, int]]:
    """The latent halved by stride-2 convolutions (odd sizes round up), down to 1×1."""
    grids = [(height, width)]
    while grids[-1] != (1, 1):
        grids.append((-(-grids[-1][0] // 2), -(-grids[-1][1] // 2)))
    return grids


def test_the_hand_matrices_are_what_they_say():
    # Growing 2 → 4: half-pixel centres at 0.25 / 0.75 of a pixel, clamped at both edges.
    torch.testing.assert_close(axis_matrix(2, 4), torch.tensor(
        [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64))
    # Shrinking 5 → 2: cells [0, 3) and [2, 5) (overlapping where the grid does not divide).
    torch.testing.assert_close(axis_matrix(5, 2), torch.tensor(
        [[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    for source, target in ((3, 8), (8, 3), (1, 5), (4, 4)):
        torch.testing.assert_close(axis_matrix(source, target).sum(1), torch.ones(target, dtype=torch.float64))


CASES = [
    # mask (h, w), latent (h, w), the layer's tokens
    ((3, 5), (16, 24), 16 * 24),  # smaller than the grid on both axes: stretched up
    ((3, 5), (16, 24), 8 * 12),
    ((1, 1), (9, 13), 5 * 7),  # one value everywhere
    ((5, 2), (9, 13), 3 * 4),  # taller than the grid, narrower: down on rows, up on columns
    ((2, 40), (16, 24), 8 * 12),  # shorter, wider
    ((37, 53), (16, 24), 8 * 12),  # larger on both: area average, as before
    ((8, 12), (16, 24), 8 * 12),  # the grid's own size: unchanged
]


@pytest.mark.parametrize("mask_hw,latent_hw,tokens", CASES)
def test_mask_to_tokens_is_the_hand_resize(comfy, mask_hw, latent_hw, tokens):
    masks = comfy.pack("attention.shared.token_masks")
    soft = torch.rand(2, *mask_hw, generator=torch.Generator().manual_seed(sum(mask_hw)))
    grid = masks.token_grid([1, 4, *latent_hw], tokens)
    got = masks.mask_to_tokens(soft, [1, 4, *latent_hw], tokens)
    assert got.shape == (2, tokens) and got.dtype == torch.float32
    for image in range(2):
        torch.testing.assert_close(got[image].double(), hand_resize(soft[image], grid).flatten(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_hw,latent_hw,tokens", CASES[:2] + CASES[3:5])
def test_a_region_on_a_grid_larger_than_its_mask_is_the_hand_resize_above_a_half(comfy, mask_hw, latent_hw, tokens):
    """region_on_grid (FFA's and Infinite-ID's regions) on a hard-edged mask smaller than the grid."""
    masks = comfy.pack("attention.shared.token_masks")
    hard = (torch.rand(1, *mask_hw, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    hard[0, 0, 0], hard[0, -1, -1] = 1.0, 0.0  # never all inside (that is "no region": None)
    grid = masks.token_grid([1, 4, *latent_hw], tokens)
    expected = hand_resize(hard[0], grid).flatten()
    # A cell exactly half inside is ambiguous (float32 may land on either side): not checked.
    clear = (expected - 0.5).abs() > 1e-6
    assert clear.float().mean() > 0.6 and (expected[clear] > 0.5).any() and (expected[clear] < 0.5).any()
    got = masks.region_on_grid(hard, {"original_shape": [1, 4, *latent_hw]}, tokens)
    assert torch.equal(got[clear], expected[clear] > 0.5)


LATENTS = [("sd15", (40, 40)), ("sd15", (9, 13)), ("sdxl", (24, 24))]


@pytest.mark.parametrize("name,latent_hw", LATENTS, ids=[f"{n}-{h}x{w}" for n, (h, w) in LATENTS])
def test_face_fusion_masks_smaller_than_the_grid_follow_the_hand_resize_on_every_layer(
        comfy, tiny_checkpoints, monkeypatch, name, latent_hw):
    """Two people whose masks are 6×5 and 5×7 (smaller than most grids of the UNet): on every layer
    a query inside one person's stretched-up region (hand resize > 0.5) never sees the other's face
    (Eq. 7), as the attention mask ComfyUI receives shows."""
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[name])
    height, width = latent_hw
    first, second = torch.zeros(6, 5), torch.zeros(5, 7)
    first[:, :3] = 1.0
    second[:3, 2:] = 1.0
    fused = fuse(comfy, model, face_latent(seed=1, size=4), mask=first)
    fused = fuse(comfy, fused, face_latent(seed=2, size=4), mask=second)
    recorder = AttentionRecorder().install(monkeypatch, comfy.pack("attention.shared.dispatch"))
    (latent,) = comfy.run_node("EmptyLatentImage", width=8 * width, height=8 * height, batch_size=1)
    comfy.run_node("KSampler", model=fused, seed=3, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                   positive=encode(comfy, clip, "two people"), negative=encode(comfy, clip, "blurry"),
                   latent_image=latent, denoise=1.0)
    calls = [c for c in recorder.calls if c["k"].shape[1] > TEXT_TOKENS]
    upscaled = 0
    for call in calls:
        rows, queries, keys = call["q"].shape[0], call["q"].shape[1], call["k"].shape[1]
        (grid,) = [g for g in layer_grids(height, width) if g[0] * g[1] == queries]
        averages = [hand_resize(m, grid).flatten() for m in (first, second)]
        # A cell exactly half inside is ambiguous (float32 may land on either side): not checked.
        clear = ((averages[0] - 0.5).abs() > 1e-6) & ((averages[1] - 0.5).abs() > 1e-6)
        assert clear.float().mean() > 0.7, (call["key"], grid)
        inside = [a > 0.5 for a in averages]
        face = (keys - TEXT_TOKENS) // 2
        expected = torch.zeros(rows, queries, keys)
        expected[:, inside[1], TEXT_TOKENS:TEXT_TOKENS + face] = float("-inf")
        expected[:, inside[0], TEXT_TOKENS + face:] = float("-inf")
        assert call["mask"] is not None
        got = call["mask"].float().expand(rows, -1, -1)
        assert torch.equal(got[:, clear], expected[:, clear]), (call["key"], grid)
        upscaled += int(grid[0] > 6 or grid[1] > 7)
    assert upscaled >= 4, "too few layers whose grid is larger than the masks"
