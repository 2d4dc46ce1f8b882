"""Portrait editing without an MCDM: Eq. 2 pair guider, Eq. 3 mask-guided guider, mask math."""

from __future__ import annotations

import pytest
import torch

from harness.sampling import encode


def differs(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-2) -> bool:
    """a differs from b by more than ``floor`` of b's largest value: far above the float32
    rounding of running rows in batches of another size (~1e-5 relative)."""
    return bool((a - b).abs().max() > floor * b.abs().max())


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
    assert differs(target_only, source_only)
    assert torch.allclose(sample(comfy, mask_guided(comfy, model, target, source, negative, ones), latent,
                                 denoise=0.5), target_only, atol=1e-5)
    # The node refuses a mask of all 0 (it edits nothing); the guider it builds still blends as Eq. 3 says.
    with pytest.raises(ValueError, match="mask='a mask of all 0'.*expected a mask with 1 where to edit"):
        mask_guided(comfy, model, target, source, negative, zeros)
    guider = comfy.pack("attention.portrait_editing.editing_guiders").MaskGuidedCFGGuider(model)
    guider.set_conds(target, source, negative)
    guider.set_cfg(7.5)
    guider.set_edit(zeros, "noise")
    assert torch.allclose(sample(comfy, guider, latent, denoise=0.5), source_only, atol=1e-5)


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
    assert differs(blended[..., :4], target_only[..., :4])


def noised_start(comfy, model, latent, sigma, seed=5) -> torch.Tensor:
    """The sampler's x at ``sigma``: the latent in model space plus σ·n, n = RandomNoise(seed)'s noise
    (ComfyUI's noise_scaling for an ε model below its largest sigma)."""
    (noise,) = comfy.run_node("RandomNoise", noise_seed=seed)
    return model.model.process_latent_in(latent["samples"]) + sigma * noise.generate_noise(latent)


def test_latent_mode_keeps_the_noised_source_outside_the_mask(comfy, sd15):
    """Outside the mask the latent is the source noised to each step with the run's noise
    (s + σᵢ·n), and the source itself at the end; inside, the edit."""
    model, clip, vae = sd15
    target, source, negative = (encode(comfy, clip, t) for t in ("a cartoon portrait", "a photo portrait", "blurry"))
    source_latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    guider = mask_guided(comfy, model, target, source, negative, mask, mode="latent", source_latent=source_latent)
    (sigmas,) = comfy.run_node("BasicScheduler", model=model, scheduler="normal", steps=10, denoise=0.6)
    s = model.model.process_latent_in(source_latent["samples"])
    n = (noised_start(comfy, model, source_latent, sigmas[0]) - s) / sigmas[0]
    for stop in (2, 4, 6):  # latent after `stop` Euler steps, at sigma sigmas[stop] > 0
        run = comfy.run_node("SamplerCustomAdvanced", noise=comfy.run_node("RandomNoise", noise_seed=5)[0],
                             guider=guider, sampler=comfy.run_node("KSamplerSelect", sampler_name="euler")[0],
                             sigmas=sigmas[: stop + 1], latent_image=source_latent)[0]["samples"]
        x = model.model.process_latent_in(run)
        expected = s + sigmas[stop] * n
        assert torch.allclose(x[..., :3], expected[..., :3], rtol=1e-5, atol=1e-4), stop
        assert differs(x[..., :3], s[..., :3])  # still noisy: not the clean source
        assert differs(x[..., 5:], expected[..., 5:])  # the edited half left that trajectory
    edited = sample(comfy, guider, source_latent, steps=4, denoise=0.6)
    assert torch.allclose(edited[..., :3], source_latent["samples"][..., :3], atol=1e-4)
    assert differs(edited[..., 5:], source_latent["samples"][..., 5:])
    with pytest.raises(ValueError, match="source_latent"):
        mask_guided(comfy, model, target, source, negative, mask, mode="latent")


