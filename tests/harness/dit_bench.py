"""MagicStyle on a DiT: FFA step ÷ plain step (cache and recompute) and the memory of each mode.

Step times interleave the variants step by step in one process (plain, cache, recompute, plain, ...)
so that the machine's load moves them alike; each figure is a median and the ratios are what is
quoted. Memory: the formulas (joint_ffa.joint_cache_bytes, feature_bank.cache_bytes, the
trajectory's latents) checked against what a real inversion of the tiny Flux keeps.
"""

from __future__ import annotations

import statistics
import time

import torch

GB = 1e9


def _full_width_flux():
    """Flux.1's width (3,072, 24 heads of 128, RoPE 16+56+56) with one double and one single block;
    small text widths (they do not change a step's block cost)."""
    import comfy.supported_models

    from tiny import tiny_dit

    config = {**tiny_dit.TINY_FLUX, "hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56],
              "mlp_ratio": 4.0, "depth": 1, "depth_single_blocks": 1}
    return tiny_dit._patcher(comfy.supported_models.Flux(config), tiny_dit.SEED, torch.float32)


def step_ratios(model, cond, latent_hw: tuple[int, int], steps: int = 3, repeats: int = 3) -> dict:
    """Seconds of one sampler step: plain, FFA from the cache, FFA recomputed; every block fused."""
    import comfy.sample
    import comfy.samplers

    run = _RUN["comfy"].run_node
    start = torch.randn(2, 16, *latent_hw, generator=torch.Generator().manual_seed(0))
    invert = lambda mode: run("LikenessInvert", model=model, conditioning=cond,  # noqa: E731
                              latent={"samples": start}, steps=steps, capture="qkv", layers="all", cache_on="cpu",
                              precision="fp16", mode=mode)
    (z_t, cache), (_, kept) = invert("cache"), invert("recompute")
    ffa = lambda bank: run("LikenessFeatureFusionAttention", model=model, content=bank.select(0, 1),  # noqa: E731
                           style=bank.select(1, 1), alpha=0.8, beta=0.2, temperature=1.0, layers="all", style_index=0,
                           start_percent=0.0, end_percent=1.0)[0]
    variants = {"plain": model, "cache": ffa(cache), "recompute": ffa(kept)}
    sigmas = torch.tensor(cache.sigmas)
    sampler = comfy.samplers.sampler_object("euler")
    latent = z_t["samples"][:1]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for index in range(len(sigmas) - 1):
            for name, patched in variants.items():  # interleaved: the same step of each, back to back
                began = time.perf_counter()
                comfy.sample.sample_custom(patched, torch.zeros_like(latent), 1.0, sampler,
                                           sigmas[index:index + 2].clone(), cond, cond, latent, disable_pbar=True,
                                           seed=0)
                times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"step_s": median, "cache_over_plain": median["cache"] / median["plain"],
            "recompute_over_plain": median["recompute"] / median["plain"], "steps_timed": len(times["plain"]),
            "measured_cache_bytes": cache.nbytes(), "measured_trajectory_bytes": kept.trajectory.nbytes()}


_RUN: dict = {}


def memory_rows(steps: int = 30) -> dict:
    """Cache vs recompute for content + style, every block / layer, fp16, from the formulas."""
    from .magicstyle_bench import SDXL_FULL_UNET

    cache_bytes = _RUN["comfy"].pack("attention.magicstyle.feature_bank").cache_bytes
    joint_cache_bytes = _RUN["comfy"].pack("attention.magicstyle.joint_ffa").joint_cache_bytes
    attention_geometry = _RUN["comfy"].pack("attention.shared.layer_table").attention_geometry

    timesteps = steps + 1  # ddim_uniform gives one sigma more (31 for 30 steps)
    rows = {}
    latent = 128  # 1024² pixels / 8
    flux_cache = joint_cache_bytes(3072, 19 + 38, (latent // 2) ** 2, timesteps, 2, "fp16")
    trajectory = lambda channels: timesteps * 2 * channels * latent * latent * 4  # fp32 latents  # noqa: E731
    rows["flux_1024"] = {"cache_fp16_gb": flux_cache / GB, "cache_fp8_gb": joint_cache_bytes(
        3072, 57, 4096, timesteps, 2, "fp8") / GB, "recompute_kept_mb": trajectory(16) / 1e6}
    sdxl = dict(SDXL_FULL_UNET)
    layers = list(attention_geometry(sdxl))
    rows["sdxl_1024"] = {"layers": len(layers), "cache_fp16_gb": cache_bytes(sdxl, layers, (latent, latent), timesteps, 2,
                                                                             "fp16") / GB,
                         "recompute_kept_mb": trajectory(4) / 1e6}
    return rows


def formula_checks(comfy) -> dict:
    """The formulas against what a real inversion of the tiny Flux keeps (odd latent: 9×13)."""
    from tiny import tiny_dit

    joint = comfy.pack("attention.magicstyle.joint_ffa")
    model, cond = tiny_dit.tiny_flux(), tiny_dit.flux_conditioning()
    start = torch.randn(2, 16, 9, 13)
    checks = {}
    for precision in ("fp16", "fp8"):
        _, bank = comfy.run_node("LikenessInvert", model=model, conditioning=cond, latent={"samples": start}, steps=4,
                                 capture="qkv", layers="all", cache_on="cpu", precision=precision)
        formula = joint.joint_cache_bytes(tiny_dit.TINY_FLUX["hidden_size"], 4, 5 * 7, len(bank.timesteps), 2,
                                          precision)
        checks[f"cache_{precision}"] = {"measured": bank.nbytes(), "formula": formula}
    _, kept = comfy.run_node("LikenessInvert", model=model, conditioning=cond, latent={"samples": start}, steps=4,
                             capture="qkv", layers="all", cache_on="cpu", precision="fp16", mode="recompute")
    latents = sum(t.numel() * t.element_size() for t in kept.trajectory.latents.values())
    checks["recompute_latents"] = {"measured": latents, "formula": len(kept.timesteps) * 2 * 16 * 9 * 13 * 4}
    return checks


def dit_figures(comfy) -> dict:
    from tiny import tiny_dit

    _RUN["comfy"] = comfy
    figures = {"memory": memory_rows(), "formula_vs_measured": formula_checks(comfy)}
    figures["tiny_flux_256px"] = step_ratios(tiny_dit.tiny_flux(), tiny_dit.flux_conditioning(), (32, 32))
    figures["full_width_flux_1x1_256px"] = step_ratios(_full_width_flux(), tiny_dit.flux_conditioning(), (32, 32),
                                                       steps=2, repeats=2)
    return figures
