"""The Multi-Conditioned Diffusion Model (Chen et al., Sec. 3.3): loader, conditioning and
three-scale guider, and LikenessTrainMCDM, which fine-tunes an 8-channel UNet and its adapter on a
pairs folder."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.portrait_editing.mcdm import NULL_IMAGES, TRAINED_NULL
from ..attention.shared import recipes
from .common import (LIKENESS_FOLDER, chosen_recipe, dataset_folder, files_fingerprint, image_file_tensor,
                     model_file_fingerprint, model_path, numbered_path, optimiser_inputs, require, require_mask,
                     require_model_family, trainer_outputs, training_progress)
from .model_files import join_problems, missing_file
from .portrait_editing import SOURCE_SUFFIX

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


class LikenessMCDMLoader(io.ComfyNode):
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
        from ..attention.portrait_editing import mcdm
        from ..attention.portrait_editing.clip_b32 import ImageEncoder

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


class LikenessMCDMConditioning(io.ComfyNode):
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

        from ..attention.portrait_editing import mcdm as model_mcdm

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


class LikenessMCDMGuider(io.ComfyNode):
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
        from ..attention.portrait_editing.editing_guiders import MCDMCFGGuider

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


def source_prompt(folder: str, source_image) -> str:
    """p_a from <name>.source.txt beside <name>.source.png. A missing file is an error, not the
    empty prompt: the 5% identity pairs are trained under p_a (Sec. 3.3), and a silent empty prompt
    would teach "no text = no change" instead; an empty file is accepted as an empty p_a."""
    path = source_image.with_suffix(".txt")
    require(path.is_file(), "folder", folder,
            f"a source prompt file {path} beside {source_image.name} (Likeness Save Pairs writes it; the identity "
            f"pairs are trained under the source prompt; an empty file means an empty prompt)")
    return path.read_text().strip()


class PairReader:
    """A Save Pairs folder as training pairs, each read and encoded (VAE latent, B/32 tokens,
    prompts) when first asked: the node asks for all of them, jobs/train.py only for those its
    process draws. ``name`` is the folder as the user gave it, for errors."""

    def __init__(self, name: str, folder, clip, vae, encoder):
        from ..attention.shared.training_folders import find_examples

        self.name, self.clip, self.vae, self.encoder = name, clip, vae, encoder
        self.examples = find_examples(folder, SOURCE_SUFFIX)
        self.source_prompts = [source_prompt(name, example.face) for example in self.examples]  # refused up front
        self.shape = None

    def __len__(self) -> int:
        return len(self.examples)

    def inputs(self, pixels):
        import comfy.latent_formats

        from ..attention.portrait_editing.mcdm_training import ImageInputs

        return ImageInputs(comfy.latent_formats.SD15().process_in(self.vae.encode(pixels)), self.encoder.tokens(pixels))

    def text(self, prompt: str) -> list:
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))

    def __getitem__(self, index: int):
        import torch

        from ..attention.portrait_editing.mcdm_training import EditPair

        with torch.no_grad():  # jobs/train.py reads pairs inside the training loop: no graph through the encoders
            return self._read(index, EditPair)

    def _read(self, index: int, EditPair):
        example = self.examples[index]
        target, source = image_file_tensor(example.image), image_file_tensor(example.face)
        require(target.shape == source.shape, "folder", self.name,
                f"pairs of equal size ({example.image.name} and {example.face.name} differ)")
        self.shape = self.shape or source.shape
        return EditPair(self.inputs(source), self.inputs(target), self.text(example.caption),
                    self.text(self.source_prompts[index]))

    def null(self):
        """What dropout puts in place of the input image, at the first pair's size: the released
        training's null (mcdm.TRAINED_NULL), as MCDM Conditioning builds its negative by default."""
        import torch

        from ..attention.portrait_editing.mcdm import NULL_IMAGES, TRAINED_NULL, null_inputs
        from ..attention.portrait_editing.mcdm_training import ImageInputs, Null

        if self.shape is None:
            self.shape = image_file_tensor(self.examples[0].face).shape
        with torch.no_grad():
            clip_tokens, latent, spatial = null_inputs(NULL_IMAGES[TRAINED_NULL], self.vae, self.encoder,
                                                       torch.zeros(self.shape))
        return Null(ImageInputs(latent, clip_tokens), spatial)


