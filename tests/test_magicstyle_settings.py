"""MagicStyle settings that say what they do: the AdaIN latent's mask, the named layer sets, the
feature precision chosen for the run."""

from __future__ import annotations

import logging

import pytest
import torch

from harness.sampling import encode


def random_latents(count, seed=0, height=8, width=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 4, height, width, generator=generator)


def adain_node(comfy, content, style, mask=None):
    inputs = {} if mask is None else {"mask": mask}
    (out,) = comfy.run_node("LikenessAdaINLatent", content={"samples": content}, style={"samples": style}, **inputs)
    return out["samples"]


def hand_adain(content, style):
    """Eq. 4 written out: per image and channel over H×W, population std, eps on the std."""
    c_mean, s_mean = content.mean((-2, -1), keepdim=True), style.mean((-2, -1), keepdim=True)
    c_std = ((content - c_mean) ** 2).mean((-2, -1), keepdim=True).sqrt()
    s_std = ((style - s_mean) ** 2).mean((-2, -1), keepdim=True).sqrt()
    return (content - c_mean) / (c_std + 1e-5) * s_std + s_mean


@pytest.mark.parametrize("height, width", [(8, 8), (9, 13)])
def test_adain_with_a_mask_keeps_the_content_outside_bit_for_bit_and_is_adain_inside(comfy, height, width):
    content, style = random_latents(2, seed=1, height=height, width=width) * 3 + 1, random_latents(1, seed=2) - 2
    # The image-sized mask the FFA node gets: the left 6 latent columns (48 pixels), top rows excluded.
    mask = torch.zeros(height * 8, width * 8)
    mask[16:, :48] = 1.0
    out = adain_node(comfy, content, style, mask)
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[2:, :6] = True
    assert torch.equal(out[..., ~inside], content[..., ~inside])  # outside: the content's own z_T
    expected = hand_adain(content, style)
    assert torch.allclose(out[..., inside], expected[..., inside], atol=1e-5)
    assert torch.equal(out[..., inside], adain_node(comfy, content, style)[..., inside])  # = the unmasked node
    assert (out - content)[..., inside].abs().mean() > 1.0  # AdaIN moved it (the statistics differ by ~3)


def test_a_soft_adain_mask_is_the_hand_blend(comfy):
    content, style = random_latents(1, seed=3) * 2, random_latents(1, seed=4) + 1
    # Soft values at the latent's own grid, given at image size (each latent pixel an 8x8 block).
    soft = torch.linspace(0, 1, 64).reshape(8, 8)
    soft[0, :3] = 0.0
    soft[7, 5:] = 1.0
    out = adain_node(comfy, content, style, soft.repeat_interleave(8, 0).repeat_interleave(8, 1))
    expected = soft * hand_adain(content, style) + (1 - soft) * content
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out[..., 0, :3], content[..., 0, :3])
    middle = (soft > 0.3) & (soft < 0.7)
    assert ((out - content)[..., middle].abs() > 0.1).float().mean() > 0.9  # a real blend, not either end


def test_one_adain_mask_per_content_latent(comfy):
    content, style = random_latents(2, seed=5), random_latents(1, seed=6) * 4
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1.0
    masks[1, :, 32:] = 1.0
    out = adain_node(comfy, content, style, masks)
    adain = hand_adain(content, style)
    assert torch.equal(out[0, ..., 4:], content[0, ..., 4:]) and torch.equal(out[1, ..., :4], content[1, ..., :4])
    assert torch.allclose(out[0, ..., :4], adain[0, ..., :4], atol=1e-5)
    assert torch.allclose(out[1, ..., 4:], adain[1, ..., 4:], atol=1e-5)
    with pytest.raises(ValueError, match="3 masks for 2 content latents"):
        adain_node(comfy, content, style, torch.ones(3, 64, 64))
    with pytest.raises(ValueError, match="mask"):
        adain_node(comfy, content, style, torch.zeros(64, 64))


