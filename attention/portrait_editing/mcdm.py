"""The Multi-Conditioned Diffusion Model (Chen et al., Sec. 3.3): an SD1.5 UNet
whose conv_in also takes the input image's latent c_s, plus an embedding
adapter whose image tokens c_im follow the 77 text tokens.

The released weights (bytedance/feature-preserve-portrait-editing) are a
diffusers ``UNet2DConditionModel`` state dict (``unet.pth``, often saved from
a DataParallel wrapper, hence ``module.``) and a four-tensor ``adapter.pth``.
ComfyUI 0.3.75 recognises diffusers UNets only by matching known configs and
knows no 8-channel SD1.5, so the UNet config is read off the tensor shapes
here and ComfyUI's own diffusers→LDM key map is applied to it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

CONCAT_CHANNELS = 8  # noisy latent (4) + the input image's latent c_s (4)
ADAPTER_KEYS = ("vae2clip.weight", "vae2clip.bias", "linear1.weight", "linear1.bias")
LATENT_TOKENS = 4  # vae2clip turns each of the 4 latent channels into one token


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a pickled state dict read with ``weights_only=True``
    (a file that needs arbitrary code to load is refused by torch)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = _load_pickle(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name} is not a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_pickle(path: Path):
    import pickle

    try:
        try:  # mmap keeps a 3.4 GB UNet out of memory until its tensors are copied into the model
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # pre-zipfile format
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path.name} holds more than tensors and is refused (read with weights_only=True; "
                         f"save a plain state dict or .safetensors): {str(error).splitlines()[0]}") from error
    for wrapper in ("state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


# --- the embedding adapter -------------------------------------------------------------------------------------


class EmbeddingAdapter(torch.nn.Module):
    """c_im = linear1 over the token axis of [CLIP tokens; vae2clip(maxpool2(c_s))]
    (the released module; linear1 starts as the identity on the CLIP tokens)."""

    def __init__(self, width: int, latent_features: int, image_tokens: int) -> None:
        super().__init__()
        self.vae2clip = torch.nn.Linear(latent_features, width)
        self.linear1 = torch.nn.Linear(image_tokens + LATENT_TOKENS, image_tokens)
        with torch.no_grad():
            self.linear1.weight.copy_(torch.eye(image_tokens, image_tokens + LATENT_TOKENS))

    @property
    def latent_side(self) -> int:
        """The latent size the adapter was trained on (64 for 512×512 images)."""
        return 2 * math.isqrt(self.vae2clip.in_features)

    @property
    def image_tokens(self) -> int:
        return self.linear1.out_features

    def forward(self, clip_tokens: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        weight = self.vae2clip.weight
        latent = latent.to(weight)
        side = self.latent_side
        if latent.shape[-2:] != (side, side):
            # Trained on 512×512 inputs only; other sizes are resized for these four tokens.
            latent = F.interpolate(latent, size=(side, side), mode="bilinear", align_corners=False)
        pooled = F.max_pool2d(latent, 2).flatten(2)
        tokens = torch.cat([clip_tokens.to(weight), self.vae2clip(pooled)], dim=1)
        return self.linear1(tokens.transpose(1, 2)).transpose(1, 2)


def adapter_from_state_dict(state: dict[str, torch.Tensor]) -> EmbeddingAdapter:
    missing = [k for k in ADAPTER_KEYS if k not in state]
    unexpected = sorted(set(state) - set(ADAPTER_KEYS))
    if missing or unexpected:
        raise ValueError(f"not an MCDM adapter: expected exactly {', '.join(ADAPTER_KEYS)}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unexpected {', '.join(unexpected[:5])}{'…' if len(unexpected) > 5 else ''}"
                            if unexpected else ""))
    width, latent_features = state["vae2clip.weight"].shape
    image_tokens, mixed = state["linear1.weight"].shape
    side = math.isqrt(latent_features)
    if side * side != latent_features or mixed != image_tokens + LATENT_TOKENS:
        raise ValueError(f"not an MCDM adapter: vae2clip takes {latent_features} features (expected a square "
                         f"pooled latent, 1024 for 512×512) and linear1 is {image_tokens}×{mixed} (expected "
                         f"N×(N+{LATENT_TOKENS}))")
    adapter = EmbeddingAdapter(width, latent_features, image_tokens)
    adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return adapter.eval().requires_grad_(False)


# --- the 8-channel UNet ------------------------------------------------------------------------------------------


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def unet_config_from_diffusers(state: dict[str, torch.Tensor]) -> dict:
    """An SD1.5-family ComfyUI unet_config read off a diffusers UNet2DConditionModel's shapes
    (any width: the heads follow SD1.5's fixed 8, which the weights cannot show)."""
    if "conv_in.weight" not in state or "down_blocks.0.resnets.0.conv1.weight" not in state:
        raise ValueError("not a diffusers UNet: no conv_in.weight / down_blocks.0.resnets.0.conv1.weight")
    if any(k.startswith("add_embedding.") for k in state):
        raise ValueError("this is an SDXL-family UNet (it has add_embedding); the MCDM is SD1.5")
    model_channels, in_channels = state["conv_in.weight"].shape[:2]
    blocks = _count(state, r"down_blocks\.(\d+)\.")
    channel_mult, num_res_blocks, depth, depth_output = [], [], [], []
    for block in range(blocks):
        channel_mult.append(state[f"down_blocks.{block}.resnets.0.conv2.weight"].shape[0] // model_channels)
        resnets = _count(state, rf"down_blocks\.{block}\.resnets\.(\d+)\.")
        num_res_blocks.append(resnets)
        depth += [_count(state, rf"down_blocks\.{block}\.attentions\.{i}\.transformer_blocks\.(\d+)\.")
                  for i in range(resnets)]
    for block in range(blocks):
        depth_output += [_count(state, rf"up_blocks\.{block}\.attentions\.{i}\.transformer_blocks\.(\d+)\.")
                         for i in range(_count(state, rf"up_blocks\.{block}\.resnets\.(\d+)\."))]
    proj_in = next(v for k, v in state.items() if k.endswith("attentions.0.proj_in.weight"))
    to_k = next(v for k, v in state.items() if k.endswith("attn2.to_k.weight"))
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": state["conv_out.weight"].shape[0],
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "in_channels": in_channels, "model_channels": model_channels, "num_res_blocks": num_res_blocks,
        "transformer_depth": depth, "channel_mult": channel_mult,
        "transformer_depth_middle": _count(state, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        "use_linear_in_transformer": proj_in.ndim == 2, "context_dim": to_k.shape[1],
        # ComfyUI's key map pops the decoder's depths from the end: up_blocks.0 is the list's tail.
        "transformer_depth_output": depth_output[::-1],
        "num_heads": 8, "num_head_channels": -1, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def diffusers_to_ldm(state: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
    """Renames through ComfyUI's own diffusers map (which also lists optional keys, such as
    shortcuts a block may not have); a key the map does not know is an error."""
    import comfy.utils

    names = comfy.utils.unet_to_diffusers(unet_config)
    unexpected = sorted(set(state) - set(names))
    if unexpected:
        raise ValueError(f"the UNet's keys do not form an SD1.5-family UNet; unexpected {', '.join(unexpected[:5])}")
    return {ldm: state[diffusers] for diffusers, ldm in names.items() if diffusers in state}


LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def ldm_unet(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(UNet weights, unet_config) of a state dict in ComfyUI's LDM layout (a checkpoint, such as
    InstructPix2Pix, or a bare UNet such as LikenessTrainMCDM writes), else None."""
    import comfy.model_detection

    for prefix in (*LDM_PREFIXES, ""):
        if f"{prefix}input_blocks.0.0.weight" in state:
            unet = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            config = comfy.model_detection.detect_unet_config(unet, "")
            if config is None:
                return None
            config = {**config, "num_heads": 8, "num_head_channels": -1}
            return unet, config
    return None


@dataclass
class UNetFile:
    weights: dict[str, torch.Tensor]  # LDM keys
    unet_config: dict
    layout: str  # "diffusers" or "ldm"


def read_unet(state: dict[str, torch.Tensor]) -> UNetFile:
    """The 8-channel SD1.5 UNet of a file in diffusers or LDM layout, checked."""
    found = ldm_unet(state)
    if found is not None:
        weights, config, layout = *found, "ldm"
    else:
        config = unet_config_from_diffusers(state)
        weights, layout = diffusers_to_ldm(state, config), "diffusers"
    if config.get("adm_in_channels") or config.get("context_dim") is None:
        raise ValueError("this is not an SD1.5-family UNet (it has a class/size embedding or no cross-attention)")
    if config["in_channels"] != CONCAT_CHANNELS:
        raise ValueError(f"its conv_in takes {config['in_channels']} channels; an MCDM or InstructPix2Pix UNet "
                         f"takes {CONCAT_CHANNELS} (noisy latent + input latent)")
    return UNetFile(weights, config, layout)


def build_model(unet: UNetFile, dtype: torch.dtype | None = None):
    """A ComfyUI ModelPatcher for the UNet: SD1.5 InstructPix2Pix model class (it concatenates
    ``concat_latent_image`` to the noisy latent), dtype (unless given) and devices chosen as
    ComfyUI chooses them."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    model_config = comfy.supported_models.SD15_instructpix2pix(dict(unet.unet_config))
    parameters = comfy.utils.calculate_parameters(unet.weights)
    weight_dtype = comfy.utils.weight_dtype(unet.weights)
    load_device = mm.get_torch_device()
    unet_dtype = dtype or mm.unet_dtype(model_params=parameters, weight_dtype=weight_dtype,
                                        supported_dtypes=list(model_config.supported_inference_dtypes))
    model_config.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device,
                                                                        model_config.supported_inference_dtypes))
    model = model_config.get_model(unet.weights, "")
    expected = set(model.diffusion_model.state_dict())
    missing, unexpected = sorted(expected - set(unet.weights)), sorted(set(unet.weights) - expected)
    if missing or unexpected:
        raise ValueError("the UNet's tensors do not fill an SD1.5-family UNet"
                         + (f"; missing {', '.join(missing[:5])}" if missing else "")
                         + (f"; unexpected {', '.join(unexpected[:5])}" if unexpected else ""))
    model = model.to(mm.unet_offload_device())
    model.load_model_weights(unet.weights, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def model_unet_weights(model) -> dict[str, torch.Tensor]:
    """The UNet of a ComfyUI model, LDM keys, as the trainer writes them."""
    return {k: v.detach().cpu().contiguous() for k, v in model.model.diffusion_model.state_dict().items()}


# --- what the conditioning nodes build and the guider reads ------------------------------------------------------


@dataclass
class MCDM:
    """LIKENESS_MCDM: what the conditioning node needs besides the UNet.

    ``scaled_concat``: the released MCDM was trained on c_s = VAE latent × 0.18215
    (the model's latent scale); InstructPix2Pix on the unscaled latent."""

    adapter: EmbeddingAdapter | None = None
    image_encoder: object | None = None  # attention.portrait_editing.clip_b32.ImageEncoder
    scaled_concat: bool = True
    names: dict = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return 0 if self.adapter is None else self.adapter.image_tokens


@dataclass(frozen=True)
class NullImage:
    """Eq. 1's ∅ for the image conditions: the flat image CLIP reads for the null tokens, the flat
    image the VAE encodes for the adapter's latent, and whether a dropped c_s is that latent
    (otherwise zeros). Pixel values in ComfyUI's 0..1 (0.5 is 0 in the VAE's −1..1)."""

    clip_pixel: float
    vae_pixel: float
    spatial_is_latent: bool


# The released training (dataset/dataset.py) drops an image to zeros in −1..1, a mid-grey image, for
# the VAE (c_s and the adapter's latent) and to a black PIL image for CLIP: the released weights
# learnt that ∅, and Likeness' trainer trains it. The released demo (pipelines/pipeline.py) reads a
# black image in both and zeros for c_s, inputs the training never showed the model.
TRAINED_NULL = "grey (released training)"
NULL_IMAGES = {TRAINED_NULL: NullImage(clip_pixel=0.0, vae_pixel=0.5, spatial_is_latent=True),
               "black (released demo)": NullImage(clip_pixel=0.0, vae_pixel=0.0, spatial_is_latent=False)}


def null_inputs(null: NullImage, vae, encoder, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor | None]:
    """(CLIP tokens, model-space latent, dropped c_s or None for zeros) of the null image at the size
    of ``like`` (an IMAGE, (B, H, W, 3)): what the adapter reads for ∅ and what replaces c_s."""
    import comfy.latent_formats

    flat = torch.ones_like(like[:1, ..., :3])
    clip_tokens = encoder.tokens(flat * null.clip_pixel)
    latent = comfy.latent_formats.SD15().process_in(vae.encode(flat * null.vae_pixel))
    return clip_tokens, latent, latent if null.spatial_is_latent else None


MCDM_KEY = "likeness_mcdm_image_tokens"  # conditioning option: how many trailing tokens are image tokens


def image_tokens_of(cond: list) -> int:
    return int(cond[0][1].get(MCDM_KEY, 0)) if cond else 0


def with_image(cond: list, image_tokens: torch.Tensor | None, concat: torch.Tensor | None) -> list:
    """Each entry's text tokens followed by the image tokens, with c_s as ``concat_latent_image``
    (None: the entry gets none, so ComfyUI's InstructPix2Pix model concatenates zeros)."""
    out = []
    for tokens, options in cond:
        options = {k: v for k, v in options.items() if k != "concat_latent_image"}
        count = 0
        if image_tokens is not None:
            batch = max(tokens.shape[0], image_tokens.shape[0])
            tokens = torch.cat([tokens.expand(batch, -1, -1), image_tokens.to(tokens).expand(batch, -1, -1)], dim=1)
            count = image_tokens.shape[1]
        if concat is not None:
            options["concat_latent_image"] = concat
        options[MCDM_KEY] = count
        out.append([tokens, options])
    return out


def text_of(cond: list) -> list:
    """The conditioning without its image tokens and c_s."""
    out = []
    for tokens, options in cond:
        count = int(options.get(MCDM_KEY, 0))
        out.append([tokens[:, : tokens.shape[1] - count] if count else tokens,
                    {k: v for k, v in options.items() if k not in ("concat_latent_image", MCDM_KEY)}])
    return out


def image_of(cond: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(image tokens, c_s) of the first entry of an MCDM conditioning."""
    tokens, options = cond[0]
    count = int(options.get(MCDM_KEY, 0))
    return (tokens[:, -count:] if count else None), options.get("concat_latent_image")


@dataclass
class GuidanceRows:
    """The released code's batch: 0 = (negative text, null image, null c_s), 1 = (prompt, image, c_s),
    2 = (negative text, image, null c_s), 3 = (negative text, image, c_s). The null c_s is the one the
    negative carries (MCDM Conditioning's null image), zeros where it carries none. Without image
    tokens (InstructPix2Pix) row 2 is row 0 and is not computed."""

    null: list
    full: list
    image_only: list | None
    image_spatial: list


def guidance_rows(positive: list, negative: list) -> GuidanceRows:
    image_tokens, concat = image_of(positive)
    if concat is None:
        raise ValueError("positive has no input-image latent: connect it through Likeness MCDM Conditioning")
    if image_tokens is not None and image_of(negative)[0] is None:
        raise ValueError("negative has no null-image tokens while positive has image tokens: connect the negative "
                         "output of the same Likeness MCDM Conditioning")
    null_text = text_of(negative)
    null_tokens, null_concat = image_of(negative)
    return GuidanceRows(
        null=with_image(text_of(negative), null_tokens, null_concat),
        full=positive,
        image_only=None if image_tokens is None else with_image(null_text, image_tokens, null_concat),
        image_spatial=with_image(null_text, image_tokens, concat),
    )


def combine(null, full, image_only, image_spatial, s_image: float, s_spatial: float, s_text: float):
    """Eq. 1 as the released code computes it:
    ε0 + s1(ε2 − ε0) + s2(ε3 − ε2) + s3(ε1 − ε3). The rows' weights (1 − s1, s1 − s2, s2 − s3,
    s3) sum to 1 whatever the scales, so the same combination of x0 predictions is exactly the
    combination of ε predictions (x0 = x − σ·ε)."""
    if image_only is None:
        image_only = null
    return (null + s_image * (image_only - null) + s_spatial * (image_spatial - image_only)
            + s_text * (full - image_spatial))
