"""The image encoder the MCDM adapter was trained on: openai/clip-vit-base-patch32's
image tower, read as Hugging Face ``CLIPVisionModel.last_hidden_state`` gives it: every
token, the class token included, before the final post-LayerNorm.

ComfyUI ships no ViT-B/32 config, so the config is read off the file's shapes and the
tower is ComfyUI's own CLIP vision model (``comfy.clip_model``), with the devices, dtype
and ModelPatcher that ComfyUI's CLIPVisionLoader gives its encoders. Nothing here depends
on transformers (whose 5.x release renamed CLIPVisionModel's keys). Files come in the
layouts users have: Hugging Face (``vision_model.*``, also inside a full CLIPModel file,
or bare as transformers 5 names them) or open_clip / OpenAI (``visual.*``, renamed, the
fused attention in_proj split into q/k/v).
"""

from __future__ import annotations

import math
import re

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # every OpenAI CLIP ViT uses 64-wide heads
PREFIX = "vision_model."
# Hugging Face's own layout, from a CLIPVisionModel or CLIPModel file; position_ids is a
# buffer older transformers saved and ComfyUI's tower computes instead.
HF_TOWER = "vision_model.*: embeddings.{class_embedding, patch_embedding, position_embedding}, pre_layrnorm, " \
           "encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm"
IGNORED_HF_KEYS = ("vision_model.embeddings.position_ids",)
ACCEPTED = ("vision_model.* keys (Hugging Face CLIPVisionModel or CLIPModel) or visual.* keys "
            "(open_clip / OpenAI ViT)")

