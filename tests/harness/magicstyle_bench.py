"""MagicStyle measurements on a full-size, randomly initialised SD1.5 UNet.

Used by tests/tools/benchmark.py (this machine's CPU) and tests/tools/device_check.py
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


# ComfyUI's own SDXL UNet configuration (comfy/model_detection.py).
SDXL_FULL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def full_sdxl(initialise) -> object:
    """A ModelPatcher around a random full-size SDXL UNet, its weights in fp16 (computing in
    ComfyUI's dtype for the device: float32 casts per layer on a CPU), 5 GB instead of 10."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    device = comfy.model_management.get_torch_device()
    config = comfy.supported_models.SDXL(dict(SDXL_FULL_UNET))
    compute = comfy.model_management.unet_dtype(model_params=2_600_000_000,
                                                supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(torch.float16, None if compute == torch.float16 else compute)
    model = config.get_model({}, device=device)
    initialise(model, 1234)
    model.to(torch.float16)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


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


def empty_conditioning(context_dim: int = 768, pooled: int | None = None) -> list:
    return [[torch.zeros(1, 77, context_dim), {} if pooled is None else {"pooled_output": torch.zeros(1, pooled)}]]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward(model, latent, cond, steps, cfg, attention):
    """KSamplerAdvanced's path without the node: euler, ddim_uniform, no added noise."""
    import comfy.sample
    import comfy.samplers

    sigmas = attention["ddim_inversion"].forward_sigmas(model, steps)
    return comfy.sample.sample_custom(model, torch.zeros_like(latent), cfg, comfy.samplers.sampler_object("euler"),
                                      sigmas, cond, cond, latent, disable_pbar=True, seed=0)


def measure_cache(model, attention: dict, cond, side: int, *, steps: int = 30, probe_steps: int = 1) -> dict:
    """MagicStyle's cache for content + style at ``side``×``side`` pixels and a ``steps``-step
    schedule, measured: a real ``probe_steps``-step inversion of both images keeps it (fp16), fp8
    is those states stored as the capture stores fp8; the bytes of their storages per timestep
    (every timestep holds the same) × the schedule's timesteps. Beside it, the fp16 Q/K/V a naive
    cache would keep, from what the model's own to_q/to_k/to_v output in the same calls.
    Per layer set (all, decoder): bytes, ratios, layers, timesteps."""
    from . import cache_measure

    inversion, layers_module = attention["ddim_inversion"], attention["layer_table"]
    stored_states = attention["feature_bank"].StoredStates
    unet = layers_module.diffusion_model_of(model)
    keys = layers_module.attention_keys(unet)
    names = {id(module): name for name, module in unet.named_modules()}
    latent = torch.randn(2, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    with cache_measure.projection_outputs(unet) as sizes:
        _, bank = inversion.invert(model, cond, latent, probe_steps, capture="qkv", layers=keys,
                                   storage_device="cpu", precision="fp16", disable_pbar=True)
    fp8 = {key: stored_states.store(stored.values.float(), "fp8", "cpu") for key, stored in bank.features.items()}
    # ComfyUI's ddim_uniform gives 31 sigmas for 30 steps: 31 timesteps.
    timesteps = len(inversion.forward_sigmas(model, steps)) - 1
    table = {}
    for layer_set in ("all", "decoder"):
        chosen = set(layers_module.select_keys(keys, layer_set))
        attn1 = {names[id(layers_module.transformer_block(unet, key).attn1)] for key in chosen}
        naive = cache_measure.naive_qkv_bytes(sizes, attn1) * timesteps
        row = {"layers": len(chosen), "timesteps": timesteps, "probe_timesteps": len(bank.timesteps),
               "naive_fp16_qkv_bytes": naive}
        for precision, features in (("fp16", bank.features), ("fp8", fp8)):
            kept = {key: stored for key, stored in features.items() if key[1] in chosen}
            row[f"{precision}_bytes"] = cache_measure.bytes_per_timestep(kept) * timesteps
            row[f"{precision}_over_naive"] = round(row[f"{precision}_bytes"] / naive, 7)
        table[layer_set] = row
    return table


def measure(model, attention: dict, *, size: int, steps: int, bytes_size: int | None = None,
            bytes_steps: int = 1) -> dict:
    """Cache bytes vs naive Q/K/V, FFA step time vs vanilla, batched vs sequential inversion.

    ``attention`` maps module names (inversion, ffa, schedule, unet_layers,
    feature_bank) to the pack's modules, however the caller imported them.
    """
    inversion, ffa, layers_module = attention["ddim_inversion"], attention["ffa"], attention["layer_table"]
    schedule = attention["sigmas"]
    storage = model.load_device
    cond = empty_conditioning()
    keys = layers_module.attention_keys(layers_module.diffusion_model_of(model))
    results: dict = {"size": size, "steps": steps}

    # Memory: the cache a real content+style inversion keeps at bytes_size, measured.
    if bytes_size:
        for layer_set, row in measure_cache(model, attention, cond, bytes_size, probe_steps=bytes_steps).items():
            results[f"cache_bytes_{layer_set}_30_steps"] = row["fp16_bytes"]
            results[f"naive_qkv_bytes_{layer_set}_30_steps"] = row["naive_fp16_qkv_bytes"]
            results[f"cache_ratio_{layer_set}"] = row["fp16_over_naive"]

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
