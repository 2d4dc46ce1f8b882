"""The Multi-Conditioned Diffusion Model (Chen et al., Sec. 3.3): loader,
conditioning and three-scale guider."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.mcdm import NULL_IMAGES, TRAINED_NULL
from .common import (LIKENESS_FOLDER, model_file_fingerprint, model_path, require, require_mask,
                     require_model_family)
from .model_files import join_problems, missing_file

CATEGORY = "likeness/editing"
NONE = "none"
CLIP_VISION_FOLDER = "clip_vision"

MCDMType = io.Custom("LIKENESS_MCDM")


def likeness_files() -> list[str]:
    import folder_paths

    return sorted(folder_paths.get_filename_list(LIKENESS_FOLDER))


def clip_vision_files() -> list[str]:
    import folder_paths

    return sorted(folder_paths.get_filename_list(CLIP_VISION_FOLDER))


def _path(folder: str, input_name: str, name: str, files: list[str]) -> str:
    return model_path(folder, input_name, name, f"a file in models/{folder}/ (found: {', '.join(files) or 'none'})")


class MCDMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessMCDMLoader",
            display_name="Likeness MCDM Loader",
            category=CATEGORY,
            description="Loads a Multi-Conditioned Diffusion Model: an SD1.5 UNet whose conv_in also takes the input "
                        "image's latent (the released unet.pth, a LikenessTrainMCDM file, or an InstructPix2Pix "
                        "checkpoint), its embedding adapter (adapter.pth) and the CLIP ViT-B/32 image tower the "
                        "adapter reads. Take CLIP and VAE from the SD1.5 checkpoint it was fine-tuned from.",
            inputs=[
                io.Combo.Input("unet_name", options=likeness_files(),
                               tooltip="In models/likeness/: unet.pth from bytedance/feature-preserve-portrait-"
                                       "editing (portrait_editing_models/<outfit|cartoon>/checkpoint-200000/), a "
                                       "trained .safetensors, or an InstructPix2Pix checkpoint."),
                io.Combo.Input("adapter_name", options=[NONE, *likeness_files()],
                               tooltip="adapter.pth released beside unet.pth, or the trainer's .adapter file; "
                                       "none for InstructPix2Pix (no image tokens)."),
                io.Combo.Input("clip_vision_name", options=[NONE, *clip_vision_files()],
                               tooltip="CLIP ViT-B/32 in models/clip_vision/ (openai/clip-vit-base-patch32 "
                                       "model.safetensors, or open_clip/OpenAI ViT-B-32 weights); needed with "
                                       "an adapter."),
            ],
            outputs=[io.Model.Output(tooltip="The 8-channel UNet, for the MCDM guider, Edit Mask and samplers."),
                     MCDMType.Output(display_name="mcdm", tooltip="Adapter and image tower, for MCDM Conditioning.")],
        )

    @classmethod
    def validate_inputs(cls, unet_name: str, adapter_name: str, clip_vision_name: str) -> bool | str:
        return join_problems(
            missing_file(LIKENESS_FOLDER, "unet_name", unet_name, likeness_files()),
            missing_file(LIKENESS_FOLDER, "adapter_name", adapter_name, likeness_files(), (NONE,)),
            missing_file(CLIP_VISION_FOLDER, "clip_vision_name", clip_vision_name, clip_vision_files(), (NONE,)))

    @classmethod
    def fingerprint_inputs(cls, unet_name: str, adapter_name: str, clip_vision_name: str) -> tuple:
        return (model_file_fingerprint(LIKENESS_FOLDER, unet_name, adapter_name),
                model_file_fingerprint(CLIP_VISION_FOLDER, clip_vision_name))

    @classmethod
    def execute(cls, unet_name: str, adapter_name: str, clip_vision_name: str) -> io.NodeOutput:
        from ..attention import mcdm
        from ..attention.clip_b32 import ImageEncoder

        path = _path(LIKENESS_FOLDER, "unet_name", unet_name, likeness_files())
        try:
            unet = mcdm.read_unet(mcdm.load_state_dict(path))
            model = mcdm.build_model(unet)
        except ValueError as error:
            raise ValueError(f"unet_name={unet_name!r} cannot be used: {error}") from error
        adapter = encoder = None
        if adapter_name != NONE:
            require(clip_vision_name != NONE, "clip_vision_name", clip_vision_name,
                    "a CLIP ViT-B/32 file when adapter_name is set (the adapter reads its hidden states)")
            try:
                adapter = mcdm.adapter_from_state_dict(mcdm.load_state_dict(
                    _path(LIKENESS_FOLDER, "adapter_name", adapter_name, likeness_files())))
            except ValueError as error:
                raise ValueError(f"adapter_name={adapter_name!r} cannot be used: {error}") from error
        if clip_vision_name != NONE:
            try:
                encoder = ImageEncoder(mcdm.load_state_dict(
                    _path(CLIP_VISION_FOLDER, "clip_vision_name", clip_vision_name, clip_vision_files())))
            except ValueError as error:
                raise ValueError(f"clip_vision_name={clip_vision_name!r} cannot be used: {error}") from error
        if adapter is not None:
            width = model.model.model_config.unet_config["context_dim"]
            require(adapter.vae2clip.out_features == width, "adapter_name", adapter_name,
                    f"an adapter with {width}-wide tokens for this UNet (it makes {adapter.vae2clip.out_features})")
            require(encoder.width == adapter.vae2clip.out_features, "clip_vision_name", clip_vision_name,
                    f"a {adapter.vae2clip.out_features}-wide CLIP ViT (ViT-B/32) for this adapter "
                    f"(this one is {encoder.width} wide)")
        # The released MCDM reads the scaled latent; InstructPix2Pix (no adapter) the raw one.
        state = mcdm.MCDM(adapter=adapter, image_encoder=encoder, scaled_concat=adapter is not None,
                          names={"unet": unet_name, "adapter": adapter_name, "clip_vision": clip_vision_name})
        return io.NodeOutput(model, state)


class MCDMConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessMCDMConditioning",
            display_name="Likeness MCDM Conditioning",
            category=CATEGORY,
            description="Adds the input image to text conditionings for an MCDM: its VAE latent c_s (concatenated "
                        "to the noisy latent) and the adapter's image tokens c_im (after the text tokens). The "
                        "negative gets the null image's tokens and c_s, the ∅ the MCDM was trained with.",
            inputs=[
                MCDMType.Input("mcdm", tooltip="From Likeness MCDM Loader."),
                io.Conditioning.Input("positive", tooltip="The edit prompt (e.g. 'a man in a suit')."),
                io.Conditioning.Input("negative", tooltip="Usually an empty prompt (the released code's)."),
                io.Vae.Input("vae", tooltip="The SD1.5 VAE."),
                io.Image.Input("image", tooltip="The portrait to edit (512×512 as the MCDM was trained)."),
                io.Combo.Input("null_image", options=list(NULL_IMAGES), default=TRAINED_NULL, optional=True,
                               tooltip="Eq. 1's ∅ for the image and c_s (MCDMs with an adapter). grey: what the "
                                       "released training and Likeness Train MCDM drop an image to (CLIP reads a "
                                       "black image, the VAE a mid-grey one, c_s is its latent). black: the "
                                       "released demo's (a black image in both, zeros for c_s), which the "
                                       "weights never saw in training; for reproducing the demo's pictures."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Prompt + image tokens + c_s."),
                     io.Conditioning.Output(display_name="negative", tooltip="Negative + null image tokens."),
                     io.Latent.Output(display_name="latent", tooltip="The image's latent (for Edit Mask, img2img).")],
        )

    @classmethod
    def execute(cls, mcdm, positive, negative, vae, image, null_image: str = TRAINED_NULL) -> io.NodeOutput:
        import comfy.latent_formats
        import torch

        from ..attention import mcdm as model_mcdm

        require(null_image in NULL_IMAGES, "null_image", null_image, f"one of {', '.join(NULL_IMAGES)}")
        pixels = image[..., :3]
        latent = vae.encode(pixels)
        scaled = comfy.latent_formats.SD15().process_in(latent)
        concat = scaled if mcdm.scaled_concat else latent
        tokens = null = null_concat = None
        if mcdm.adapter is not None:
            null_clip, null_latent, null_concat = model_mcdm.null_inputs(NULL_IMAGES[null_image], vae,
                                                                         mcdm.image_encoder, pixels)
            with torch.no_grad():
                tokens = mcdm.adapter(mcdm.image_encoder.tokens(pixels), scaled)
                null = mcdm.adapter(null_clip, null_latent)
        return io.NodeOutput(model_mcdm.with_image(positive, tokens, concat),
                             model_mcdm.with_image(negative, null, null_concat), {"samples": latent})


class MCDMGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessMCDMGuider",
            display_name="Likeness MCDM Guider",
            category=CATEGORY,
            description="Eq. 1's three guidance scales (image embedding s1, spatial s2, text s3) for an MCDM. With a "
                        "source conditioning and a mask, mask-guided noise blending (Eq. 3): the target prompt "
                        "inside the mask, the source prompt outside. Use with SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The MCDM (or InstructPix2Pix) from Likeness MCDM Loader."),
                io.Conditioning.Input("positive", tooltip="MCDM Conditioning's positive (the edit prompt)."),
                io.Conditioning.Input("negative", tooltip="MCDM Conditioning's negative."),
                io.Float.Input("image_scale", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="s1, image-embedding guidance (released 3, paper 3)."),
                io.Float.Input("spatial_scale", default=2.0, min=0.0, max=30.0, step=0.1,
                               tooltip="s2, spatial (input latent) guidance (released 2, paper 3)."),
                io.Float.Input("text_scale", default=4.0, min=0.0, max=30.0, step=0.1,
                               tooltip="s3, text guidance (released 4, paper 5)."),
                io.Conditioning.Input("source", optional=True,
                                      tooltip="MCDM Conditioning's positive for the input's own prompt p_a; "
                                              "with a mask, kept outside it."),
                io.Mask.Input("mask", optional=True, tooltip="Where to edit (1), from Likeness Edit Mask."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, image_scale: float, spatial_scale: float, text_scale: float,
                source=None, mask=None) -> io.NodeOutput:
        from ..attention.guiders import MCDMCFGGuider

        require_model_family(model, image_channels=8)
        require((source is None) == (mask is None), "mask", "given" if mask is not None else None,
                "both source and mask (mask-guided) or neither")
        if mask is not None:
            require_mask(mask)
        guider = MCDMCFGGuider(model)
        try:
            guider.set_conds(positive, negative, source, mask)
        except ValueError as error:
            raise ValueError(f"positive/negative cannot be used: {error}") from error
        guider.set_scales(image_scale, spatial_scale, text_scale)
        return io.NodeOutput(guider)


NODES = [MCDMLoader, MCDMConditioning, MCDMGuider]