# StyleID's released run_styleid.py: --attn_layer default '6,7,8,9,10,11', indices into SD1.5's
# output_blocks (transformer_blocks[0] of each).
STYLEID_ATTN_LAYER = "6,7,8,9,10,11"
SD15_ENCODER = [("input", n, 0) for n in (1, 2, 4, 5, 7, 8)]
SD15_DECODER = [("output", n, 0) for n in range(3, 12)]
SDXL_ENCODER = ([("input", n, i) for n in (4, 5) for i in range(2)]
                + [("input", n, i) for n in (7, 8) for i in range(10)])
SDXL_DECODER = [("output", n, i) for n in (0, 1, 2) for i in range(10)] + [("output", n, i) for n in (3, 4, 5)
                                                                           for i in range(2)]
EXPECTED_LAYERS = {
    "sd15": {"all": SD15_ENCODER + [("middle", 0, 0)] + SD15_DECODER, "decoder": SD15_DECODER,
             "decoder_high_res": [("output", int(n), 0) for n in STYLEID_ATTN_LAYER.split(",")],
             "encoder": SD15_ENCODER, "middle": [("middle", 0, 0)]},
    "sdxl": {"all": SDXL_ENCODER + [("middle", 0, i) for i in range(10)] + SDXL_DECODER, "decoder": SDXL_DECODER,
             # the half-resolution output blocks: full resolution (output 6-8) has no attention on SDXL
             "decoder_high_res": [("output", n, i) for n in (3, 4, 5) for i in range(2)],
             "encoder": SDXL_ENCODER, "middle": [("middle", 0, i) for i in range(10)]},
}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_each_layer_set_selects_its_layers(comfy, tiny_checkpoints, kind):
    """The keys each option selects, through the nodes, against lists written by hand from the
    layouts (SD1.5: 16 layers, SDXL: 70) and StyleID's released layer indices."""
    expected = EXPECTED_LAYERS[kind]
    assert len(expected["all"]) == {"sd15": 16, "sdxl": 70}[kind]
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    empty = encode(comfy, clip, "")
    cached = {}
    invert_options = comfy.node_class("LikenessInvert").GET_SCHEMA().inputs
    (layers_input,) = [i for i in invert_options if i.id == "layers"]
    dit_only = ("double", "single")  # Flux / SD3.5 block sets: refused on a UNet, by name
    with pytest.raises(ValueError, match=r"layers='double' cannot be used: expected one of all, decoder"):
        comfy.run_node("LikenessInvert", model=model, conditioning=empty, latent={"samples": random_latents(1)},
                       steps=2, capture="qkv", layers="double", cache_on="auto", precision="fp16")
    for layers in [option for option in layers_input.options if option not in dit_only]:
        _, bank = comfy.run_node("LikenessInvert", model=model, conditioning=empty,
                                 latent={"samples": random_latents(1)}, steps=2, capture="qkv", layers=layers,
                                 cache_on="auto", precision="fp16")
        cached[layers] = bank
        assert sorted(bank.layers) == sorted(expected[layers]), layers
        assert sorted(k for (_, k) in bank.features) == sorted(expected[layers] * len(bank.timesteps)), layers
    dispatch = comfy.pack("attention.shared.dispatch")
    for layers in comfy.pack("attention.shared.layer_table").LAYER_SETS:
        (patched,) = comfy.run_node("LikenessFeatureFusionAttention", model=model, content=cached["all"],
                                    style=cached["all"], alpha=0.8, beta=0.2, temperature=1.0, layers=layers,
                                    style_index=0, start_percent=0.0, end_percent=1.0)
        (fusion,) = {id(p.fusion): p.fusion for d in dispatch.dispatchers(patched) for p in d.processors
                     if hasattr(p, "fusion")}.values()
        assert sorted(fusion.layers) == sorted(expected[layers]), layers
    # StyleID's set fused from features cached for the whole decoder
    (patched,) = comfy.run_node("LikenessFeatureFusionAttention", model=model, content=cached["decoder"],
                                style=cached["decoder"], alpha=0.8, beta=0.2, temperature=1.0,
                                layers="decoder_high_res", style_index=0, start_percent=0.0, end_percent=1.0)
    (fusion,) = {id(p.fusion): p.fusion for d in dispatch.dispatchers(patched) for p in d.processors
                 if hasattr(p, "fusion")}.values()
    assert sorted(fusion.layers) == sorted(expected["decoder_high_res"])


