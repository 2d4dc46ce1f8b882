"""Face Fusion against hand computations from the layers' own weights (Eq. 2–7).

Nothing here calls the pack's attention code to get an expected value: keys
and values come from forward hooks on the real modules and their weights,
the attention from a softmax written out, the masks from an area average
written out on the grid the UNet's stride-2 convolutions make.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.face_spies import (TEXT_TOKENS, AttentionRecorder, face_latent, fuse, linear, relative_difference,
                                softmax_attention)
from harness.sampling import encode, txt2img_latent


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def unet_and_layers(comfy, model):
    layers = comfy.pack("attention.shared.layer_table")
    unet = model.model.diffusion_model
    return unet, layers.attention_keys(unet), layers.transformer_block


def test_face_keys_and_values_are_attn1_projections_of_the_face_pass_norm2_states(comfy, family, monkeypatch):
    _, model, clip = family
    unet, keys, block_of = unet_and_layers(comfy, model)
    states = {key: [] for key in keys}
    hooks = [block_of(unet, key).norm2.register_forward_hook(
        lambda module, inputs, output, key=key: states[key].append(output.detach().clone())) for key in keys]
    recorder = AttentionRecorder().install(monkeypatch, comfy.pack("attention.shared.dispatch"))
    try:
        # three references (a batch of 3 tells the face pass from the image's batch of 2), 6×6 latents
        txt2img_latent(comfy, fuse(comfy, model, face_latent(count=3, size=6)), clip, steps=1)
    finally:
        for hook in hooks:
            hook.remove()
    for key in keys:
        (h_f,) = [s for s in states[key] if s.shape[0] == 3]
        attn1 = block_of(unet, key).attn1
        k_f = linear(attn1.to_k, h_f).reshape(-1, attn1.to_k.out_features)  # references one after another
        v_f = linear(attn1.to_v, h_f).reshape(-1, attn1.to_v.out_features)
        (call,) = [c for c in recorder.calls if c["key"] == key and c["k"].shape[1] > TEXT_TOKENS]
        for row in range(call["k"].shape[0]):
            torch.testing.assert_close(call["k"][row, TEXT_TOKENS:].double(), k_f, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(call["v"][row, TEXT_TOKENS:].double(), v_f, rtol=1e-5, atol=1e-6)


class LayerRecord:
    """Forward hooks on one transformer block's real modules."""

    def __init__(self, block):
        self.seen = {"h_f": [], "q": [], "k": [], "v": [], "out": []}
        self.block = block
        self.hooks = [
            block.norm2.register_forward_hook(self._keep("h_f")),
            block.attn2.to_q.register_forward_hook(self._keep("q")),
            block.attn2.to_k.register_forward_hook(self._keep("k")),
            block.attn2.to_v.register_forward_hook(self._keep("v")),
            # the attention output, as it enters to_out
            block.attn2.to_out[0].register_forward_pre_hook(lambda m, inputs: self.seen["out"].append(
                inputs[0].detach().clone())),
        ]

    def _keep(self, name):
        return lambda module, inputs, output: self.seen[name].append(output.detach().clone())

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def of_batch(self, name: str, rows: int) -> torch.Tensor:
        (found,) = [t for t in self.seen[name] if t.shape[0] == rows]
        return found


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_a_weight_adds_its_log_to_that_face_logits(comfy, family, monkeypatch, weight):
    _, model, clip = family
    unet, keys, block_of = unet_and_layers(comfy, model)
    record = LayerRecord(block_of(unet, keys[0]))
    try:
        txt2img_latent(comfy, fuse(comfy, model, face_latent(count=3, size=6), weight=weight), clip, steps=1)
    finally:
        record.remove()
    attn1, heads = record.block.attn1, record.block.attn2.heads
    h_f = record.of_batch("h_f", 3)  # the face pass
    k_f = linear(attn1.to_k, h_f).reshape(1, -1, attn1.to_k.out_features)
    v_f = linear(attn1.to_v, h_f).reshape(1, -1, attn1.to_v.out_features)
    q, k_text, v_text = (record.of_batch(name, 2) for name in ("q", "k", "v"))  # cond + uncond rows
    k = torch.cat([k_text.double(), k_f.expand(2, -1, -1)], 1)
    v = torch.cat([v_text.double(), v_f.expand(2, -1, -1)], 1)
    bias = torch.zeros(2, q.shape[1], k.shape[1], dtype=torch.float64)
    bias[..., TEXT_TOKENS:] = math.log(weight)
    _, expected = softmax_attention(q, k, v, heads, bias)
    _, unweighted = softmax_attention(q, k, v, heads)
    actual = record.of_batch("out", 2).double()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert relative_difference(expected, unweighted) > 1e-2, "the weight must change the attention"


