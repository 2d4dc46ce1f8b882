"""LikenessTrainMCDM: fine-tunes an 8-channel UNet and its adapter on a pairs folder."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention import recipes
from .common import (LIKENESS_FOLDER, chosen_recipe, dataset_folder, files_fingerprint, image_file_tensor,
                     numbered_path, optimiser_inputs, require, require_model_family, trainer_outputs,
                     training_progress)
from .mcdm import MCDMType
from .pairs import SOURCE_SUFFIX

CATEGORY = "likeness/editing"


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
        from ..attention.face_kv_training import find_examples

        self.name, self.clip, self.vae, self.encoder = name, clip, vae, encoder
        self.examples = find_examples(folder, SOURCE_SUFFIX)
        self.source_prompts = [source_prompt(name, example.face) for example in self.examples]  # refused up front
        self.shape = None

    def __len__(self) -> int:
        return len(self.examples)

    def inputs(self, pixels):
        import comfy.latent_formats

        from ..attention.mcdm_training import ImageInputs

        return ImageInputs(comfy.latent_formats.SD15().process_in(self.vae.encode(pixels)), self.encoder.tokens(pixels))

    def text(self, prompt: str) -> list:
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))

    def __getitem__(self, index: int):
        import torch

        from ..attention.mcdm_training import Pair

        with torch.no_grad():  # jobs/train.py reads pairs inside the training loop: no graph through the encoders
            return self._read(index, Pair)

    def _read(self, index: int, Pair):
        example = self.examples[index]
        target, source = image_file_tensor(example.image), image_file_tensor(example.face)
        require(target.shape == source.shape, "folder", self.name,
                f"pairs of equal size ({example.image.name} and {example.face.name} differ)")
        self.shape = self.shape or source.shape
        return Pair(self.inputs(source), self.inputs(target), self.text(example.caption),
                    self.text(self.source_prompts[index]))

    def null(self):
        """What dropout puts in place of the input image, at the first pair's size: the released
        training's null (mcdm.TRAINED_NULL), as MCDM Conditioning builds its negative by default."""
        import torch

        from ..attention.mcdm import NULL_IMAGES, TRAINED_NULL, null_inputs
        from ..attention.mcdm_training import ImageInputs, Null

        if self.shape is None:
            self.shape = image_file_tensor(self.examples[0].face).shape
        with torch.no_grad():
            clip_tokens, latent, spatial = null_inputs(NULL_IMAGES[TRAINED_NULL], self.vae, self.encoder,
                                                       torch.zeros(self.shape))
        return Null(ImageInputs(latent, clip_tokens), spatial)


class TrainMCDM(io.ComfyNode):
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
                *optimiser_inputs("pairs", recipes.MCDM),
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
                filename_prefix: str, weight_decay: float = recipes.MCDM.weight_decay,
                max_grad_norm: float = recipes.MCDM.max_grad_norm, batch_size: int = recipes.MCDM.batch
                ) -> io.NodeOutput:
        from ..attention.mcdm import EmbeddingAdapter
        from ..attention.mcdm_training import save, train_mcdm
        from ..attention.training import Batching

        require_model_family(model)
        recipe = chosen_recipe(recipes.MCDM, learning_rate, weight_decay, max_grad_norm, batch_size)
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


NODES = [TrainMCDM]
