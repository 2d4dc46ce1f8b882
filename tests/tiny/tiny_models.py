"""Tiny SD1.5- and SDXL-shaped checkpoints with the real block layouts.

Test-only: ``register()`` teaches ComfyUI's model detection two extra model
configs (a 32-channel UNet is never a real checkpoint, so nothing else
matches them), and ``write_checkpoints()`` saves random, properly
initialised checkpoints in the LDM key layout that CheckpointLoaderSimple
loads like any user file. Imported in-process by the tests and, through a
stub custom node, by the test server.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

SD15_FILE = "tiny_sd15.safetensors"
SDXL_FILE = "tiny_sdxl.safetensors"
OTHER_SD15_FILE = "tiny_sd15_other.safetensors"  # same layout, other weights: "another model"
SEED = 20261125

TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_hidden_layers": 3, "projection_dim": 64}
# A T5-XXL of the real layout, tiny but for its width (SD3.5's text path pads CLIP to 4,096 and joins T5's
# tokens to it, so T5 keeps 4,096): Flux's and SD3.5's text encoder through register_dit_loaders.
TINY_T5 = {"d_model": 4096, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2, "num_decoder_layers": 2}
# CLIP-G: SD3.5's loader tells it from CLIP-L by a 31st layer, so the tiny one has 32.
TINY_CLIP_G = {**TINY_CLIP, "num_hidden_layers": 32}
FLUX_HEAD_WIDTH = 16  # a tiny Flux's head width: RoPE axes 4 + 6 + 6 (Flux.1: 128 = 16 + 56 + 56)
SD15_CONTEXT = TINY_CLIP["hidden_size"]
SDXL_CONTEXT = 2 * TINY_CLIP["hidden_size"]  # clip_l and clip_g side by side
SDXL_ADM = TINY_CLIP["projection_dim"] + 6 * 256  # pooled clip_g + size/crop embeddings

CLIP_VISION_FILE = "tiny_clip_vision.safetensors"
# A CLIP vision tower of ComfyUI's own class, small: hidden width 32 stands in
# for ViT-H's 1280 (tests/tiny/tiny_faceid.py's CLIP_DIM), 28-pixel images, 5 tokens.
TINY_CLIP_VISION = {"hidden_size": 32, "image_size": 28, "intermediate_size": 64, "layer_norm_eps": 1e-5,
                    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
                    "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 16, "hidden_act": "gelu"}

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": SD15_CONTEXT, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": SDXL_ADM, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": SDXL_CONTEXT, "num_head_channels": 16, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _classes():
    """The tiny model configs (built lazily: comfy must be importable first)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base as base

    class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype,
                             model_options={**model_options, "clip_l_model_config": TINY_CLIP}, **kwargs)

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options={
                **model_options, "clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP})

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {"context_dim": SD15_CONTEXT, "model_channels": 32, "use_linear_in_transformer": False,
                       "adm_in_channels": None, "use_temporal_attention": False}

        def clip_target(self, state_dict={}):
            return base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1ClipModel)

    class TinySDXL(comfy.supported_models.SDXL):
        unet_config = {"model_channels": 32, "use_linear_in_transformer": True,
                       "transformer_depth": [0, 0, 2, 2, 10, 10], "context_dim": SDXL_CONTEXT,
                       "adm_in_channels": SDXL_ADM, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

        def clip_target(self, state_dict={}):
            return base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)

    return TinySD15, TinySDXL


_REGISTERED: dict[str, type] = {}


def _tiny_clip_vision_config() -> str:
    import json
    import tempfile

    path = Path(tempfile.gettempdir()) / f"likeness_tiny_clip_vision_{recipe_digest()}.json"
    if not path.exists():
        path.write_text(json.dumps(TINY_CLIP_VISION))
    return str(path)


def _teach_clip_vision_loader() -> None:
    """ComfyUI picks a CLIP vision config by key names; the tiny tower is recognised by its width."""
    import comfy.clip_vision

    original = comfy.clip_vision.load_clipvision_from_sd
    if getattr(original, "likeness_tiny", False):
        return

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        embedding = sd.get("vision_model.embeddings.class_embedding")
        if embedding is not None and embedding.shape[0] == TINY_CLIP_VISION["hidden_size"]:
            model = comfy.clip_vision.ClipVisionModel(_tiny_clip_vision_config())
            model.load_sd(sd)
            return model
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd.likeness_tiny = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


def write_clip_vision(folder: Path) -> Path:
    """A tiny CLIP vision checkpoint for CLIPVisionLoader (skipped when present)."""
    import comfy.clip_vision
    import comfy.utils

    register()
    path = folder / CLIP_VISION_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        model = comfy.clip_vision.ClipVisionModel(_tiny_clip_vision_config())
        initialise(model.model, SEED + 3)
        comfy.utils.save_torch_file({k: v.contiguous() for k, v in model.get_sd().items()}, str(path))
    return path