class GivenNoise:
    """A NOISE input that gives one fixed tensor (SamplerCustomAdvanced's interface)."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise, self.seed = noise, 0

    def generate_noise(self, latent: dict) -> torch.Tensor:
        return self.noise.clone()


def x0_of(comfy, guider, latent, sigma, seed=5, noise=None) -> torch.Tensor:
    """The guider's denoised prediction at ``sigma``, model space: one Euler step to sigma 0 lands on
    x + (x − x0)/σ·(0 − σ) = x0 (x = the latent + σ·the noise of ``seed``, or ``noise``)."""
    out = one_euler_step(comfy, guider, latent, torch.tensor([float(sigma), 0.0]), seed, noise)
    return guider.model_patcher.model.process_latent_in(out)


def one_euler_step(comfy, guider, latent, sigmas, seed=5, given=None):
    noise = GivenNoise(given) if given is not None else comfy.run_node("RandomNoise", noise_seed=seed)[0]
    (sampler,) = comfy.run_node("KSamplerSelect", sampler_name="euler")
    out, _ = comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                            latent_image=latent)
    return out["samples"]


@pytest.mark.parametrize("mode", ["noise", "latent"])
def test_a_soft_mask_blends_the_eps_predictions(comfy, sd15, mode):
    """Eq. 3 at M = 0.3 everywhere: x − σ·(0.3·ε̃_target + 0.7·ε̃_source), each ε̃ from its own CFG
    run (latent mode: the source side is the clean source latent, ε = (x − s)/σ)."""
    model, clip, _ = sd15
    target, source, negative = (encode(comfy, clip, t) for t in ("a cartoon portrait", "a photo portrait", "blurry"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))}
    sigma = model.model.model_sampling.sigma(torch.tensor([500.0]))[0]
    x = noised_start(comfy, model, latent, sigma)
    # cfg 20: the tiny model's two prompts then differ by ~6% of the prediction, so each side's
    # share (30%, 70%) is far above the floor of `differs`
    eps_target = (x - x0_of(comfy, cfg_guider(comfy, model, target, negative, cfg=20.0), latent, sigma)) / sigma
    if mode == "noise":
        eps_source = (x - x0_of(comfy, cfg_guider(comfy, model, source, negative, cfg=20.0), latent, sigma)) / sigma
    else:
        eps_source = (x - model.model.process_latent_in(latent["samples"])) / sigma
    guider = mask_guided(comfy, model, target, source, negative, torch.full((64, 64), 0.3), mode=mode,
                         source_latent=latent, cfg=20.0)
    got = x0_of(comfy, guider, latent, sigma)
    expected = x - sigma * (0.3 * eps_target + 0.7 * eps_source)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-3), (got - expected).abs().max()
    for one_side in (eps_target, eps_source):
        assert differs(got, x - sigma * one_side)


@pytest.mark.parametrize("family, cfg", [("sd15", 7.5), ("sdxl", 5.0)])
def test_pair_guider_is_eq_2_for_weights_that_do_not_sum_to_one(comfy, tiny_checkpoints, family, cfg):
    """s'_d, s'_a, s'_b = 0.5/0.9/0.7 (1.4 on the left half, 1.2 on the right): one step equals
    x − σ·Σ wᵢ·ε̃ᵢ with each ε̃ᵢ from its own CFG run."""
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[family])
    shared, left, right, negative = (encode(comfy, clip, t) for t in
                                     ("a portrait", "a man in a suit", "a man in armour", "blurry"))
    latent = {"samples": torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(8))}
    sigma = model.model.model_sampling.sigma(torch.tensor([600.0]))[0]
    x = noised_start(comfy, model, latent, sigma)
    eps = {name: (x - x0_of(comfy, cfg_guider(comfy, model, prompt, negative, cfg=cfg), latent, sigma)) / sigma
           for name, prompt in (("shared", shared), ("left", left), ("right", right))}
    on_left = torch.zeros_like(x)
    on_left[..., :8] = 1
    expected = x - sigma * (0.5 * eps["shared"] + 0.9 * on_left * eps["left"] + 0.7 * (1 - on_left) * eps["right"])
    (pair,) = comfy.run_node("LikenessPairGuider", model=model, shared=shared, source=left, target=right,
                             negative=negative, s_d=0.5, s_a=0.9, s_b=0.7, cfg=cfg)
    got = x0_of(comfy, pair, latent, sigma)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-3), (got - expected).abs().max()
    # combining the x0 predictions with the same weights is another prediction here
    x0 = {name: x - sigma * e for name, e in eps.items()}
    naive = 0.5 * x0["shared"] + 0.9 * on_left * x0["left"] + 0.7 * (1 - on_left) * x0["right"]
    assert differs(got, naive)


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
    assert differs(only_left[..., 8:], only_right[..., 8:])


def test_split_pair_gives_the_two_halves(comfy):
    pair = torch.rand(2, 32, 64, 3)
    left, right = comfy.run_node("LikenessSplitPair", pair=pair)
    assert torch.equal(left, pair[:, :, :32]) and torch.equal(right, pair[:, :, 32:])
    with pytest.raises(ValueError, match="even width"):
        comfy.run_node("LikenessSplitPair", pair=torch.rand(1, 8, 9, 3))


def test_mask_math_normalises_blurs_and_thresholds(comfy):
    editing = comfy.pack("attention.portrait_editing.editing_math")
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
    editing = comfy.pack("attention.portrait_editing.editing_math")
    source, target = encode(comfy, clip, "a photo portrait"), encode(comfy, clip, "a cartoon portrait")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    differences, noises = editing.noise_differences(model, latent, source, target, seeds=4, strength=0.5)
    assert differences.shape == (4, 1, 4, 8, 8) and len(noises) == 4
    assert all(differs(noises[i], noises[j], floor=0.5) for i in range(4) for j in range(i + 1, 4))
    # Each map is |ε(p_a) − ε(p_b)| at that noise: ε = (x − x0)/σ from one plain cfg-1 run per prompt
    # (one Euler step to sigma 0 lands on x0), started from the latent noised with that noise.
    sigma = model.model.model_sampling.sigma(torch.tensor([0.5 * 999.0]))[0]
    x = model.model.process_latent_in(latent) + sigma * torch.stack(noises)
    for index in (0, 3):
        x0 = [x0_of(comfy, cfg_guider(comfy, model, prompt, prompt, cfg=1.0), {"samples": latent}, sigma,
                    noise=noises[index]) for prompt in (source, target)]
        expected = ((x0[0] - x0[1]) / sigma).abs()
        eps = ((x[index] - x0[0]) / sigma).abs().max()
        # a small difference of two ε of size ~3 computed in batches of other sizes: rounding ~1e-7·ε
        assert (differences[index] - expected).abs().max() <= 1e-5 * eps, index
        # the tiny model's prompts move ε (no CFG) by ~0.5%: a thousand times that rounding
        assert expected.max() > 1e-3 * eps
    same, _ = editing.noise_differences(model, latent, source, source, seeds=2, strength=0.5)
    assert same.abs().max() == 0, "the same prompt on both sides changes nothing"
    mask, _ = comfy.run_node("LikenessEditMask", model=model, latent={"samples": latent}, source=source,
                             target=target, seeds=4, strength=0.5, blur=5, threshold=0.2, normalisation="min-max",
                             seed=0)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}


def row_inputs(comfy, guider, latent, sigmas) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(cond_or_uncond label, cross-attention context, concatenated latent or None) of every row
    the guider's model is called with during sampling, seen by a UNet wrapper."""
    seen = []

    def wrapper(apply_model, args):
        labels = args["c"]["transformer_options"]["cond_or_uncond"]
        context, concat = args["c"]["c_crossattn"], args["c"].get("c_concat")
        per_label = context.shape[0] // len(labels)
        seen.extend((label, context[i * per_label], None if concat is None else concat[i * per_label])
                    for i, label in enumerate(labels))
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
    return seen