class LikenessTrainMCDM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainMCDM",
            display_name="Likeness Train MCDM",
            category=CATEGORY,
            description="Fine-tunes the whole 8-channel UNet and the embedding adapter on a Likeness Save Pairs "
                        "folder (the paper's and released code's recipe: extra conv_in channels start at zero, 5% "
                        "identity pairs, 20% condition dropout to the released training's nulls, AdamW with weight "
                        "decay, the UNet's gradient norm clipped). Each pair is <name>.png (target), "
                        "<name>.source.png, <name>.txt (target prompt) and <name>.source.txt (source prompt: identity "
                        "pairs learn source → source under it). Writes <prefix>_NNNNN.safetensors (UNet) and "
                        "<prefix>_NNNNN.adapter.safetensors to models/likeness/ for Likeness MCDM Loader.",
            inputs=[
                io.Model.Input("model", tooltip="An MCDM to continue, or the SD1.5 model to start from (its conv_in "
                               "gets 4 zero-initialised channels)."),
                MCDMType.Input("mcdm", tooltip="From Likeness MCDM Loader: its CLIP ViT-B/32, and its adapter to "
                               "continue (a new one starts as the identity on the CLIP tokens when it has none)."),
                io.Clip.Input("clip", tooltip="Encodes the prompts (frozen)."),
                io.Vae.Input("vae", tooltip="Encodes the images (frozen)."),
                io.String.Input("folder", default="likeness_pairs",
                                tooltip="The pairs folder, absolute or inside ComfyUI's input folder."),
                *optimiser_inputs("pairs", recipes.MCDM_TRAINING),
                io.String.Input("filename_prefix", default="mcdm",
                                tooltip="File name in models/likeness/; a counter is added."),
            ],
            outputs=trainer_outputs("UNet"),
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> tuple:
        return files_fingerprint(dataset_folder(folder))

    @classmethod
    def execute(cls, model, mcdm, clip, vae, folder: str, steps: int, learning_rate: float, seed: int,
                filename_prefix: str, weight_decay: float = recipes.MCDM_TRAINING.weight_decay,
                max_grad_norm: float = recipes.MCDM_TRAINING.max_grad_norm, batch_size: int = recipes.MCDM_TRAINING.batch
                ) -> io.NodeOutput:
        from ..attention.portrait_editing.mcdm import EmbeddingAdapter
        from ..attention.portrait_editing.mcdm_training import save, train_mcdm
        from ..attention.shared.training_loop import Batching

        require_model_family(model)
        recipe = chosen_recipe(recipes.MCDM_TRAINING, learning_rate, weight_decay, max_grad_norm, batch_size)
        encoder = mcdm.image_encoder
        require(encoder is not None, "mcdm", mcdm.names.get("clip_vision"),
                "an MCDM loaded with a CLIP ViT-B/32 (clip_vision_name) for the adapter's image tokens")
        reader = PairReader(folder, dataset_folder(folder), clip, vae, encoder)
        pairs = [reader[index] for index in range(len(reader))]
        null = reader.null()
        adapter = mcdm.adapter
        if adapter is None:
            width = model.model.model_config.unet_config["context_dim"]
            adapter = EmbeddingAdapter(width, 1024, null.image.clip_tokens.shape[1])
        progress = training_progress(steps)
        trained, trained_adapter, before, after = train_mcdm(
            model, adapter, pairs, empty_text=reader.text(""), null=null, steps=steps, recipe=recipe, seed=seed,
            on_step=progress, batching=Batching(recipe.batch))
        unet_path = numbered_path(LIKENESS_FOLDER, filename_prefix)
        adapter_path = unet_path.with_name(unet_path.stem + ".adapter.safetensors")
        save(trained, trained_adapter, unet_path, adapter_path,
             {"steps": steps, "learning_rate": learning_rate, "weight_decay": weight_decay,
              "max_grad_norm": max_grad_norm, "batch_size": batch_size, "pairs": len(pairs), "loss_before": before,
              "loss_after": after})
        curve = progress.curve(before, after, f"MCDM training: {unet_path.name}")
        return io.NodeOutput(unet_path.name, before, after, curve, ui={"text": [
            f"{unet_path.name} + {adapter_path.name}: loss {before:.4f} → {after:.4f}"]})


NODES = [LikenessMCDMLoader, LikenessMCDMConditioning, LikenessMCDMGuider, LikenessTrainMCDM]