def test_the_precision_default_is_auto(comfy):
    (precision,) = [i for i in comfy.node_class("LikenessInvert").GET_SCHEMA().inputs if i.id == "precision"]
    assert precision.default == "auto" and list(precision.options) == ["auto", "fp8", "fp16"]


@pytest.mark.parametrize("room, chosen", [(16, "fp16"), (-16, "fp8")])
def test_auto_precision_is_fp16_where_the_runs_cache_fits_the_free_memory(comfy, tiny_checkpoints, monkeypatch,
                                                                         caplog, room, chosen):
    """The run that uses one content's features holds them and one style image's: twice the bytes
    an fp16 inversion of one image keeps (measured here, not computed by the formula the code uses).
    cache_on=auto keeps a cache on the device when it is at most half the free memory less ComfyUI's
    reserve; auto precision picks fp16 exactly there, a few bytes either side of the boundary."""
    import comfy.model_management as mm

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    empty = encode(comfy, clip, "")
    latent = {"samples": random_latents(1, seed=9)}

    def run(precision):
        return comfy.run_node("LikenessInvert", model=model, conditioning=empty, latent=latent, steps=3,
                              capture="qkv", layers="all", cache_on="auto", precision=precision)

    _, measured = run("fp16")
    run_bytes = 2 * measured.nbytes()
    free = mm.minimum_inference_memory() + 2 * run_bytes + room
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False:
                        (free, free) if torch_free_too else free)
    with caplog.at_level(logging.INFO, logger="likeness"):
        z_t, bank = run("auto")
    assert bank.dtype == chosen
    assert {stored.values.dtype for stored in bank.features.values()} == {
        {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}[chosen]}
    messages = [r.getMessage() for r in caplog.records if "precision auto chose" in r.getMessage()]
    assert len(messages) == 1, messages  # once per inversion, not per layer or step
    assert messages[0].startswith(f"Likeness Invert: precision auto chose {chosen}")
    assert f"({run_bytes / 1e9:.2f} GB)" in messages[0]
    # the same inversion as the chosen precision asked for by name
    _, named = run(chosen)
    assert torch.equal(z_t["samples"], run(chosen)[0]["samples"])
    assert all(torch.equal(named.features[key].values.float(), bank.features[key].values.float())
               for key in bank.features)


def test_features_auto_stored_at_two_precisions_still_merge(comfy, tiny_checkpoints):
    """auto may choose fp16 for one inversion and fp8 for another: Merge Features widens the fp8
    states to fp16 instead of refusing the pair."""
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    empty = encode(comfy, clip, "")
    banks = [comfy.run_node("LikenessInvert", model=model, conditioning=empty,
                            latent={"samples": random_latents(1, seed)}, steps=2, capture="kv",
                            layers="decoder_high_res", cache_on="auto", precision=precision)[1]
             for seed, precision in ((1, "fp16"), (2, "fp8"))]
    (merged,) = comfy.run_node("LikenessMergeFeatures", first=banks[0], second=banks[1])
    assert merged.dtype == "fp16" and merged.images == 2
    for key, stored in merged.features.items():
        assert stored.values.dtype == torch.float16 and stored.scale is None
        assert torch.equal(stored.values[:1], banks[0].features[key].values)
        exact = banks[1].features[key].states("cpu", torch.float32)
        assert torch.allclose(stored.values[1:].float(), exact, rtol=2e-3, atol=1e-6)
