"""MagicStyle on Flux.1 and SD3.5 (tiny models of the real layouts): Euler inversion of the flow,
features captured in joint attention, FFA there against a hand computation from a block's own
weights, the input MODEL unchanged, another pack's attention override chained."""

from __future__ import annotations

import pytest
import torch

from test_dit import ffa, forward, invert, latents
from tiny import tiny_dit

# max |z_0 − forward(invert(z_0))| on the calm tiny DiTs, 12 steps (latents ~N(0, 1)): Euler inversion's own
# error (v at σ_{i-1} stands in for v at σ_i), as the UNet tests' 0.01. Measured: Flux 6.6e-3, SD3.5 9.1e-4.
ROUND_TRIP = 1e-2


@pytest.fixture(scope="module", params=["flux", "sd3"])
def inverted(request, comfy):
    """Content (image 0) and style (image 1) inverted together on a calm tiny DiT, every block (fp16)."""
    from test_dit import calm_dit

    if request.param == "flux":
        model, cond = calm_dit(tiny_dit.tiny_flux()), tiny_dit.flux_conditioning(guidance=3.5)
    else:
        model, cond = calm_dit(tiny_dit.tiny_sd3()), tiny_dit.sd3_conditioning()
    start = latents(2)
    z_t, features = invert(comfy, model, cond, start)
    return request.param, model, cond, start, z_t["samples"], features


def test_euler_inversion_of_the_flow_round_trips(comfy, inverted):
    name, model, cond, start, z_t, features = inverted
    assert (z_t - start).abs().max() > 0.5, "inversion must move the latent"
    back = forward(comfy, model, z_t, cond)
    error = (back - start).abs().max().item()
    print(f"{name}: round trip max error {error:.2e}")
    assert error < ROUND_TRIP, f"{name}: round trip off by {error}"
    blocks = {"flux": 4, "sd3": 2}[name]
    assert len(features.features) == len(features.timesteps) * blocks
    stored = next(iter(features.features.values()))
    hidden = model.get_model_object("diffusion_model").hidden_size if name == "flux" else 128
    assert tuple(stored.values.shape) == (2, 5 * 7, 3 * hidden)  # 10×14 latent, 2×2 patches: 35 image tokens


def test_ffa_alpha_1_beta_0_style_content_is_the_plain_reconstruction(comfy, inverted):
    name, model, cond, _, z_t, features = inverted
    content, style = features.select(0, 1), features.select(1, 1)
    plain = forward(comfy, model, z_t[:1], cond)
    same = forward(comfy, ffa(comfy, model, content, content, alpha=1.0, beta=0.0), z_t[:1], cond)
    styled = forward(comfy, ffa(comfy, model, content, style), z_t[:1], cond)
    identity_gap, style_gap = (same - plain).abs().max().item(), (styled - plain).abs().max().item()
    print(f"{name}: identity gap {identity_gap:.2e}, style gap {style_gap:.2e}")
    assert identity_gap < 1e-3, f"{name}: {identity_gap}"
    assert style_gap > 20 * identity_gap, f"{name}: FFA with a real style changed only {style_gap}"
    # The literal keys [K_txt; K_c; K_s] halve the text's share: no longer the plain model.
    halved = forward(comfy, ffa(comfy, model, content, content, alpha=1.0, beta=0.0, keep_text_share=False),
                     z_t[:1], cond)
    assert (halved - plain).abs().max().item() > 5 * identity_gap


