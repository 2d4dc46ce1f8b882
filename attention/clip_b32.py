"""The image encoder the MCDM adapter was trained on: Hugging Face
``CLIPVisionModel`` (openai/clip-vit-base-patch32) ``last_hidden_state``: every
token, the class token included, before the final post-LayerNorm.

ComfyUI's CLIP vision loader has no ViT-B/32 config, so the tower is built
here with transformers (which ComfyUI itself depends on) from a local file in
either layout users have: Hugging Face (``vision_model.*``, also inside a full
CLIPModel file) or open_clip / OpenAI (``visual.*``), whose keys are renamed.
"""

from __future__ import annotations

import math
import re

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # every OpenAI CLIP ViT uses 64-wide heads


def _open_clip_to_hf(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """open_clip's VisionTransformer keys → CLIPVisionModel's (fused in_proj split into q/k/v)."""
    renamed = {
        "vision_model.embeddings.class_embedding": state[f"{prefix}class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state[f"{prefix}conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state[f"{prefix}positional_embedding"],
    }
    simple = {"ln_pre": "vision_model.pre_layrnorm", "ln_post": "vision_model.post_layernorm"}
    for source, target in simple.items():
        for kind in ("weight", "bias"):
            renamed[f"{target}.{kind}"] = state[f"{prefix}{source}.{kind}"]
    layer_parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    block = re.compile(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    layers = {int(m.group(1)) for k in state if (m := block.match(k))}
    for index in sorted(layers):
        source = f"{prefix}transformer.resblocks.{index}."
        target = f"vision_model.encoder.layers.{index}."
        for part, name in layer_parts.items():
            for kind in ("weight", "bias"):
                renamed[f"{target}{name}.{kind}"] = state[f"{source}{part}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{source}attn.in_proj_{kind}"].chunk(3, dim=0)
            for name, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                renamed[f"{target}self_attn.{name}.{kind}"] = value
    return renamed


def vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``vision_model.*`` tensors of a file in Hugging Face or open_clip layout."""
    for prefix in ("", "model.", "clip_model."):
        if f"{prefix}vision_model.embeddings.class_embedding" in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(f"{prefix}vision_model.")}
    for prefix in ("visual.", "model.visual.", ""):
        if f"{prefix}class_embedding" in state and f"{prefix}conv1.weight" in state:
            return _open_clip_to_hf(state, prefix)
    raise ValueError("not a CLIP ViT image tower: expected vision_model.* (Hugging Face) or visual.* (open_clip, "
                     "OpenAI) keys")


def config_of(vision: dict[str, torch.Tensor]):
    """A CLIPVisionConfig read off the shapes (QuickGELU, as OpenAI's CLIP was trained)."""
    from transformers import CLIPVisionConfig

    width = vision["vision_model.embeddings.class_embedding"].shape[0]
    patch = vision["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = vision["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in vision if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=vision["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, width // HEAD_WIDTH),
        patch_size=patch, image_size=patch * math.isqrt(positions - 1), hidden_act="quick_gelu",
        layer_norm_eps=1e-5)


class ImageEncoder:
    """CLIP ViT last hidden states of ComfyUI IMAGEs, as CLIPImageProcessor + CLIPVisionModel give them."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        from transformers import CLIPVisionModel

        vision = vision_state_dict(state)
        config = config_of(vision)
        self.model = CLIPVisionModel(config).eval().requires_grad_(False)
        vision = {k: v.float() for k, v in vision.items() if not k.endswith("position_ids")}
        missing, unexpected = self.model.load_state_dict(vision, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"the image tower does not match a CLIP ViT: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.image_size = config.image_size

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) in 0..1 → (B, tokens, width): resize the short side, centre crop, normalise."""
        import comfy.clip_vision
        import comfy.model_management

        device = comfy.model_management.get_torch_device()
        pixels = comfy.clip_vision.clip_preprocess(image[..., :3].float(), size=self.image_size,
                                                   mean=list(OPENAI_MEAN), std=list(OPENAI_STD), crop=True)
        self.model.to(device)
        try:
            with torch.no_grad():
                return self.model(pixel_values=pixels.to(device)).last_hidden_state.float()
        finally:
            self.model.to(comfy.model_management.unet_offload_device())