_OPEN_CLIP_NAMES = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}
_OPEN_CLIP_LAYER_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# The projection into the joint image-text space comes after last_hidden_state.
_OPEN_CLIP_UNUSED = ("proj",)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _open_clip_to_hf(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """open_clip's VisionTransformer keys → Hugging Face's (fused in_proj split into q/k/v)."""
    renamed, unknown = {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        block = _RESBLOCK.fullmatch(name)
        part, _, kind = block.group(2).rpartition(".") if block else ("", "", "")
        if name in _OPEN_CLIP_UNUSED:
            continue
        if name in _OPEN_CLIP_NAMES:
            renamed[PREFIX + _OPEN_CLIP_NAMES[name]] = value
        elif block and block.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            # q, k and v stacked along the output axis, in that order (torch's MultiheadAttention)
            layer = f"{PREFIX}encoder.layers.{block.group(1)}.self_attn"
            for projection, tensor in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                renamed[f"{layer}.{projection}.{block.group(2).rpartition('_')[2]}"] = tensor
        elif block and part in _OPEN_CLIP_LAYER_PARTS and kind in ("weight", "bias"):
            renamed[f"{PREFIX}encoder.layers.{block.group(1)}.{_OPEN_CLIP_LAYER_PARTS[part]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"the open_clip image tower has keys a CLIP ViT does not: {sorted(unknown)[:5]} "
                         f"({len(unknown)} in all); accepted under {prefix!r}: class_embedding, conv1, "
                         "positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj, attn.out_proj, "
                         "ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj")
    return renamed


def vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's tensors under Hugging Face's ``vision_model.*`` names, from a file in
    Hugging Face or open_clip / OpenAI layout; the other half of a full CLIP file is left out."""
    for prefix in ("", "model.", "clip_model."):
        if f"{prefix}{PREFIX}embeddings.class_embedding" in state:
            start = prefix + PREFIX
            return {k[len(prefix):]: v for k, v in state.items()
                    if k.startswith(start) and k[len(prefix):] not in IGNORED_HF_KEYS}
    if "embeddings.class_embedding" in state and "pre_layrnorm.weight" in state:
        # transformers 5 names CLIPVisionModel's tensors without the vision_model. prefix.
        return {PREFIX + k: v for k, v in state.items() if PREFIX + k not in IGNORED_HF_KEYS}
    for prefix in ("visual.", "model.visual.", ""):
        if f"{prefix}class_embedding" in state and f"{prefix}conv1.weight" in state:
            return _open_clip_to_hf(state, prefix)
    raise ValueError(f"not a CLIP ViT image tower: expected {ACCEPTED}; found keys such as {sorted(state)[:3]}")


def _shape(vision: dict[str, torch.Tensor], name: str) -> torch.Size:
    if PREFIX + name not in vision:
        raise ValueError(f"the image tower has no {PREFIX}{name}; a CLIP ViT has {HF_TOWER}")
    return vision[PREFIX + name].shape


def config_of(vision: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's CLIP vision config for the tower, read off its shapes (QuickGELU and
    LayerNorm eps 1e-5, as OpenAI's CLIP was trained)."""
    width = _shape(vision, "embeddings.class_embedding")[0]
    _, channels, patch, _ = _shape(vision, "embeddings.patch_embedding.weight")
    positions = _shape(vision, "embeddings.position_embedding.weight")[0]
    side = math.isqrt(max(positions - 1, 0))
    if positions < 2 or side * side != positions - 1:
        raise ValueError(f"the image tower has {positions} position embeddings; a CLIP ViT has a class token "
                         "plus a square grid of patches (50 for ViT-B/32 at 224 pixels)")
    if width % HEAD_WIDTH:
        raise ValueError(f"the image tower is {width} wide; a CLIP ViT is a multiple of {HEAD_WIDTH} wide "
                         "(768 for ViT-B/32)")
    indices = {int(m.group(1)) for k in vision if (m := re.match(rf"{re.escape(PREFIX)}encoder\.layers\.(\d+)\.", k))}
    if not indices:
        raise ValueError(f"the image tower has no encoder layers; a CLIP ViT has {HF_TOWER}")
    return {
        "model_type": "clip_vision_model", "hidden_size": width, "num_channels": channels,
        "intermediate_size": _shape(vision, "encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": 1 + max(indices), "num_attention_heads": width // HEAD_WIDTH,
        "patch_size": patch, "image_size": patch * side, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }


def _load_strictly(model: torch.nn.Module, vision: dict[str, torch.Tensor]) -> None:
    try:
        missing, unexpected = model.load_state_dict(vision, strict=False)
    except RuntimeError as error:  # a tensor of another shape than the config read off the file
        raise ValueError(f"the image tower's tensors do not fit one CLIP ViT: {str(error).splitlines()[-1].strip()}; "
                         f"accepted: {HF_TOWER}, all layers of one width") from error
    if missing or unexpected:
        raise ValueError(f"the image tower does not match a CLIP ViT of its own shapes: missing {sorted(missing)[:5]} "
                         f"({len(missing)} in all), unexpected {sorted(unexpected)[:5]} ({len(unexpected)} in all); "
                         f"accepted: {HF_TOWER}, or the same tower in open_clip / OpenAI layout (visual.*)")


class ImageEncoder:
    """CLIP ViT last hidden states of ComfyUI IMAGEs, as CLIPImageProcessor + CLIPVisionModel give them."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """``dtype``: how the weights are stored; by default ComfyUI's text-encoder dtype, as its
        CLIPVisionLoader stores every image encoder (the hidden states are computed in float32)."""
        import comfy.clip_model
        import comfy.model_management
        import comfy.model_patcher
        import comfy.ops

        vision = vision_state_dict(state)
        self.config = config_of(vision)
        self.load_device = comfy.model_management.text_encoder_device()
        offload_device = comfy.model_management.text_encoder_offload_device()
        self.dtype = dtype or comfy.model_management.text_encoder_dtype(self.load_device)
        self.model = comfy.clip_model.CLIPVisionModelProjection(self.config, self.dtype, offload_device,
                                                                comfy.ops.manual_cast)
        _load_strictly(self.model, vision)
        self.model.eval().requires_grad_(False)
        # ComfyUI's memory manager moves it to the GPU when used and offloads it under pressure.
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=self.load_device,
                                                        offload_device=offload_device)

    @property
    def width(self) -> int:
        return self.config["hidden_size"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) in 0..1 → CLIPImageProcessor's pixel_values: short side resized to the
        tower's size (bicubic), centre crop, OpenAI mean/std."""
        import comfy.clip_vision

        pixels = image[..., :3].to(self.load_device, torch.float32)
        return comfy.clip_vision.clip_preprocess(pixels, size=self.image_size, mean=list(OPENAI_MEAN),
                                                 std=list(OPENAI_STD), crop=True)

    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixel values → (B, tokens, width) float32, before the post-LayerNorm."""
        import comfy.model_management

        comfy.model_management.load_model_gpu(self.patcher)
        with torch.no_grad():
            last_hidden_state = self.model(pixel_values=pixel_values.to(self.load_device, torch.float32))[0]
        return last_hidden_state.to(comfy.model_management.intermediate_device(), torch.float32)

    def tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) in 0..1 → (B, tokens, width): what the adapter reads."""
        return self.hidden_states(self.preprocess(image))
