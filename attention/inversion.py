"""DDIM inversion through ComfyUI's own sampling.

Euler over the flipped ``ddim_uniform`` sigmas with zero noise and cfg 1 is
deterministic DDIM inversion for an eps model; a forward pass with the core
KSamplerAdvanced (euler, ddim_uniform, same steps, add_noise off) then walks
the same sigmas back. Inversion evaluates the UNet at σ_0…σ_{N−1} while the
forward pass evaluates at σ_N…σ_1, so the schedule gets σ_N once more at the
end: a zero-length step that moves nothing but lets the capture see σ_N.
"""

from __future__ import annotations

import torch

from .feature_bank import FeatureBank, FeatureCapture, model_fingerprint, timestep_key
from .schedule import model_sampling_of
from .unet_layers import BlockKey

FLIP_FLOOR = 1e-4  # FlipSigmas' stand-in for the final 0, where the model is not defined
CAPTURES = ("qkv", "kv", "none")


def forward_sigmas(model, steps: int) -> torch.Tensor:
    """What KSamplerAdvanced (ddim_uniform) visits: σ_N … σ_1, 0."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model_sampling_of(model), "ddim_uniform", steps).cpu().float()


def inversion_steps(model, steps: int) -> int:
    """Sampler steps an inversion takes (for its progress bar). ComfyUI's
    ddim_uniform may give one sigma more than asked (31 for 30 steps)."""
    return len(forward_sigmas(model, steps))


def inversion_sigmas(forward: torch.Tensor) -> torch.Tensor:
    flipped = forward.flip(0).clone()
    if flipped[0] == 0:
        flipped[0] = FLIP_FLOOR
    return torch.cat([flipped, flipped[-1:]])


def invert(model, positive, latent_image: torch.Tensor, steps: int, *, capture: str, layers: list[BlockKey],
           storage_device, precision: str = "fp8", callback=None,
           disable_pbar: bool = False) -> tuple[torch.Tensor, FeatureBank | None]:
    """(z_T, features). The model passed in is cloned, never changed."""
    import comfy.sample
    import comfy.samplers

    if capture not in CAPTURES:
        raise ValueError(f"capture={capture!r}: expected one of {', '.join(CAPTURES)}")
    forward = forward_sigmas(model, steps)
    schedule = inversion_sigmas(forward)
    sampling = model_sampling_of(model)
    patched = model.clone()
    recorder = None
    if capture != "none":
        recorder = FeatureCapture(layers, sampling, storage_device,
                                  wanted=[sampling.timestep(s) for s in forward[:-1]], precision=precision)
        patched.set_model_attn1_patch(recorder)
    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent_image)
    noise = torch.zeros_like(latent_image)
    try:
        samples = comfy.sample.sample_custom(patched, noise, 1.0, comfy.samplers.sampler_object("euler"), schedule,
                                             positive, positive, latent_image, callback=callback,
                                             disable_pbar=disable_pbar, seed=0)
    except BaseException:
        if recorder is not None:
            recorder.discard()
        raise
    if recorder is None:
        return samples, None
    bank = FeatureBank(
        layers=[tuple(k) for k in layers],
        timesteps=[timestep_key(sampling.timestep(s)) for s in forward[:-1]],
        sigmas=[float(s) for s in forward],
        latent_shape=list(latent_image.shape),
        model_fingerprint=model_fingerprint(model),
        steps=steps, capture=capture, dtype=precision)
    bank.features = recorder.finish()
    if getattr(model.load_device, "type", "cpu") == "cuda" and torch.device(storage_device).type == "cpu":
        # Page-locked: a run moves it to the GPU (or streams it) without an extra copy.
        bank.features = {key: stored.pinned() for key, stored in bank.features.items()}
    bank.latent = samples.detach().cpu()
    expected = len(bank.timesteps) * len(bank.layers)
    if len(bank.features) != expected:
        raise RuntimeError(f"inversion captured {len(bank.features)} of {expected} features: another patch "
                           "on this model skipped Likeness' capture (report this with your workflow)")
    return samples, bank