def register_dit_loaders() -> None:
    """Teach ComfyUI's loaders the tiny Flux files (test-only): UNETLoader's detection fixes Flux's 24
    heads and RoPE axes, so a Flux whose heads are FLUX_HEAD_WIDTH wide gets its own; DualCLIPLoader
    (type flux) builds its text encoders from their JSON configs, so a tiny T5 + CLIP-L pair gets the
    tiny configs. Nothing else changes."""
    import comfy.model_detection
    import comfy.sd

    detect = comfy.model_detection.detect_unet_config
    if not getattr(detect, "likeness_tiny", False):
        def detect_unet_config(state_dict, key_prefix, metadata=None):
            config = detect(state_dict, key_prefix, metadata=metadata)
            norm = state_dict.get(f"{key_prefix}double_blocks.0.img_attn.norm.key_norm.scale")
            if config and config.get("image_model") == "flux" and norm is not None and norm.shape[0] == FLUX_HEAD_WIDTH:
                mlp = state_dict[f"{key_prefix}double_blocks.0.img_mlp.0.weight"].shape[0]
                config.update(num_heads=config["hidden_size"] // FLUX_HEAD_WIDTH, axes_dim=[4, 6, 6],
                              mlp_ratio=mlp / config["hidden_size"])
            return config

        detect_unet_config.likeness_tiny = True
        comfy.model_detection.detect_unet_config = detect_unet_config
    load = comfy.sd.load_text_encoder_state_dicts
    if not getattr(load, "likeness_tiny", False):
        def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None,
                                          clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):
            tiny_t5 = any("encoder.final_layer_norm.weight" in sd and f"encoder.block.{TINY_T5['num_layers']}.layer.0"
                          ".SelfAttention.q.weight" not in sd for sd in state_dicts)
            # TripleCLIPLoader names no type: three encoders are SD3's, as ComfyUI's own detection reads them
            kind = ("flux" if clip_type == comfy.sd.CLIPType.FLUX else
                    "sd3" if clip_type == comfy.sd.CLIPType.SD3 or len(state_dicts) == 3 else None)
            if kind and tiny_t5:
                import comfy.supported_models_base as base
                import comfy.text_encoders.flux as flux
                import comfy.text_encoders.sd3_clip as sd3

                options = {**model_options, "clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP_G,
                           "t5xxl_model_config": TINY_T5}
                target = (base.ClipTarget(flux.FluxTokenizer, flux.flux_clip(dtype_t5=torch.float32))
                          if kind == "flux" else
                          base.ClipTarget(sd3.SD3Tokenizer, sd3.sd3_clip(dtype_t5=torch.float32)))
                clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options=options)
                for state in state_dicts:
                    clip.load_sd(state)
                return clip
            return load(state_dicts, embedding_directory, clip_type, model_options)

        load_text_encoder_state_dicts.likeness_tiny = True
        comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts


def register() -> dict[str, type]:
    """Put the tiny configs at the front of ComfyUI's detection list (once)."""
    import comfy.supported_models

    _teach_clip_vision_loader()
    register_dit_loaders()
    if not _REGISTERED:
        sd15, sdxl = _classes()
        _REGISTERED.update(sd15=sd15, sdxl=sdxl)
    for config in (_REGISTERED["sdxl"], _REGISTERED["sd15"]):
        if config not in comfy.supported_models.models:
            comfy.supported_models.models.insert(0, config)
    return _REGISTERED


RESETTABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.GroupNorm,
              torch.nn.LayerNorm, torch.nn.Embedding)


def initialise(module: torch.nn.Module, generator_seed: int) -> None:
    """Torch's own initialisation (ComfyUI's layers skip it and leave memory
    uninitialised); bare parameters (class embeddings, scales) get N(0, 0.02)."""
    torch.manual_seed(generator_seed)
    for layer in module.modules():
        kind = next((cls for cls in RESETTABLE if isinstance(layer, cls)), None)
        if kind is not None:
            kind.reset_parameters(layer)
            continue
        for param in layer._parameters.values():
            if param is not None:
                with torch.no_grad():
                    torch.nn.init.normal_(param, std=0.02)
    for name, tensor in module.named_parameters():
        if not torch.isfinite(tensor).all():
            raise RuntimeError(f"{name} was left uninitialised")


def _checkpoint_state_dict(config_cls, unet_config: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    import comfy.sd
    import comfy.taesd.taesd

    model_config = config_cls(unet_config)
    model = model_config.get_model({})
    initialise(model, seed)
    clip = comfy.sd.CLIP(target=model_config.clip_target(), embedding_directory=None)
    initialise(clip.cond_stage_model, seed + 1)
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    initialise(vae, seed + 2)
    with torch.no_grad():  # TAESD's own constructor sets these: identity scaling
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
    state = model.state_dict_for_saving(clip.get_sd(), vae.state_dict(), None)
    return {key: value.detach().to(torch.float16 if value.is_floating_point() else value.dtype).contiguous()
            for key, value in state.items()}


def recipe_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def write_checkpoints(folder: Path) -> dict[str, Path]:
    """Write both tiny checkpoints into ``folder`` (skipped when present)."""
    import comfy.utils

    classes = register()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"sd15": folder / SD15_FILE, "sdxl": folder / SDXL_FILE, "sd15_other": folder / OTHER_SD15_FILE}
    for name, config, unet_config, seed in (("sd15", "sd15", SD15_UNET, SEED), ("sdxl", "sdxl", SDXL_UNET, SEED),
                                            ("sd15_other", "sd15", SD15_UNET, SEED + 100)):
        if not paths[name].exists():
            state = _checkpoint_state_dict(classes[config], unet_config, seed)
            partial = paths[name].with_suffix(".partial")
            comfy.utils.save_torch_file(state, str(partial))
            partial.rename(paths[name])
    return paths


SD3_FILE = "tiny_sd3.safetensors"  # models/diffusion_models/: another architecture, for the refusal tests


def write_sd3(folder: Path) -> Path:
    """A tiny SD3-shaped MMDiT (depth 2: hidden 128) that ComfyUI's UNETLoader detects as SD3."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops
    import comfy.utils

    path = folder / SD3_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        model = mmdit.MMDiT(input_size=None, patch_size=2, in_channels=16, depth=2, num_patches=64 * 64,
                            adm_in_channels=2048, out_channels=16, pos_embed_max_size=64,
                            pos_embed_scaling_factor=None, operations=comfy.ops.disable_weight_init,
                            context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": 4096, "out_features": 128}})
        initialise(model, SEED + 4)
        comfy.utils.save_torch_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
