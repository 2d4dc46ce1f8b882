"""Where the attention layers of a UNet are, by the keys ComfyUI gives them.

ComfyUI names a transformer block ``(block_name, number, index)``: the block
is "input", "middle" or "output", the number its position in that list of
the UNet, the index the block's place inside its SpatialTransformer. The
keys are read off the model, never assumed from one architecture.
"""

from __future__ import annotations

from typing import Iterator

import torch

BlockKey = tuple[str, int, int]


def layer_key(options: dict) -> BlockKey | None:
    """The key of the layer an attention patch is called for, from ComfyUI's per-call options
    (``block`` and ``block_index``); None outside a transformer block."""
    block = options.get("block")
    return None if block is None else (block[0], block[1], options.get("block_index", 0))


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
    """Every transformer block key of the UNet, in forward order."""
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
HIGH_RES_LEVELS = (0, 1)  # resolution levels: 0 = the latent's own grid, 1 = half of it


def select_keys(keys: list[BlockKey], layers: str, levels: dict[BlockKey, int] | None = None) -> list[BlockKey]:
    """A named subset of the keys: all, decoder (every output block), decoder_high_res (output blocks
    at HIGH_RES_LEVELS; needs ``levels``, each key's resolution level, see attention_levels), encoder
    (input blocks), middle."""
    wanted = {"all": ("input", "middle", "output"), "decoder": ("output",), "decoder_high_res": ("output",),
              "encoder": ("input",), "middle": ("middle",)}
    if layers not in wanted:
        raise ValueError(f"layers={layers!r}: expected one of {', '.join(LAYER_SETS)}")
    chosen = [key for key in keys if key[0] in wanted[layers]]
    if layers == "decoder_high_res":
        if levels is None:
            raise ValueError("layers='decoder_high_res' needs each layer's resolution level (attention_levels)")
        chosen = [key for key in chosen if levels[tuple(key)] in HIGH_RES_LEVELS]
    return chosen


def attention_levels(model) -> dict[BlockKey, int]:
    """The resolution level of every self-attention layer of a ModelPatcher's UNet (0 = the latent's
    own grid, each level halves it), from its config (attention_geometry)."""
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
