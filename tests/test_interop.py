"""Another pack's attention patch (ComfyUI_IPAdapter_plus' shapes) beside Likeness Face Fusion:
neither is dropped, in either order, at any weight, with or without masks."""

from __future__ import annotations

import pytest
import torch

from harness import ipadapter_like
from harness.sampling import txt2img_latent


def differs(a, b, floor=1e-2):
    return bool((a - b).abs().max() > floor * b.abs().max())


def face_latent(seed):
    return {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}


def with_face(comfy, model, weight, mask):
    inputs = dict(weight=weight, kv="self-attention to_k/to_v (training-free)", start_percent=0.0, end_percent=1.0,
                  face_noise="noised", noise_seed=0, uncond=True)
    if mask is not None:
        inputs["mask"] = mask
    return comfy.run_node("LikenessFaceFusion", model=model, face=face_latent(3), **inputs)[0]


def left_half():
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    return mask


@pytest.mark.parametrize("family, two_part", [("sd15", True), ("sdxl", False)])
@pytest.mark.parametrize("weight, mask", [(1.0, None), (0.5, None), (1.0, "left")])
def test_an_image_prompt_and_face_fusion_both_act_in_either_order(comfy, tiny_checkpoints, family, two_part, weight,
                                                                  mask):
    layers = comfy.pack("attention.shared.layer_table")
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[family])
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    mask = left_half() if mask == "left" else None
    ipa_only = txt2img_latent(comfy, ipadapter_like.apply(model, keys, two_part=two_part), clip)
    face_only = txt2img_latent(comfy, with_face(comfy, model, weight, mask), clip)
    ipa_first = ipadapter_like.apply(model, keys, two_part=two_part)
    ipa_first = with_face(comfy, ipa_first, weight, mask)
    face_first = ipadapter_like.apply(with_face(comfy, model, weight, mask), keys, two_part=two_part)
    if not two_part:  # IPAdapter_plus added its callback to the dispatcher it found on the key
        dispatcher = face_first.model_options["transformer_options"]["patches_replace"]["attn2"][tuple(keys[0])]
        assert len(dispatcher.callbacks) == 1
    one = txt2img_latent(comfy, ipa_first, clip)
    other = txt2img_latent(comfy, face_first, clip)
    # The same result in either order: the face keys inside the attention, the image prompt added to it.
    torch.testing.assert_close(one, other, rtol=1e-4, atol=1e-3)
    assert differs(one, ipa_only), "the face must still act beside the image prompt"
    assert differs(one, face_only), "the image prompt must still act beside the face"


def test_a_masked_face_keeps_the_image_prompt_exactly_as_unmasked_weight_one_would(comfy, tiny_checkpoints):
    """At one layer: masked attention over [text; face] plus the image prompt's own addition,
    against the two computed apart."""
    dispatch = comfy.pack("attention.shared.dispatch")
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 16, 32, generator=generator) for _ in range(3))
    mask = torch.zeros(2, 16, 16)
    mask[:, :8, 12:] = float("-inf")
    options = {"n_heads": 4, "sigmas": torch.tensor([1.0]), "cond_or_uncond": [0, 1]}
    container = ipadapter_like.CallbackContainer(ipadapter_like.image_prompt, seed=1, weight=0.7,
                                                 sigma_start=10.0, sigma_end=0.0)
    dispatcher = dispatch.AttentionDispatcher("attn2", ("input", 1, 0), previous=container)
    got = dispatcher._innermost(q, k, v, options, mask=mask)
    expected = dispatch.default_attention(q, k, v, options, mask) + ipadapter_like.image_prompt(
        None, q, k, v, options, seed=1, weight=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
