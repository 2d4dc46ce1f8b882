"""Where the attention layers of a model are, by the keys ComfyUI gives them.

ComfyUI names a UNet's transformer block ``(block_name, number, index)``: the
block is "input", "middle" or "output", the number its position in that list
of the UNet, the index the block's place inside its SpatialTransformer. A
DiT's joint-attention block is ``(block_type, block_index, 0)`` here: Flux's
"double" and "single" stream blocks as ComfyUI's Flux names them in its
transformer_options, SD3.5's joint blocks "double" as ComfyUI's
``patches_replace["dit"]`` keys them. The keys are read off the model, never
assumed from one architecture; a new family plugs in here (its keys and
``FAMILIES``) and in joint_attention.py (its attention call).
"""

from __future__ import annotations

from typing import Iterator

import torch

BlockKey = tuple[str, int, int]


DIT_BLOCK_TYPES = ("double", "single")


def layer_key(options: dict) -> BlockKey | None:
    """The key of the layer an attention patch is called for, from ComfyUI's per-call options
    (``block`` and ``block_index``; a DiT's ``block_type`` and ``block_index``); None outside a
    transformer block."""
    block = options.get("block")
    if block is None:
        return dit_block_key(options)
    return (block[0], block[1], options.get("block_index", 0))


def dit_block_key(options: dict) -> BlockKey | None:
    """("double" | "single", index, 0) of the DiT block a call is in, or None."""
    block_type = options.get("block_type")
    return None if block_type not in DIT_BLOCK_TYPES else (block_type, int(options.get("block_index", 0)), 0)


# The families the methods are defined for: (name, what a user calls it). Anything else is refused.
FAMILIES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux.1", "sd3": "SD3.5"}
DIT_FAMILIES = ("flux", "sd3")


def family_of(model) -> str | None:
    """"sd15", "sdxl", "flux" (Flux.1 dev/schnell), "sd3" (SD3/3.5 MMDiT) or None, from the
    ModelPatcher's ComfyUI model config and model class (Flux.2, Chroma and others derive from
    Flux's classes: they are None)."""
    import comfy.model_base
    import comfy.supported_models as known

    config = getattr(model.model, "model_config", None)
    if isinstance(config, known.SDXL):
        return "sdxl"
    if isinstance(config, known.SD15):
        return "sd15"
    if isinstance(config, known.SD3) and type(model.model) is comfy.model_base.SD3:
        return "sd3"
    if (type(config) in (known.Flux, known.FluxSchnell) and type(model.model) is comfy.model_base.Flux
            and config.unet_config.get("image_model") == "flux"):
        return "flux"
    return None


def dit_keys(diffusion_model: torch.nn.Module) -> list[BlockKey]:
    """Every joint-attention block key of a Flux or MMDiT, in forward order."""
    if hasattr(diffusion_model, "double_blocks"):
        return ([("double", i, 0) for i in range(len(diffusion_model.double_blocks))]
                + [("single", i, 0) for i in range(len(getattr(diffusion_model, "single_blocks", [])))])
    return [("double", i, 0) for i in range(len(getattr(diffusion_model, "joint_blocks", [])))]


def _stages(unet: torch.nn.Module) -> Iterator[tuple[str, int, torch.nn.Module]]:
    for number, module in enumerate(getattr(unet, "input_blocks", [])):
        yield "input", number, module
    if getattr(unet, "middle_block", None) is not None:
        yield "middle", 0, unet.middle_block
    for number, module in enumerate(getattr(unet, "output_blocks", [])):
        yield "output", number, module


def _transformer_blocks(stage: torch.nn.Module) -> list[torch.nn.Module]:
    for child in stage.children() if isinstance(stage, torch.nn.Sequential) else [stage]:
        blocks = getattr(child, "transformer_blocks", None)
        if blocks is not None:
            return list(blocks)
    return []


def attention_keys(unet: torch.nn.Module) -> list[BlockKey]:
    """Every transformer block key of the UNet (or joint-attention block of a DiT), in forward order."""
    if hasattr(unet, "double_blocks") or hasattr(unet, "joint_blocks"):
        return dit_keys(unet)
    return [(name, number, index)
            for name, number, stage in _stages(unet)
            for index, _ in enumerate(_transformer_blocks(stage))]


def transformer_block(unet: torch.nn.Module, key: BlockKey) -> torch.nn.Module:
    """The BasicTransformerBlock at ``key`` (it holds attn1, attn2, norm1...)."""
    name, number, index = key
    for stage_name, stage_number, stage in _stages(unet):
        if (stage_name, stage_number) == (name, number):
            blocks = _transformer_blocks(stage)
            if index < len(blocks):
                return blocks[index]
    raise KeyError(f"no transformer block {key} in this UNet; it has {len(attention_keys(unet))} "
                   f"(first {attention_keys(unet)[:3]})")