def test_input_model_is_unchanged_and_another_packs_override_still_runs(comfy, inverted):
    name, model, cond, _, z_t, features = inverted
    content, style = features.select(0, 1), features.select(1, 1)
    before = forward(comfy, model, z_t[:1], cond)
    options_before = repr(sorted(model.model_options.get("transformer_options", {})))
    seen = []

    def foreign(func, *args, **kwargs):  # another pack's override: silences every attention output
        seen.append(kwargs["transformer_options"].get("block_index"))
        return func(*args, **kwargs) * 0.0

    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = foreign
    with_foreign = forward(comfy, ffa(comfy, other, content, style, blocks="d0"), z_t[:1], cond)
    calls = len(seen)
    alone = forward(comfy, ffa(comfy, model, content, style, blocks="d0"), z_t[:1], cond)
    assert calls > 0 and len(seen) == calls, "the foreign override ran in the FFA run, and only there"
    # Measured 1.4e-4 relative on the calm tiny SD3.5 (its scaled-down output layer damps every change),
    # more on Flux; the same computation rounds differently by ~1e-7 in fp32.
    change = (with_foreign - alone).abs().max() / alone.abs().max()
    assert change > 2e-5, f"the foreign override's change is in the result ({change:.2e})"
    after = forward(comfy, model, z_t[:1], cond)
    assert torch.equal(before, after), f"{name}: the input MODEL samples differently after FFA runs"
    assert repr(sorted(model.model_options.get("transformer_options", {}))) == options_before


def test_recompute_equals_cache_on_tiny_flux(comfy):
    """recompute keeps only the inverted latents and runs them beside the image: the same features,
    so the same picture as the cache (fp32 cache, to compare without fp16's rounding)."""
    from test_dit import calm_dit

    model, cond = calm_dit(tiny_dit.tiny_flux()), tiny_dit.flux_conditioning(guidance=3.5)
    start = latents(2, seed=5)
    z_cache, cached = invert(comfy, model, cond, start, precision="fp16")
    z_kept, kept = invert(comfy, model, cond, start, mode="recompute")
    assert torch.equal(z_cache["samples"], z_kept["samples"])
    kept_latents = sum(t.numel() * t.element_size() for t in kept.trajectory.latents.values())
    assert not kept.features and kept_latents == len(kept.timesteps) * 2 * 16 * 10 * 14 * 4  # per timestep, fp32
    assert kept.nbytes() < cached.nbytes()  # (tiny: 3×; Flux at 1024², README Memory)
    z_t = z_kept["samples"]
    content, style = kept.select(0, 1), kept.select(1, 1)
    plain = forward(comfy, model, z_t[:1], cond)
    recomputed = forward(comfy, ffa(comfy, model, content, style, alpha=0.7, beta=0.45, blocks="d1, s0"), z_t[:1], cond)
    _, full = invert(comfy, model, cond, start, precision="fp16")
    from_cache = forward(comfy, ffa(comfy, model, full.select(0, 1), full.select(1, 1), alpha=0.7, beta=0.45,
                                    blocks="d1, s0"), z_t[:1], cond)
    gap, effect = (recomputed - from_cache).abs().max().item(), (from_cache - plain).abs().max().item()
    print(f"recompute vs cache {gap:.2e}, FFA effect {effect:.2e}")
    assert effect > 1e-3 and gap < effect / 100, (gap, effect)


@pytest.mark.parametrize("kind, cfg", [("sd15", 1.0), ("sdxl", 1.0), ("sd15", 5.0)])
def test_recompute_equals_cache_on_the_unet(comfy, tiny_checkpoints, kind, cfg):
    """recompute on SD1.5/SDXL: the content and style rows beside the image give each self-attention the
    hidden states the cache keeps (fp16 cache: equal to its rounding)."""
    from harness.calm import calm
    from harness.sampling import encode
    from test_magicstyle import CALM, ksampler_advanced

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    model, empty = calm(model, CALM), encode(comfy, clip, "")
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    run = lambda **kw: comfy.run_node("LikenessInvert", model=model, conditioning=empty,  # noqa: E731
                                      latent={"samples": start}, steps=10, capture="qkv", layers="all",
                                      cache_on="auto", precision="fp16", **kw)
    (z_cache, cached), (z_kept, kept) = run(), run(mode="recompute")
    assert torch.equal(z_cache["samples"], z_kept["samples"]) and not kept.features
    z_t = {"samples": z_kept["samples"][:1]}
    negative = encode(comfy, clip, "blurry")  # cfg 5: cond and uncond chunks, then the two extra rows
    plain = ksampler_advanced(comfy, model, z_t, empty, cfg=cfg, negative=negative)
    results = [ksampler_advanced(comfy, ffa(comfy, model, bank.select(0, 1), bank.select(1, 1), alpha=0.7, beta=0.45,
                                            temperature=1.2), z_t, empty, cfg=cfg, negative=negative)
               for bank in (cached, kept)]
    gap, effect = (results[0] - results[1]).abs().max().item(), (results[0] - plain).abs().max().item()
    print(f"{kind} cfg {cfg}: recompute vs cache {gap:.2e}, FFA effect {effect:.2e}")
    assert effect > 1e-3 and gap < effect / 100, (gap, effect)