def uncond_contexts(comfy, guider, latent, sigmas) -> tuple[list, list]:
    """Cross-attention contexts of the rows a sampling step marks uncond (cond_or_uncond 1),
    and of the other rows."""
    seen = row_inputs(comfy, guider, latent, sigmas)
    return [c for label, c, _ in seen if label == 1], [c for label, c, _ in seen if label != 1]


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
    mask, _ = comfy.run_node("LikenessEditMask", model=model, latent=latent, source=left, target=right, seeds=3,
                             strength=0.5, blur=5, threshold=0.2, normalisation="clamp-3x-mean", seed=0)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    target_only = sample(comfy, cfg_guider(comfy, model, right, negative, cfg=5.0), latent, denoise=0.5)
    edited = sample(comfy, mask_guided(comfy, model, right, left, negative, torch.ones(64, 64), cfg=5.0), latent,
                    denoise=0.5)
    assert torch.allclose(edited, target_only, rtol=1e-5, atol=1e-3)


def test_edit_mask_overlay_tints_exactly_the_masked_pixels(comfy, sd15):
    model, clip, _ = sd15
    source, target = encode(comfy, clip, "a photo portrait"), encode(comfy, clip, "a cartoon portrait")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    picture = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    mask, overlay = comfy.run_node("LikenessEditMask", model=model, latent={"samples": latent}, source=source,
                                   target=target, seeds=2, strength=0.5, blur=5, threshold=0.2,
                                   normalisation="min-max", seed=0, image=picture)
    assert overlay.shape == (1, 64, 64, 3) and 0 < mask.mean() < 1
    inside, outside = mask[0] > 0.5, mask[0] < 0.5
    assert torch.equal(overlay[0][outside], picture[0][outside])
    red = torch.tensor([1.0, 0.15, 0.1])
    torch.testing.assert_close(overlay[0][inside], picture[0][inside] * 0.5 + red * 0.5)
    _, alone = comfy.run_node("LikenessEditMask", model=model, latent={"samples": latent}, source=source,
                              target=target, seeds=2, strength=0.5, blur=5, threshold=0.2, normalisation="min-max",
                              seed=0)
    assert alone.shape == (1, 64, 64, 3)