def diffusion_model_of(model) -> torch.nn.Module:
    """The UNet of a ModelPatcher."""
    return model.get_model_object("diffusion_model")


# Named sets of self-attention layers. "decoder_high_res" is StyleID's (Chung et al. 2024, released
# run_styleid.py: --attn_layer 6,7,8,9,10,11, output blocks of SD1.5's UNet): the decoder's layers at
# the latent's full and half resolution. On SDXL, whose full resolution has no attention, that is the
# half-resolution output blocks 3-5.
LAYER_SETS = ("all", "decoder", "decoder_high_res", "encoder", "middle")
DIT_LAYER_SETS = ("all", "double", "single")
HIGH_RES_LEVELS = (0, 1)  # resolution levels: 0 = the latent's own grid, 1 = half of it


def select_keys(keys: list[BlockKey], layers: str, levels: dict[BlockKey, int] | None = None) -> list[BlockKey]:
    """A named subset of the keys: all, decoder (every output block), decoder_high_res (output blocks
    at HIGH_RES_LEVELS; needs ``levels``, each key's resolution level, see attention_levels), encoder
    (input blocks), middle."""
    wanted = {"all": ("input", "middle", "output", *DIT_BLOCK_TYPES), "decoder": ("output",),
              "decoder_high_res": ("output",), "encoder": ("input",), "middle": ("middle",),
              "double": ("double",), "single": ("single",)}
    if layers not in wanted:
        raise ValueError(f"layers={layers!r}: expected one of {', '.join(dict.fromkeys(LAYER_SETS + DIT_LAYER_SETS))}")
    chosen = [key for key in keys if key[0] in wanted[layers]]
    if layers == "decoder_high_res":
        if levels is None:
            raise ValueError("layers='decoder_high_res' needs each layer's resolution level (attention_levels)")
        chosen = [key for key in chosen if levels[tuple(key)] in HIGH_RES_LEVELS]
    return chosen


def parse_blocks(text: str, keys: list[BlockKey]) -> list[BlockKey]:
    """DiT blocks by a list such as "d0, d3, s10" (d = double / joint block, s = single), checked
    against the model's ``keys``."""
    chosen = []
    for item in [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]:
        kind = {"d": "double", "s": "single"}.get(item[:1].lower())
        if kind is None or not item[1:].isdigit() or (kind, int(item[1:]), 0) not in keys:
            have = f"d0-d{sum(k[0] == 'double' for k in keys) - 1}" + (
                f", s0-s{sum(k[0] == 'single' for k in keys) - 1}" if any(k[0] == "single" for k in keys) else "")
            raise ValueError(f"blocks={text!r}: {item!r} is not a block of this model; expected a list like "
                             f"'d0, d3, s10' of its blocks ({have})")
        chosen.append((kind, int(item[1:]), 0))
    return list(dict.fromkeys(chosen))


def attention_levels(model) -> dict[BlockKey, int]:
    """The resolution level of every self-attention layer of a ModelPatcher's UNet (0 = the latent's
    own grid, each level halves it), from its config (attention_geometry); empty for a DiT (one grid)."""
    if "model_channels" not in model.model.model_config.unet_config:
        return {}
    return {key: level for key, (level, _) in attention_geometry(model.model.model_config.unet_config).items()}


def attention_geometry(unet_config: dict) -> dict[BlockKey, tuple[int, int]]:
    """(resolution level, channels) of every self-attention layer of an SD-family UNet, read off
    its config the way ComfyUI's UNetModel builds it (level 0 is the latent's own size, each level
    halves it). Lets memory be computed for a model and size without building either."""
    model_channels, mult = unet_config["model_channels"], list(unet_config["channel_mult"])
    res_blocks = unet_config["num_res_blocks"]
    res_blocks = [res_blocks] * len(mult) if isinstance(res_blocks, int) else list(res_blocks)
    depth_in, depth_out = list(unet_config["transformer_depth"]), list(unet_config["transformer_depth_output"])
    geometry: dict[BlockKey, tuple[int, int]] = {}
    number = 1  # input block 0 is conv_in
    for level, factor in enumerate(mult):
        for _ in range(res_blocks[level]):
            for index in range(depth_in.pop(0)):
                geometry[("input", number, index)] = (level, model_channels * factor)
            number += 1
        number += 1 if level < len(mult) - 1 else 0  # the downsample block
    for index in range(max(unet_config.get("transformer_depth_middle") or 0, 0)):
        geometry[("middle", 0, index)] = (len(mult) - 1, model_channels * mult[-1])
    number = 0
    for level in reversed(range(len(mult))):
        for _ in range(res_blocks[level] + 1):
            for index in range(depth_out.pop()):
                geometry[("output", number, index)] = (level, model_channels * mult[level])
            number += 1
    return geometry


def tokens_at(level: int, latent_hw: tuple[int, int]) -> int:
    """Tokens of a layer ``level`` halvings below the latent (stride-2 convolutions round up)."""
    height, width = latent_hw
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height * width
