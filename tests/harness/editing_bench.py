"""Portrait-editing costs on a full-size random SD1.5 (tests/tools/benchmark.py)."""

from __future__ import annotations

import time

import torch

from .magicstyle_bench import empty_conditioning


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(model, attention: dict, *, size: int, steps: int) -> dict:
    import comfy.samplers

    editing, guiders = attention["editing_math"], attention["editing_guiders"]
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(8))
    source = empty_conditioning()
    target = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(9)), {}]]
    negative = empty_conditioning()
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps * 2)[steps:]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(10))

    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(target, negative)
    plain.set_cfg(7.5)
    masked = guiders.MaskGuidedCFGGuider(model)
    masked.set_conds(target, source, negative)
    masked.set_cfg(7.5)
    masked.set_edit(torch.ones(size, size), "noise")
    plain.sample(noise, latent, sampler, sigmas[-3:], disable_pbar=True, seed=0)  # loads the model
    img2img = min(timed(lambda: plain.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0))
                  for _ in range(2))
    guided = min(timed(lambda: masked.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0))
                 for _ in range(2))
    mask_seconds = timed(lambda: editing.noise_differences(model, latent, source, target, seeds=10, strength=0.5))
    step = img2img / steps
    return {"size": size, "steps": steps, "img2img_s": round(img2img, 3), "mask_guided_s": round(guided, 3),
            "mask_guided_over_img2img": round(guided / img2img, 3), "mask_10_seeds_s": round(mask_seconds, 3),
            "mask_over_one_sampling_step": round(mask_seconds / step, 3)}


def measure_mcdm(model, attention: dict, *, size: int, steps: int) -> dict:
    """An MCDM step (Eq. 1's four rows) and a mask-guided MCDM step (five rows) against a
    plain CFG step (two rows) of the same 8-channel model."""
    import comfy.samplers

    guiders, mcdm = attention["editing_guiders"], attention["mcdm"]
    generator = torch.Generator().manual_seed(11)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    image_tokens = torch.randn(1, 50, 768, generator=generator)
    text = [[torch.randn(1, 77, 768, generator=generator), {}]]
    positive = mcdm.with_image(text, image_tokens, latent)
    source = mcdm.with_image([[torch.randn(1, 77, 768, generator=generator), {}]], image_tokens, latent)
    negative = mcdm.with_image([[torch.zeros(1, 77, 768), {}]], torch.zeros(1, 50, 768), None)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = torch.randn(latent.shape, generator=generator)
    zero = torch.zeros_like(latent)

    def sampled(guider) -> float:
        return timed(lambda: guider.sample(noise, zero, sampler, sigmas, disable_pbar=True, seed=0))

    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(positive, negative)
    plain.set_cfg(7.5)
    three = guiders.MCDMCFGGuider(model)
    three.set_conds(positive, negative)
    three.set_scales(3.0, 2.0, 4.0)
    masked = guiders.MCDMCFGGuider(model)
    masked.set_conds(positive, negative, source, torch.ones(size, size))
    masked.set_scales(3.0, 2.0, 4.0)
    plain.sample(noise, zero, sampler, sigmas[-3:], disable_pbar=True, seed=0)  # loads the model
    cfg_s = min(sampled(plain) for _ in range(2))
    three_s = min(sampled(three) for _ in range(2))
    masked_s = min(sampled(masked) for _ in range(2))
    return {"size": size, "steps": steps, "cfg_s": round(cfg_s, 3), "mcdm_s": round(three_s, 3),
            "mcdm_over_cfg": round(three_s / cfg_s, 3), "mask_guided_mcdm_s": round(masked_s, 3),
            "mask_guided_mcdm_over_cfg": round(masked_s / cfg_s, 3)}
