"""MagicStyle measurements on a full-size, randomly initialised SD1.5 UNet.

Used by tests/benchmark.py (this machine's CPU) and tests/device_check.py
(a lent GPU). Figures are ratios from one run: these machines are noisy.
"""

from __future__ import annotations

import time

import torch

# ComfyUI's own SD1.5 UNet configuration (comfy/model_detection.py).
SD15_FULL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def full_sd15(initialise, in_channels: int = 4) -> object:
    """A ModelPatcher around a random full-size SD1.5 UNet, on ComfyUI's device and dtype
    (``in_channels`` 8: the MCDM / InstructPix2Pix model)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    device = comfy.model_management.get_torch_device()
    if in_channels == 4:
        config = comfy.supported_models.SD15(SD15_FULL_UNET)
    else:
        config = comfy.supported_models.SD15_instructpix2pix({**SD15_FULL_UNET, "in_channels": in_channels})
    dtype = comfy.model_management.unet_dtype(model_params=860_000_000,
                                              supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, device))
    model = config.get_model({}, device=device)
    initialise(model, 1234)
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def empty_conditioning(context_dim: int = 768) -> list:
    return [[torch.zeros(1, 77, context_dim), {}]]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward(model, latent, cond, steps, cfg, attention):
    """KSamplerAdvanced's path without the node: euler, ddim_uniform, no added noise."""
    import comfy.sample
    import comfy.samplers

    sigmas = attention["inversion"].forward_sigmas(model, steps)
    return comfy.sample.sample_custom(model, torch.zeros_like(latent), cfg, comfy.samplers.sampler_object("euler"),
                                      sigmas, cond, cond, latent, disable_pbar=True, seed=0)


def measure(model, attention: dict, *, size: int, steps: int, bytes_size: int | None = None,
            bytes_steps: int = 30) -> dict:
    """Cache bytes vs naive Q/K/V, FFA step time vs vanilla, batched vs sequential inversion.

    ``attention`` maps module names (inversion, ffa, schedule, unet_layers,
    feature_bank) to the pack's modules, however the caller imported them.
    """
    inversion, ffa, layers_module = attention["inversion"], attention["ffa"], attention["unet_layers"]
    schedule = attention["schedule"]
    storage = model.load_device
    cond = empty_conditioning()
    keys = layers_module.attention_keys(layers_module.diffusion_model_of(model))
    results: dict = {"size": size, "steps": steps}

    # Memory: a real content+style inversion at bytes_size, all layers and decoder only.
    if bytes_size:
        latent = torch.randn(2, 4, bytes_size // 8, bytes_size // 8)
        for name, chosen in (("all", keys), ("decoder", layers_module.select_keys(keys, "decoder"))):
            _, bank = inversion.invert(model, cond, latent, bytes_steps, capture="qkv", layers=chosen,
                                       storage_device="cpu", disable_pbar=True)
            content, style = bank.select(0, 1), bank.select(1, 1)
            naive = ffa.naive_qkv_bytes(content, style)
            # Both are one tensor per layer per timestep: exactly linear. (ComfyUI's
            # ddim_uniform gives 31 sigmas for 30 steps, so 31 timesteps.)
            per_30 = (len(inversion.forward_sigmas(model, 30)) - 1) / len(bank.timesteps)
            results[f"cache_bytes_{name}_30_steps"] = int(bank.nbytes() * per_30)
            results[f"naive_qkv_bytes_{name}_30_steps"] = int(naive * per_30)
            results[f"cache_ratio_{name}"] = round(bank.nbytes() / naive, 4)
            del bank, content, style

    latent = torch.randn(2, 4, size // 8, size // 8)
    # Batched content+style inversion vs two sequential ones.
    inversion.invert(model, cond, latent[:1], 2, capture="qkv", layers=keys, storage_device=storage,
                     disable_pbar=True)  # warm-up: loads the model
    _sync()
    start = time.perf_counter()
    z_t, bank = inversion.invert(model, cond, latent, steps, capture="qkv", layers=keys, storage_device=storage,
                                 disable_pbar=True)
    _sync()
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(2):
        inversion.invert(model, cond, latent[index:index + 1], steps, capture="qkv", layers=keys,
                         storage_device=storage, disable_pbar=True)
    _sync()
    sequential = time.perf_counter() - start
    results["inversion_batched_s"] = round(batched, 3)
    results["inversion_sequential_s"] = round(sequential, 3)
    results["inversion_batched_over_sequential"] = round(batched / sequential, 3)

    # Sampling steps: FFA vs vanilla, same latent, cfg 5, median of the steps.
    sampling = schedule.model_sampling_of(model)
    fusion = ffa.FeatureFusion(bank.select(0, 1), bank.select(1, 1), style_index=0, alpha=0.8, beta=0.2,
                               temperature=1.0, layers=keys, sigma_range=schedule.SigmaRange.always(),
                               model_sampling=sampling)
    patched = ffa.apply_ffa(model, fusion)
    start_latent = z_t[:1]
    timings = {}
    for name, candidate in (("vanilla", model), ("ffa", patched), ("vanilla_again", model), ("ffa_again", patched)):
        _sync()
        start = time.perf_counter()
        forward(candidate, start_latent, cond, steps, 5.0, attention)
        _sync()
        timings[name] = (time.perf_counter() - start) / steps
    vanilla = min(timings["vanilla"], timings["vanilla_again"])
    fused = min(timings["ffa"], timings["ffa_again"])
    results["vanilla_step_s"] = round(vanilla, 4)
    results["ffa_step_s"] = round(fused, 4)
    results["ffa_over_vanilla_step"] = round(fused / vanilla, 3)
    return results
