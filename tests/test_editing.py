"""Portrait editing without an MCDM: Eq. 2 pair guider, Eq. 3 mask-guided guider, mask math."""

from __future__ import annotations

import pytest
import torch

from harness.sampling import encode


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    return comfy.load_checkpoint(tiny_checkpoints["sd15"])


def sample(comfy, guider, latent, steps=3, denoise=1.0, seed=5):
    model = guider.model_patcher
    (sigmas,) = comfy.run_node("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=denoise)
    (noise,) = comfy.run_node("RandomNoise", noise_seed=seed)
    (sampler,) = comfy.run_node("KSamplerSelect", sampler_name="euler")
    out, _ = comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                            latent_image=latent)
    return out["samples"]


def cfg_guider(comfy, model, positive, negative, cfg=7.5):
    return comfy.run_node("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)[0]


def mask_guided(comfy, model, target, source, negative, mask, **overrides):
    settings = dict(cfg=7.5, mode="noise", source_latent=None)
    settings.update(overrides)
    return comfy.run_node("LikenessMaskGuidedGuider", model=model, target=target, source=source, negative=negative,
                          mask=mask, **settings)[0]


def test_mask_of_ones_is_the_target_only_edit_and_zeros_the_source_only(comfy, sd15):
    model, clip, _ = sd15
    target, source, negative = (encode(comfy, clip, t) for t in ("a cartoon portrait", "a photo portrait", "blurry"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    ones, zeros = torch.ones(64, 64), torch.zeros(64, 64)
    target_only = sample(comfy, cfg_guider(comfy, model, target, negative), latent, denoise=0.5)
    source_only = sample(comfy, cfg_guider(comfy, model, source, negative), latent, denoise=0.5)
    assert not torch.allclose(target_only, source_only)
    assert torch.allclose(sample(comfy, mask_guided(comfy, model, target, source, negative, ones), latent,
                                 denoise=0.5), target_only, atol=1e-5)
    assert torch.allclose(sample(comfy, mask_guided(comfy, model, target, source, negative, zeros), latent,
                                 denoise=0.5), source_only, atol=1e-5)


def test_half_mask_edits_only_its_half(comfy, sd15):
    model, clip, _ = sd15
    target, source, negative = (encode(comfy, clip, t) for t in ("a cartoon portrait", "a photo portrait", "blurry"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    right = torch.zeros(64, 64)
    right[:, 32:] = 1
    # One Euler step is pointwise in the prediction, so each half follows its own side
    # exactly (later steps see the whole blended latent through the UNet's receptive field).
    blended = sample(comfy, mask_guided(comfy, model, target, source, negative, right), latent, steps=1)
    target_only = sample(comfy, cfg_guider(comfy, model, target, negative), latent, steps=1)
    source_only = sample(comfy, cfg_guider(comfy, model, source, negative), latent, steps=1)
    # values reach ~200 (a random UNet at cfg 7.5): float32 rounding of different batch sizes
    assert torch.allclose(blended[..., 4:], target_only[..., 4:], rtol=1e-5, atol=1e-3)
    assert torch.allclose(blended[..., :4], source_only[..., :4], rtol=1e-5, atol=1e-3)
    assert not torch.allclose(blended[..., :4], target_only[..., :4], atol=1e-2)


def test_latent_mode_keeps_the_source_outside_the_mask(comfy, sd15):
    model, clip, vae = sd15
    target, source, negative = (encode(comfy, clip, t) for t in ("a cartoon portrait", "a photo portrait", "blurry"))
    source_latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    guider = mask_guided(comfy, model, target, source, negative, mask, mode="latent", source_latent=source_latent)
    edited = sample(comfy, guider, source_latent, steps=4, denoise=0.6)
    assert torch.allclose(edited[..., :4], source_latent["samples"][..., :4], atol=1e-4)
    assert not torch.allclose(edited[..., 4:], source_latent["samples"][..., 4:], atol=1e-2)
    with pytest.raises(ValueError, match="source_latent"):
        mask_guided(comfy, model, target, source, negative, mask, mode="latent")


@pytest.mark.parametrize("family, cfg", [("sd15", 7.5), ("sdxl", 5.0)])
def test_pair_guider_without_shared_prompt_gives_each_half_its_own_prompt(comfy, tiny_checkpoints, family, cfg):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[family])
    shared, left, right, negative = (encode(comfy, clip, t) for t in
                                     ("a portrait", "a man in a suit", "a man in armour", "blurry"))
    latent = {"samples": torch.zeros(1, 4, 8, 16)}
    (pair,) = comfy.run_node("LikenessPairGuider", model=model, shared=shared, source=left, target=right,
                             negative=negative, s_d=0.0, s_a=1.0, s_b=1.0, cfg=cfg)
    # one step: each half's prediction is exactly its own prompt's (see the mask test)
    both = sample(comfy, pair, latent, steps=1)
    only_left = sample(comfy, cfg_guider(comfy, model, left, negative, cfg=cfg), latent, steps=1)
    only_right = sample(comfy, cfg_guider(comfy, model, right, negative, cfg=cfg), latent, steps=1)
    # values reach ~200 (a random UNet at cfg 7.5): float32 rounding of different batch sizes
    assert torch.allclose(both[..., :8], only_left[..., :8], rtol=1e-5, atol=1e-3)
    assert torch.allclose(both[..., 8:], only_right[..., 8:], rtol=1e-5, atol=1e-3)
    assert not torch.allclose(only_left[..., 8:], only_right[..., 8:], atol=1e-2)


def test_split_pair_gives_the_two_halves(comfy):
    pair = torch.rand(2, 32, 64, 3)
    left, right = comfy.run_node("LikenessSplitPair", pair=pair)
    assert torch.equal(left, pair[:, :, :32]) and torch.equal(right, pair[:, :, 32:])
    with pytest.raises(ValueError, match="even width"):
        comfy.run_node("LikenessSplitPair", pair=torch.rand(1, 8, 9, 3))


def test_mask_math_normalises_blurs_and_thresholds(comfy):
    editing = comfy.pack("attention.editing")
    difference = torch.zeros(1, 1, 16, 16)
    difference[..., 4:12, 4:12] = 2.0
    difference[..., 0, 0] = -1.0
    minmax = editing.normalise(difference, "min-max")
    assert minmax.min() == 0 and minmax.max() == 1
    clamped = editing.normalise(difference.abs(), "clamp-3x-mean")
    assert clamped.max() == 1 and torch.allclose(clamped[..., 8, 8], torch.tensor(1.0))
    blurred = editing.gaussian_blur(minmax, 5)
    assert torch.allclose(blurred.sum(), minmax.sum(), rtol=0.05)  # blur moves mass, keeps it
    assert 0 < blurred[..., 3, 8] < 1 and blurred[..., 8, 8] > 0.9  # soft edge, solid inside
    assert torch.equal(editing.gaussian_blur(minmax, 1), minmax)
    diffs = difference.abs().expand(3, 1, 4, 16, 16)  # 3 seeds, 4 channels
    mask = editing.edit_mask(diffs, normalisation="min-max", blur=5, threshold=0.2)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask[..., 8, 8] == 1 and mask[..., 15, 15] == 0


def test_edit_mask_uses_n_different_noises_and_finds_the_change(comfy, sd15, monkeypatch):
    model, clip, _ = sd15
    editing = comfy.pack("attention.editing")
    source, target = encode(comfy, clip, "a photo portrait"), encode(comfy, clip, "a cartoon portrait")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    differences, noises = editing.noise_differences(model, latent, source, target, seeds=4, strength=0.5)
    assert differences.shape == (4, 1, 4, 8, 8) and len(noises) == 4
    assert all(not torch.equal(noises[i], noises[j]) for i in range(4) for j in range(i + 1, 4))
    assert differences.abs().sum() > 0
    same, _ = editing.noise_differences(model, latent, source, source, seeds=2, strength=0.5)
    assert same.abs().max() == 0, "the same prompt on both sides changes nothing"
    (mask,) = comfy.run_node("LikenessEditMask", model=model, latent={"samples": latent}, source=source,
                             target=target, seeds=4, strength=0.5, blur=5, threshold=0.2, normalisation="min-max",
                             seed=0)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}


def uncond_contexts(comfy, guider, latent, sigmas) -> tuple[list, list]:
    """Cross-attention contexts of the rows a sampling step marks uncond (cond_or_uncond 1),
    and of the other rows, seen by a UNet wrapper on the guider's model."""
    seen = []

    def wrapper(apply_model, args):
        labels = args["c"]["transformer_options"]["cond_or_uncond"]
        context = args["c"]["c_crossattn"]
        per_label = context.shape[0] // len(labels)
        seen.extend((label, context[i * per_label]) for i, label in enumerate(labels))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model, options = guider.model_patcher, guider.model_options
    guider.model_patcher = model.clone()
    guider.model_patcher.set_model_unet_function_wrapper(wrapper)
    guider.model_options = guider.model_patcher.model_options
    try:
        (noise,) = comfy.run_node("RandomNoise", noise_seed=1)
        (sampler,) = comfy.run_node("KSamplerSelect", sampler_name="euler")
        comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                       latent_image=latent)
    finally:
        guider.model_patcher, guider.model_options = model, options
    return [c for label, c in seen if label == 1], [c for label, c in seen if label != 1]


def test_only_the_negative_rows_are_marked_uncond(comfy, sd15):
    """Patches (and other packs) read cond_or_uncond 1 as the negative."""
    model, clip, _ = sd15
    shared, source, target, negative = (encode(comfy, clip, t) for t in ("two photos", "a photo", "a cartoon",
                                                                          "blurry"))
    latent = {"samples": torch.zeros(1, 4, 8, 16)}
    sigmas = model.model.model_sampling.sigma(torch.tensor([900.0, 600.0]))
    pair = comfy.run_node("LikenessPairGuider", model=model, shared=shared, source=source, target=target,
                          negative=negative, s_d=0.1, s_a=0.9, s_b=0.9, cfg=7.5)[0]
    masked = mask_guided(comfy, model, target, source, negative, torch.ones(64, 128))
    for guider, prompts in ((pair, 3), (masked, 2)):
        uncond, cond = uncond_contexts(comfy, guider, latent, sigmas)
        assert uncond and all(torch.equal(c, negative[0][0][0]) for c in uncond)
        assert len(cond) == prompts and not any(torch.equal(c, negative[0][0][0]) for c in cond)


def test_edit_mask_and_mask_guided_guider_work_on_sdxl(comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sdxl"])
    left, right, negative = (encode(comfy, clip, t) for t in ("a man in a suit", "a man in armour", "blurry"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))}
    (mask,) = comfy.run_node("LikenessEditMask", model=model, latent=latent, source=left, target=right, seeds=3,
                             strength=0.5, blur=5, threshold=0.2, normalisation="clamp-3x-mean", seed=0)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    target_only = sample(comfy, cfg_guider(comfy, model, right, negative, cfg=5.0), latent, denoise=0.5)
    edited = sample(comfy, mask_guided(comfy, model, right, left, negative, torch.ones(64, 64), cfg=5.0), latent,
                    denoise=0.5)
    assert torch.allclose(edited, target_only, rtol=1e-5, atol=1e-3)
