"""Tiny DiT models of the real layouts, built in-process from ComfyUI's own classes.

Flux.1 (``comfy.ldm.flux.model.Flux``: double and single stream blocks, QK-norm, RoPE) and SD3.5
(``comfy.ldm.modules.diffusionmodules.mmdit.MMDiT``: joint blocks, QK-norm) with a small config
(few blocks, narrow width, RoPE axes summing to the head width), wrapped by ComfyUI's model_base
(``Flux`` / ``SD3``, their model_sampling: Flux's shifted flow, SD3's shift 3) as a ModelPatcher,
so ComfyUI's samplers and hooks run them as they run a user's file.

``write_flux_unet`` writes a full-width Flux file (3,072 wide, 24 heads of 128: ComfyUI 0.3.75's
detection fixes the head count and the RoPE axes) with one double and one single block, for the
core UNETLoader: the user's path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_models import FLUX_HEAD_WIDTH, TINY_CLIP, TINY_CLIP_G, TINY_T5, initialise

SEED = 20261202
FLUX_CONTEXT = TINY_T5["d_model"]  # the tiny T5's width (4,096 in Flux.1)
FLUX_POOLED = TINY_CLIP["hidden_size"]  # the tiny CLIP-L's pooled width (768)
# Head width 16 = RoPE axes 4 + 6 + 6 (Flux.1: 128 = 16 + 56 + 56).
TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_POOLED,
             "context_in_dim": FLUX_CONTEXT, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
             "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
             "guidance_embed": True}
SD3_CONTEXT = 4096  # SD3.5's text path pads CLIP-L + CLIP-G to T5's 4,096 and joins the tokens
SD3_POOLED = TINY_CLIP["hidden_size"] + TINY_CLIP_G["hidden_size"]  # CLIP-L and CLIP-G pooled, side by side
# SD3.5's joint blocks (qk_norm rmsnorm, as SD3.5 large/medium), depth 2 → width 128, 2 heads of 64.
TINY_SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_patches": 32 * 32,
            "pos_embed_max_size": 32, "adm_in_channels": SD3_POOLED, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "input_size": None}
FLUX_FULL_FILE = "flux_full_width_1x1.safetensors"
assert TINY_FLUX["hidden_size"] // TINY_FLUX["num_heads"] == FLUX_HEAD_WIDTH == sum(TINY_FLUX["axes_dim"])


def _flux_config(guidance: bool):
    import comfy.supported_models

    config_cls = comfy.supported_models.Flux if guidance else comfy.supported_models.FluxSchnell
    return config_cls({**TINY_FLUX, "guidance_embed": guidance})


def _patcher(model_config, seed: int, dtype: torch.dtype):
    import comfy.model_management
    import comfy.model_patcher

    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device="cpu")
    initialise(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_flux(guidance: bool = True, seed: int = SEED, dtype: torch.dtype = torch.float32):
    """A MODEL: Flux.1-dev-shaped (distilled guidance) or, ``guidance=False``, schnell-shaped."""
    return _patcher(_flux_config(guidance), seed, dtype)


def tiny_sd3(seed: int = SEED + 1, dtype: torch.dtype = torch.float32):
    """A MODEL: SD3.5-shaped MMDiT (joint blocks with QK RMS-norm)."""
    import comfy.supported_models

    config = dict(TINY_SD3)
    config["context_embedder_config"] = {"target": "torch.nn.Linear",
                                         "params": {"in_features": SD3_CONTEXT, "out_features": 128}}
    return _patcher(comfy.supported_models.SD3(config), seed, dtype)


def flux_conditioning(tokens: int = 5, seed: int = 0, guidance: float | None = 3.5) -> list:
    """CONDITIONING for the tiny Flux: T5-like tokens, a pooled vector and (dev) the guidance value."""
    generator = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, FLUX_POOLED, generator=generator)}
    if guidance is not None:
        extras["guidance"] = guidance
    return [[torch.randn(1, tokens, FLUX_CONTEXT, generator=generator), extras]]


def sd3_conditioning(tokens: int = 5, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, SD3_CONTEXT, generator=generator),
             {"pooled_output": torch.randn(1, SD3_POOLED, generator=generator)}]]


def write_flux_unet(folder: Path) -> Path:
    """A full-width Flux.1-dev file (one double, one single block; T5 and CLIP widths as Flux.1's)
    for the core UNETLoader (models/diffusion_models/); skipped when present."""
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.utils

    path = folder / FLUX_FULL_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        model = comfy.ldm.flux.model.Flux(
            in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=True, operations=comfy.ops.disable_weight_init)
        initialise(model, SEED + 7)
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        partial = path.with_suffix(".partial")
        comfy.utils.save_torch_file(state, str(partial))
        partial.rename(path)
    return path


def write_flux_workflow_files(folder: Path) -> dict[str, Path]:
    """The files a Flux workflow loads, tiny, in their real layouts (skipped when present): the tiny Flux
    (UNETLoader: register_dit_loaders gives it its heads), CLIP-L and T5-XXL (DualCLIPLoader, type flux)
    and a 16-channel TAESD as the VAE (VAELoader reads a TAESD state dict as a VAE)."""
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.taesd.taesd
    import comfy.text_encoders.flux as flux
    import comfy.utils

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("flux_tiny.safetensors", "clip_l_tiny.safetensors",
                                                "t5xxl_tiny.safetensors", "ae_tiny.safetensors",
                                                "clip_g_tiny.safetensors", "sd3_tiny.safetensors")}
    if all(path.exists() for path in paths.values()):
        return paths
    config = {k: v for k, v in TINY_FLUX.items() if k != "image_model"}
    unet = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
    initialise(unet, SEED + 11)
    text = flux.flux_clip(dtype_t5=torch.float32)(model_options={"clip_l_model_config": TINY_CLIP,
                                                                 "t5xxl_model_config": TINY_T5})
    initialise(text, SEED + 12)
    vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    initialise(vae, SEED + 13)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
    import comfy.sdxl_clip

    clip_g = comfy.sdxl_clip.SDXLClipG(model_options={"clip_g_model_config": TINY_CLIP_G})
    initialise(clip_g, SEED + 14)
    # SD3.5 as Stability ships it: the MMDiT and its VAE in one checkpoint, the text encoders apart
    sd3 = tiny_sd3().model
    sd3_state = sd3.state_dict_for_saving(None, vae.state_dict(), None)
    states = {"flux_tiny.safetensors": unet.state_dict(), "clip_l_tiny.safetensors": text.clip_l.transformer.state_dict(),
              "t5xxl_tiny.safetensors": text.t5xxl.transformer.state_dict(), "ae_tiny.safetensors": vae.state_dict(),
              "clip_g_tiny.safetensors": clip_g.transformer.state_dict(), "sd3_tiny.safetensors": sd3_state}
    for name, state in states.items():
        dtype = torch.float16 if name.startswith("t5xxl") else torch.float32  # the 4,096-wide T5 embedding: half
        comfy.utils.save_torch_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(paths[name]))
    return paths