@pytest.mark.parametrize("kind, images", [("sd15", 1), ("sdxl", 1), ("sd15", 2)])
def test_recompute_beside_another_packs_image_prompt_equals_the_cache(comfy, tiny_checkpoints, kind, images):
    """An IPAdapter-style patch that gives cond and uncond chunks their own image embeds, on the
    model that inverts and samples (cfg 5): the extra rows are whole positive chunks, so the patch
    still finds the image's cond and uncond rows, and the content and style rows get what the
    inversion's forward got. Two images: two content rows and the style row, padded to two chunks
    of two."""
    from harness import ipadapter_like
    from harness.calm import calm
    from harness.sampling import encode
    from test_magicstyle import CALM, ksampler_advanced

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    layers = comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    model = ipadapter_like.apply(calm(model, CALM), keys, two_part=kind == "sd15", weight=0.7)
    empty, negative = encode(comfy, clip, ""), encode(comfy, clip, "blurry")
    start = torch.randn(images + 1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    run = lambda **kw: comfy.run_node("LikenessInvert", model=model, conditioning=empty,  # noqa: E731
                                      latent={"samples": start}, steps=10, capture="qkv", layers="all",
                                      cache_on="auto", precision="fp16", **kw)
    (_, cached), (z_kept, kept) = run(), run(mode="recompute")
    z_t = {"samples": z_kept["samples"][:images]}
    plain = ksampler_advanced(comfy, model, z_t, empty, cfg=5.0, negative=negative)
    results = [ksampler_advanced(comfy, ffa(comfy, model, bank.select(0, images), bank.select(images, 1), alpha=0.7,
                                            beta=0.45, temperature=1.2), z_t, empty, cfg=5.0, negative=negative)
               for bank in (cached, kept)]
    gap, effect = (results[0] - results[1]).abs().max().item(), (results[0] - plain).abs().max().item()
    print(f"{kind}, {images} image(s) beside an image prompt: recompute vs cache {gap:.2e}, FFA effect {effect:.2e}")
    assert effect > 1e-3 and gap < effect / 100, (gap, effect)


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_dit_cache_formula_is_what_an_inversion_keeps(comfy, precision):
    """joint_cache_bytes (the README's Memory rows for Flux) against the bytes a real inversion of the tiny
    Flux keeps, on an odd latent (9×13: 5×7 tokens, the last row and column padded)."""
    joint = comfy.pack("attention.magicstyle.joint_ffa")
    model, cond = tiny_dit.tiny_flux(), tiny_dit.flux_conditioning()
    _, bank = invert(comfy, model, cond, latents(2, size=(9, 13)), steps=4, precision=precision)
    # 4 blocks; per image, block and timestep: 35 tokens × (Q, K, V of 32) at 2 or 1 bytes, + a 4-byte scale at fp8
    by_hand = len(bank.timesteps) * 2 * 4 * (35 * 3 * 32 * {"fp16": 2, "fp8": 1}[precision] + (4 if precision == "fp8" else 0))
    assert bank.nbytes() == by_hand == joint.joint_cache_bytes(32, 4, 35, len(bank.timesteps), 2, precision)
