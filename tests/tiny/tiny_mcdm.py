"""Tiny MCDM files in the released layout (test-only; needs diffusers).

bytedance/feature-preserve-portrait-editing saves ``unet.pth`` as a diffusers
UNet2DConditionModel state dict from a DataParallel wrapper (``module.``
prefix, 8-channel conv_in) and ``adapter.pth`` as the four tensors of its
Embedding_Adapter. Here: the same layouts at the tiny SD1.5's width (its CLIP
text width 64 is the UNet's context), plus a ViT-B/32-shaped CLIP image tower
(224-pixel images, 32-pixel patches, so 50 tokens) of width 64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from . import tiny_models

SEED = 20261126
UNET = "tiny_mcdm/unet.pth"
ADAPTER = "tiny_mcdm/adapter.pth"
CLIP_B32 = "tiny_clip_vit_b32.safetensors"
WIDTH = tiny_models.SD15_CONTEXT
B32 = {"hidden_size": WIDTH, "intermediate_size": 128, "num_attention_heads": 1, "num_hidden_layers": 2,
       "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def diffusers_unet(in_channels: int = 8, seed: int = SEED):
    """A diffusers UNet2DConditionModel shaped like the tiny SD1.5 (attention_head_dim is
    diffusers' name for SD1.5's 8 heads), weights perturbed away from their init."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 128, 128),
        layers_per_block=2, cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return unet.eval()


class ReleasedAdapter(torch.nn.Module):
    """The released Embedding_Adapter's computation, written from its description:
    max-pool, flatten, vae2clip, concatenate after the CLIP tokens, linear1 over tokens."""

    def __init__(self, width: int = WIDTH, latent_features: int = 1024, tokens: int = 50) -> None:
        super().__init__()
        self.pool = torch.nn.MaxPool2d(2)
        self.vae2clip = torch.nn.Linear(latent_features, width)
        self.linear1 = torch.nn.Linear(tokens + 4, tokens)

    def forward(self, clip: torch.Tensor, vae: torch.Tensor) -> torch.Tensor:
        vae = rearrange(self.pool(vae), "b c h w -> b c (h w)")
        concat = torch.cat((clip, self.vae2clip(vae)), 1)
        return rearrange(self.linear1(rearrange(concat, "b c d -> b d c")), "b d c -> b c d")


def released_adapter(seed: int = SEED) -> ReleasedAdapter:
    torch.manual_seed(seed + 1)
    return ReleasedAdapter().eval()


def clip_b32(seed: int = SEED, stored_as: torch.dtype = torch.float32):
    """transformers' CLIPVisionModel (whichever version is installed) with random weights.

    ``stored_as``: the weights rounded through that dtype as ComfyUI's CLIP vision model
    stores them (every tensor but the two tower-wide LayerNorms, which it keeps in float32),
    the model still computing in float32: the reference for an encoder built in that dtype."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 2)
    tower = CLIPVisionModel(CLIPVisionConfig(**B32)).eval()
    with torch.no_grad():
        for name, parameter in tower.named_parameters():
            if "pre_layrnorm" not in name and "post_layernorm" not in name:
                parameter.copy_(parameter.to(stored_as).float())
    return tower


def hugging_face_file(tower) -> dict[str, torch.Tensor]:
    """The tower's tensors as a Hugging Face file holds them (``vision_model.*``, as
    openai/clip-vit-base-patch32 is published), also where transformers 5 names the
    model's own state dict without that prefix."""
    prefix = "vision_model."
    return {k if k.startswith(prefix) else prefix + k: v.detach().clone().contiguous()
            for k, v in tower.state_dict().items()}


def _pth(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v.detach().clone().contiguous() for k, v in state.items()}, path)


def write(models: Path) -> dict[str, str]:
    """unet.pth and adapter.pth in models/likeness/tiny_mcdm/, the B/32 tower in models/clip_vision/."""
    from safetensors.torch import save_file

    _pth(diffusers_unet().state_dict(), models / "likeness" / UNET)
    _pth(released_adapter().state_dict(), models / "likeness" / ADAPTER)
    tower = hugging_face_file(clip_b32())
    (models / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file(tower, str(models / "clip_vision" / CLIP_B32))
    return {"unet": UNET, "adapter": ADAPTER, "clip_vision": CLIP_B32}