def layer_grids(height: int, width: int) -> list[tuple[int, int]]:
    """Each level of the UNet: a stride-2, padding-1 convolution makes ceil(n/2) of n, down to 1×1."""
    grids = [(height, width)]
    while grids[-1] != (1, 1):
        height, width = -(-height // 2), -(-width // 2)
        grids.append((height, width))
    return grids


def area_average(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each grid cell's mean over the pixels it covers (cell i spans floor(i·H/h) to ceil((i+1)·H/h))."""
    (rows, cols), (height, width) = grid, mask.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        top, bottom = (i * height) // rows, -(-((i + 1) * height) // rows)
        for j in range(cols):
            left, right = (j * width) // cols, -(-((j + 1) * width) // cols)
            out[i, j] = mask[top:bottom, left:right].double().mean()
    return out


def sample(comfy, model, clip, height: int, width: int) -> torch.Tensor:
    (latent,) = comfy.run_node("EmptyLatentImage", width=8 * width, height=8 * height, batch_size=1)
    (out,) = comfy.run_node("KSampler", model=model, seed=3, steps=1, cfg=5.0, sampler_name="euler",
                            scheduler="normal", positive=encode(comfy, clip, "two people"),
                            negative=encode(comfy, clip, "blurry"), latent_image=latent, denoise=1.0)
    return out["samples"]


LATENTS = [("sd15", (72, 56)), ("sd15", (40, 40)), ("sd15", (5, 3)),
           ("sdxl", (72, 56)), ("sdxl", (40, 40)), ("sdxl", (3, 3))]


@pytest.mark.parametrize("name,latent_hw", LATENTS, ids=[f"{n}-{h}x{w}" for n, (h, w) in LATENTS])
def test_eq7_on_every_layer_overlap_included(comfy, tiny_checkpoints, monkeypatch, name, latent_hw):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[name])
    height, width = latent_hw
    pixels_h, pixels_w = 8 * height, 8 * width
    first, second = torch.zeros(pixels_h, pixels_w), torch.zeros(pixels_h, pixels_w)
    # No cell of any grid is exactly half inside either region (checked below), so "inside" is unambiguous.
    first[:, :math.ceil(0.57 * pixels_w)] = 1.0
    second[:int(0.61 * pixels_h), int(0.41 * pixels_w):] = 1.0  # overlaps the first between 41% and 57%
    fused = fuse(comfy, model, face_latent(seed=1, size=4), mask=first)
    fused = fuse(comfy, fused, face_latent(seed=2, size=4), mask=second)
    recorder = AttentionRecorder().install(monkeypatch, comfy.pack("attention.shared.dispatch"))
    sample(comfy, fused, clip, height, width)
    calls = [c for c in recorder.calls if c["k"].shape[1] > TEXT_TOKENS]
    assert calls
    grids_seen, overlaps = set(), 0
    for call in calls:
        rows, queries, keys = call["q"].shape[0], call["q"].shape[1], call["k"].shape[1]
        (grid,) = [g for g in layer_grids(height, width) if g[0] * g[1] == queries]
        grids_seen.add(grid)
        averages = [area_average(m, grid).flatten() for m in (first, second)]
        assert all(((a - 0.5).abs() > 1e-6).all() for a in averages), "a cell exactly half inside: move the masks"
        inside = [a > 0.5 for a in averages]
        face = (keys - TEXT_TOKENS) // 2  # both references have the same latent size
        expected = torch.zeros(rows, queries, keys)
        expected[:, inside[1], TEXT_TOKENS:TEXT_TOKENS + face] = float("-inf")  # first face, in the second's region
        expected[:, inside[0], TEXT_TOKENS + face:] = float("-inf")  # second face, in the first's region
        assert call["mask"] is not None and torch.equal(call["mask"].float().expand(rows, -1, -1), expected), \
            (call["key"], grid)
        # The attention ComfyUI computed sees neither face where both regions meet, only the other's elsewhere.
        _, by_hand = softmax_attention(call["q"], call["k"], call["v"], call["heads"], expected)
        torch.testing.assert_close(call["out"].double(), by_hand, rtol=1e-4, atol=1e-5)
        overlaps += int((inside[0] & inside[1]).sum())
    if max(height, width) <= 5:  # small enough for the deepest layers to be 1×1
        assert (1, 1) in grids_seen, grids_seen
    if min(height, width) >= 40:  # on the large grids the regions overlap (on the smallest they need not)
        assert overlaps > 0, "the masks must overlap on some layer"
