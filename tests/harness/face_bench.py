"""Face Fusion and Infinite-ID cost on a full-size random SD1.5: step time and
peak memory against vanilla sampling (tests/tools/benchmark.py, device_check)."""

from __future__ import annotations

import time

import torch

from .magicstyle_bench import empty_conditioning


def sample_steps(model, latent, steps: int, cfg: float = 5.0) -> float:
    """Seconds per step of a plain euler run (normal schedule, cfg 5)."""
    import comfy.sample
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    cond = empty_conditioning()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    comfy.sample.sample_custom(model, torch.randn_like(latent), cfg, comfy.samplers.sampler_object("euler"), sigmas,
                               cond, cond, latent, disable_pbar=True, seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def with_face(model, attention: dict, size: int):
    face_fusion, schedule, layers = attention["face_kv_attention"], attention["sigmas"], attention["layer_table"]
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(5))
    identity = face_fusion.Identity(latent=latent, noise=torch.randn_like(latent), weight=1.0,
                                    sigma_range=schedule.SigmaRange.always())
    return face_fusion.apply_face_fusion(model, identity, layers.attention_keys(layers.diffusion_model_of(model)))


def with_infinite_id(model, attention: dict):
    """Both streams with stand-in adapter weights of the real shapes (the layers'
    own text projections): the cost does not depend on the weights' values."""
    infinite_id, layers = attention["identity_streams"], attention["layer_table"]
    unet = layers.diffusion_model_of(model)
    keys = layers.attention_keys(unet)
    kv = {k: (layers.transformer_block(unet, k).attn2.to_k.weight.detach(),
              layers.transformer_block(unet, k).attn2.to_v.weight.detach()) for k in keys}
    tokens = torch.randn(1, 4, kv[keys[0]][0].shape[1], generator=torch.Generator().manual_seed(6))
    settings = infinite_id.InfiniteID(tokens=tokens, uncond_tokens=torch.zeros_like(tokens), kv=kv)
    return infinite_id.apply_infinite_id(model, settings, keys)


def measure_gpu(model, attention: dict, *, size: int, steps: int) -> dict:
    """Both runs in one process: CUDA's peak counter resets between them."""
    latent = torch.zeros(1, 4, size // 8, size // 8)
    sample_steps(model, latent, 2)  # warm-up, loads the model
    results = {}
    for name, candidate in (("vanilla", model), ("face", with_face(model, attention, size)),
                            ("infinite_id", with_infinite_id(model, attention))):
        torch.cuda.reset_peak_memory_stats()
        results[f"{name}_step_s"] = round(min(sample_steps(candidate, latent, steps) for _ in range(2)), 4)
        results[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated()
    for name in ("face", "infinite_id"):
        results[f"{name}_over_vanilla_step"] = round(results[f"{name}_step_s"] / results["vanilla_step_s"], 3)
        results[f"{name}_over_vanilla_peak"] = round(results[f"{name}_peak_bytes"] / results["vanilla_peak_bytes"], 3)
    return results


def interleaved_step_seconds(variants: dict, latent, *, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each variant, the variants run in turn within each round so that
    the machine's load drift falls on all of them alike. ``variants``: name -> (model, before, after),
    ``before``/``after`` called around the variant's run (a setting it needs, undone after)."""
    import statistics

    import comfy.model_management

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (model, before, after) in variants.items():
            before()
            try:
                # Switching ModelPatchers reloads the model: done before the clock starts.
                comfy.model_management.load_models_gpu([model])
                times[name].append(sample_steps(model, latent, steps))
            finally:
                after()
    return {name: statistics.median(values) for name, values in times.items()}


def face_rows_figures(model, attention: dict, *, size: int, rounds: int = 5, steps: int = 2) -> dict:
    """Face Fusion (one reference) with its face rows in the image's call and with a separate face
    call, and Infinite-ID (one identity) with its streams in one call and with a call per stream,
    each per step over a plain step (cfg 5), interleaved in one process."""
    face_pass, stream_calls = attention["face_pass"], attention["stream_calls"]

    def batching(module, flag: str, on: bool):
        return lambda: setattr(module, flag, on)

    nothing = lambda: None  # noqa: E731
    face, identity = with_face(model, attention, size), with_infinite_id(model, attention)
    variants = {"plain": (model, nothing, nothing),
                "face_batched": (face, batching(face_pass, "BATCH_FACE_ROWS", True), nothing),
                "face_separate": (face, batching(face_pass, "BATCH_FACE_ROWS", False),
                                  batching(face_pass, "BATCH_FACE_ROWS", True)),
                "infinite_id_batched": (identity, batching(stream_calls, "BATCH_STREAMS", True), nothing),
                "infinite_id_separate": (identity, batching(stream_calls, "BATCH_STREAMS", False),
                                         batching(stream_calls, "BATCH_STREAMS", True))}
    latent = torch.zeros(1, 4, size // 8, size // 8)
    sample_steps(model, latent, 1)  # loads the model
    seconds = interleaved_step_seconds(variants, latent, rounds=rounds, steps=steps)
    figures = {"size": size, "rounds": rounds, "steps_per_run": steps, "plain_step_s": round(seconds["plain"], 4)}
    for name in ("face_batched", "face_separate", "infinite_id_batched", "infinite_id_separate"):
        figures[f"{name}_over_plain"] = round(seconds[name] / seconds["plain"], 3)
    return figures
