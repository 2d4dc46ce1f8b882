"""Tiny IP-Adapter FaceID-PlusV2 files in the real key layout, for the tiny UNets.

The layer list is built the way the IP-Adapter code builds it: one entry
per attention processor of the diffusers UNet (attn1, attn2 of every
transformer block) over down_blocks, up_blocks, then mid_block, each
sized from the block's output channels. It never uses ComfyUI's keys, so
the tests can check the loader's mapping against the tiny UNets.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tiny_models

ID_DIM = 512  # ArcFace gives 512 whatever the model
CLIP_DIM = 32  # stands in for CLIP ViT-H's 1280
NUM_TOKENS = 4
DEPTH = 4
HEAD_WIDTH = 64
LORA_RANK = 4

# Diffusers' blocks with attention, in processor order: (name, attentions, transformer layers, channel level).
# SD1.5: CrossAttnDown ×3 (2 attentions), UpBlock2D, CrossAttnUp ×3 (3 attentions), mid (1).
SD15_BLOCKS = ([(f"down_blocks.{i}", 2, 1, i) for i in range(3)]
               + [(f"up_blocks.{i}", 3, 1, 3 - i) for i in range(1, 4)] + [("mid_block", 1, 1, 3)])
# SDXL: DownBlock2D, CrossAttnDown ×2 (2 and 10 layers), CrossAttnUp ×2 (10 and 2 layers), UpBlock2D, mid (10).
SDXL_BLOCKS = ([("down_blocks.1", 2, 2, 1), ("down_blocks.2", 2, 10, 2), ("up_blocks.0", 3, 10, 2),
                ("up_blocks.1", 3, 2, 1), ("mid_block", 1, 10, 2)])

KINDS = {
    "sd15": {"blocks": SD15_BLOCKS, "context": tiny_models.SD15_CONTEXT, "unet": tiny_models.SD15_UNET},
    "sdxl": {"blocks": SDXL_BLOCKS, "context": tiny_models.SDXL_CONTEXT, "unet": tiny_models.SDXL_UNET},
}


def layer_widths(kind: str) -> list[int]:
    """The inner width of every cross-attention layer, in the file's order."""
    unet = KINDS[kind]["unet"]
    return [unet["model_channels"] * unet["channel_mult"][level]
            for _, attentions, layers, level in KINDS[kind]["blocks"] for _ in range(attentions * layers)]


def state_dict(kind: str, seed: int = 0, lora: bool = True) -> dict[str, torch.Tensor]:
    """A random FaceID-PlusV2 state dict with the ``image_proj.`` / ``ip_adapter.`` prefixes (fp16, like the
    released files)."""
    generator = torch.Generator().manual_seed(seed)
    width = KINDS[kind]["context"]
    inner = (width // HEAD_WIDTH) * HEAD_WIDTH

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    def norm(prefix: str, size: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(size, generator=generator),
                f"{prefix}.bias": 0.1 * torch.randn(size, generator=generator)}

    proj = {"proj.0.weight": weight(2 * ID_DIM, ID_DIM), "proj.0.bias": weight(2 * ID_DIM),
            "proj.2.weight": weight(width * NUM_TOKENS, 2 * ID_DIM), "proj.2.bias": weight(width * NUM_TOKENS),
            **norm("norm", width)}
    resampler = {"proj_in.weight": weight(width, CLIP_DIM), "proj_in.bias": weight(width),
                 "proj_out.weight": weight(width, width), "proj_out.bias": weight(width), **norm("norm_out", width)}
    for i in range(DEPTH):
        layer = f"layers.{i}"
        resampler.update({**norm(f"{layer}.0.norm1", width), **norm(f"{layer}.0.norm2", width),
                          f"{layer}.0.to_q.weight": weight(inner, width),
                          f"{layer}.0.to_kv.weight": weight(2 * inner, width),
                          f"{layer}.0.to_out.weight": weight(width, inner),
                          **norm(f"{layer}.1.0", width),
                          f"{layer}.1.1.weight": weight(4 * width, width),
                          f"{layer}.1.3.weight": weight(width, 4 * width)})
    proj.update({f"perceiver_resampler.{key}": value for key, value in resampler.items()})

    ip = {}
    for n, hidden in enumerate(layer_widths(kind)):
        ip[f"{2 * n + 1}.to_k_ip.weight"] = weight(hidden, width)
        ip[f"{2 * n + 1}.to_v_ip.weight"] = weight(hidden, width)
        if lora:  # FaceID's LoRA on attn1 (even numbers: self-attention) and attn2 (odd)
            for number, source in ((2 * n, hidden), (2 * n + 1, width)):
                for which, in_width in (("q", hidden), ("k", source), ("v", source), ("out", hidden)):
                    ip[f"{number}.to_{which}_lora.down.weight"] = weight(LORA_RANK, in_width)
                    ip[f"{number}.to_{which}_lora.up.weight"] = weight(hidden, LORA_RANK)

    state = {f"image_proj.{key}": value for key, value in proj.items()}
    state.update({f"ip_adapter.{key}": value for key, value in ip.items()})
    return {key: value.to(torch.float16) for key, value in state.items()}


def without(state: dict[str, torch.Tensor], *keys: str) -> dict[str, torch.Tensor]:
    """The state dict with keys dropped (for the refusal tests)."""
    return {key: value for key, value in state.items() if key not in keys}


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def write_bin(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """The .bin layout of the released files: {"image_proj": {...}, "ip_adapter": {...}}."""
    sections: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        section, _, name = key.partition(".")
        sections[section][name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sections, str(path))
    return path


def write(path: Path, kind: str, seed: int = 0, lora: bool = True, drop: tuple[str, ...] = ()) -> Path:
    """A tiny file (.safetensors or .bin, from the suffix), optionally with keys dropped."""
    state = without(state_dict(kind, seed, lora), *drop)
    return (write_bin if path.suffix == ".bin" else write_safetensors)(path, state)
