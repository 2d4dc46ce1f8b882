"""DDIM inversion through ComfyUI's own sampling (Euler inversion of the flow on a DiT).

Euler over the flipped ``ddim_uniform`` sigmas with zero noise and cfg 1 is
deterministic DDIM inversion for an eps model; a forward pass with the core
KSamplerAdvanced (euler, ddim_uniform, same steps, add_noise off) then walks
the same sigmas back. Inversion evaluates the UNet at σ_0…σ_{N−1} while the
forward pass evaluates at σ_N…σ_1, so the schedule gets σ_N once more at the
end: a zero-length step that moves nothing but lets the capture see σ_N.
On a rectified-flow model (Flux.1, SD3.5) the same Euler steps over the model's own flipped
sigmas integrate its velocity field backwards: the same code inverts it (cfg 1; Flux-dev's
distilled guidance is the conditioning's, as the model takes it).
"""

from __future__ import annotations

import logging

import torch

from ..shared.layer_table import BlockKey
from ..shared.sigmas import model_sampling_of
from .feature_bank import PRECISIONS, FeatureBank, FeatureCapture, cache_bytes, model_fingerprint, timestep_key
from .ffa import free_for_run, keep_on_device

FLIP_FLOOR = 1e-4  # FlipSigmas' stand-in for the final 0, where the model is not defined
CAPTURES = ("qkv", "kv", "none")
MODES = ("cache", "recompute")  # keep the features, or only the inverted latents (recompute.py)
AUTO_PRECISION = "auto"
PRECISION_CHOICES = (AUTO_PRECISION, *PRECISIONS)
GB = 1e9
log = logging.getLogger("likeness")


def auto_precision(fp16_bytes: int, free_bytes: float) -> str:
    """MagicStyle caches its features at full precision: fp16 where a run would keep the fp16 cache
    on its device by cache_on=auto's rule (ffa.keep_on_device), fp8 (half the bytes) otherwise."""
    return "fp16" if keep_on_device("auto", fp16_bytes, free_bytes) else "fp8"


def auto_precision_chooser(model, layers: list[BlockKey], latent_shape, timesteps: int):
    """What FeatureCapture calls at its first capture (the run has loaded the model then): the
    precision for this inversion, logged. The run it sizes for holds this inversion's images and one
    image beside them (a style for a content batch, a content for a style), from the exact formula
    (feature_bank.cache_bytes)."""
    images = int(latent_shape[0]) + 1
    if is_dit(model):
        from .joint_ffa import dit_hidden, image_tokens, joint_cache_bytes

        fp16_bytes = joint_cache_bytes(dit_hidden(model), len(layers), image_tokens(model, tuple(latent_shape[-2:])),
                                       timesteps, images, "fp16")
    else:
        fp16_bytes = cache_bytes(model.model.model_config.unet_config, layers, tuple(latent_shape[-2:]), timesteps,
                                 images, "fp16")

    def choose() -> str:
        free = free_for_run(model.load_device)
        chosen = auto_precision(fp16_bytes, free)
        fits = "fits in" if chosen == "fp16" else "does not fit in"
        log.info(f"Likeness Invert: precision auto chose {chosen}: the fp16 features of {images} images "
                 f"({fp16_bytes / GB:.2f} GB) {fits} half of the {max(free, 0) / GB:.2f} GB free for the run")
        return chosen

    return choose


def is_dit(model) -> bool:
    """A joint-attention model (Flux.1, SD3.5): captured and fused in joint_ffa.py."""
    from ..shared.layer_table import DIT_FAMILIES, family_of

    return family_of(model) in DIT_FAMILIES


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
           disable_pbar: bool = False, mode: str = "cache") -> tuple[torch.Tensor, FeatureBank | None]:
    """(z_T, features). The model passed in is cloned, never changed."""
    import comfy.sample
    import comfy.samplers

    if capture not in CAPTURES:
        raise ValueError(f"capture={capture!r}: expected one of {', '.join(CAPTURES)}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    forward = forward_sigmas(model, steps)
    schedule = inversion_sigmas(forward)
    sampling = model_sampling_of(model)
    patched = model.clone()
    recorder = None
    if capture != "none" and mode == "recompute":
        import comfy.patcher_extension

        from .recompute import TrajectoryRecorder

        recorder = TrajectoryRecorder(sampling, [sampling.timestep(s) for s in forward[:-1]])
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "likeness_trajectory", recorder)
    elif capture != "none":
        wanted = [sampling.timestep(s) for s in forward[:-1]]
        if precision == AUTO_PRECISION:
            precision = auto_precision_chooser(model, layers, latent_image.shape, len(wanted))
        if is_dit(model):
            # Rectified flow: the same Euler steps over the flipped sigmas integrate the velocity field
            # backwards; features come from joint attention (after modulation, QK-norm, RoPE).
            from .joint_ffa import JointCapture, capture_clone

            recorder = JointCapture(layers, sampling, storage_device, wanted=wanted, precision=precision)
            patched = capture_clone(model, recorder)
        else:
            recorder = FeatureCapture(layers, sampling, storage_device, wanted=wanted, precision=precision)
            patched.set_model_attn1_patch(recorder)
    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent_image)
    noise = torch.zeros_like(latent_image)
    try:
        samples = comfy.sample.sample_custom(patched, noise, 1.0, comfy.samplers.sampler_object("euler"), schedule,
                                             positive, positive, latent_image, callback=callback,
                                             disable_pbar=disable_pbar, seed=0)
    except BaseException:
        if hasattr(recorder, "discard"):
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
        steps=steps, capture=capture, dtype=getattr(recorder, "precision", None) or "fp16")
    bank.latent = samples.detach().cpu()
    if mode == "recompute":
        bank.trajectory = recorder.trajectory
        if len(bank.trajectory.latents) != len(bank.timesteps):
            raise RuntimeError(f"inversion kept {len(bank.trajectory.latents)} of {len(bank.timesteps)} latents: "
                               "another patch on this model skipped Likeness' recorder")
        return samples, bank
    bank.features = recorder.finish()
    if getattr(model.load_device, "type", "cpu") == "cuda" and torch.device(storage_device).type == "cpu":
        # Page-locked: a run moves it to the GPU (or streams it) without an extra copy.
        bank.features = {key: stored.pinned() for key, stored in bank.features.items()}
    expected = len(bank.timesteps) * len(bank.layers)
    if len(bank.features) != expected:
        raise RuntimeError(f"inversion captured {len(bank.features)} of {expected} features: another patch "
                           "on this model skipped Likeness' capture (report this with your workflow)")
    return samples, bank
