"""Infinite-ID's attention (Eq. 5–8) and two-stream patch on the real host."""

from __future__ import annotations

import pytest
import torch

from harness.sampling import txt2img_latent


@pytest.fixture(scope="module")
def modules(comfy):
    return {name: comfy.pack(f"attention.{name}") for name in ("infinite_id", "dispatch", "unet_layers", "adain")}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def stand_in_adapter(modules, model, seed=0, tokens=4):
    """Identity tokens and image K/V weights of the right shapes: the layers'
    own text projections (a loaded FaceID-PlusV2 file gives its own)."""
    layers = modules["unet_layers"]
    unet = layers.diffusion_model_of(model)
    keys = layers.attention_keys(unet)
    kv = {k: (layers.transformer_block(unet, k).attn2.to_k.weight.detach().clone(),
              layers.transformer_block(unet, k).attn2.to_v.weight.detach().clone()) for k in keys}
    context = kv[keys[0]][0].shape[1]
    generator = torch.Generator().manual_seed(seed)
    return keys, kv, torch.randn(1, tokens, context, generator=generator)


def patched(modules, model, tokens, kv, keys, **settings):
    infinite_id = modules["infinite_id"]
    config = infinite_id.InfiniteID(tokens=tokens, uncond_tokens=torch.zeros_like(tokens), kv=kv, **settings)
    return infinite_id.apply_infinite_id(model, config, keys)


def test_mixed_attention_with_identical_streams_is_plain_self_attention(modules):
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 32) for _ in range(3))
    options = {"n_heads": 4}
    plain = dispatch.default_attention(q, k, v, options)
    mixed = infinite_id.mixed_attention(q, k, v, k, v, options, dispatch.default_attention, mixed=True, align=False)
    assert torch.allclose(mixed, plain, atol=1e-5)
    aligned = infinite_id.mixed_attention(q, k, v, k, v, options, dispatch.default_attention, mixed=True, align=True)
    assert torch.allclose(aligned, plain, atol=1e-5)


def test_adain_mean_moves_the_token_mean_only(modules):
    adain = modules["adain"]
    torch.manual_seed(1)
    x, y = torch.randn(2, 50, 8) * 3 + 1, torch.randn(2, 30, 8) - 4
    out = adain.adain_mean(x, y)
    assert torch.allclose(out.mean(1), y.mean(1), atol=1e-5)
    assert torch.allclose(out - out.mean(1, keepdim=True), x - x.mean(1, keepdim=True), atol=1e-5)


def test_cross_attention_merge_adds_the_text_attention(modules):
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    torch.manual_seed(2)
    q, k_img, v_img, k_t, v_t = (torch.randn(1, n, 16) for n in (9, 4, 4, 7, 7))
    options = {"n_heads": 2}
    attend = dispatch.default_attention
    merged = infinite_id.merged_cross_attention(q, k_img, v_img, k_t, v_t, options, attend, merge=True, align=False)
    assert torch.allclose(merged, attend(q, k_img, v_img, options) + attend(q, k_t, v_t, options), atol=1e-6)
    alone = infinite_id.merged_cross_attention(q, k_img, v_img, k_t, v_t, options, attend, merge=False, align=False)
    assert torch.allclose(alone, attend(q, k_img, v_img, options))


def test_weight_zero_is_the_text_only_model(comfy, modules, family):
    _, model, clip = family
    keys, kv, tokens = stand_in_adapter(modules, model)
    plain = txt2img_latent(comfy, model, clip)
    assert torch.equal(txt2img_latent(comfy, patched(modules, model, tokens, kv, keys, weight=0.0), clip), plain)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_identity_stream_changes_the_image_and_leaves_the_model_alone(comfy, modules, family, cfg):
    _, model, clip = family
    keys, kv, tokens = stand_in_adapter(modules, model)
    plain = txt2img_latent(comfy, model, clip, cfg=cfg)
    for settings in ({}, {"adain_mean": True}, {"mixed_attention": False, "cross_attention_merge": False}):
        out = txt2img_latent(comfy, patched(modules, model, tokens, kv, keys, **settings), clip, cfg=cfg)
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4, settings
    assert torch.equal(txt2img_latent(comfy, model, clip, cfg=cfg), plain)


def test_mixing_weights_one_zero_give_the_single_identity(comfy, modules, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    keys, kv, first = stand_in_adapter(modules, model, seed=1)
    _, _, second = stand_in_adapter(modules, model, seed=2)
    mix = modules["infinite_id"].mix_identities
    single = txt2img_latent(comfy, patched(modules, model, first, kv, keys), clip)
    mixed = txt2img_latent(comfy, patched(modules, model, mix([first, second], [1.0, 0.0]), kv, keys), clip)
    assert torch.equal(mixed, single)
    halfway = txt2img_latent(comfy, patched(modules, model, mix([first, second], [0.5, 0.5]), kv, keys), clip)
    assert not torch.equal(halfway, single)
    with pytest.raises(ValueError, match="mixing weights"):
        mix([first, second], [0.0, 0.0])
