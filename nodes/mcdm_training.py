"""LikenessTrainMCDM: fine-tunes an 8-channel UNet and its adapter on a pairs folder."""

from __future__ import annotations

from comfy_api.latest import io

from .common import (LIKENESS_FOLDER, dataset_folder, files_fingerprint, image_file_tensor, numbered_path,
                     optimiser_inputs, require, require_model_family, trainer_outputs, training_progress)
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


class TrainMCDM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainMCDM",
            display_name="Likeness Train MCDM",
            category=CATEGORY,
            description="Fine-tunes the whole 8-channel UNet and the embedding adapter on a Likeness Save Pairs "
                        "folder (the paper's recipe: extra conv_in channels start at zero, 5% identity pairs, 20% "
                        "condition dropout). Each pair is <name>.png (target), <name>.source.png, <name>.txt "
                        "(target prompt) and <name>.source.txt (source prompt: identity pairs learn source → source "
                        "under it). Writes <prefix>_NNNNN.safetensors (UNet) and <prefix>_NNNNN.adapter.safetensors "
                        "to models/likeness/ for Likeness MCDM Loader.",
            inputs=[
                io.Model.Input("model", tooltip="An MCDM to continue, or the SD1.5 model to start from (its conv_in "
                               "gets 4 zero-initialised channels)."),
                MCDMType.Input("mcdm", tooltip="From Likeness MCDM Loader: its CLIP ViT-B/32, and its adapter to "
                               "continue (a new one starts as the identity on the CLIP tokens when it has none)."),
                io.Clip.Input("clip", tooltip="Encodes the prompts (frozen)."),
                io.Vae.Input("vae", tooltip="Encodes the images (frozen)."),
                io.String.Input("folder", default="likeness_pairs",
                                tooltip="The pairs folder, absolute or inside ComfyUI's input folder."),
                *optimiser_inputs("one pair"),
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
                filename_prefix: str) -> io.NodeOutput:
        import comfy.latent_formats
        import torch

        from ..attention.face_kv_training import find_examples
        from ..attention.mcdm import EmbeddingAdapter
        from ..attention.mcdm_training import ImageInputs, Pair, save, train_mcdm

        require_model_family(model)
        encoder = mcdm.image_encoder
        require(encoder is not None, "mcdm", mcdm.names.get("clip_vision"),
                "an MCDM loaded with a CLIP ViT-B/32 (clip_vision_name) for the adapter's image tokens")
        latent_format = comfy.latent_formats.SD15()

        def inputs(pixels) -> ImageInputs:
            return ImageInputs(latent_format.process_in(vae.encode(pixels)), encoder.tokens(pixels))

        def text(prompt: str) -> list:
            return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))

        pairs, black = [], None
        for example in find_examples(dataset_folder(folder), SOURCE_SUFFIX):
            target, source = image_file_tensor(example.image), image_file_tensor(example.face)
            require(target.shape == source.shape, "folder", folder,
                    f"pairs of equal size ({example.image.name} and {example.face.name} differ)")
            pairs.append(Pair(inputs(source), inputs(target), text(example.caption),
                              text(source_prompt(folder, example.face))))
            black = torch.zeros_like(source) if black is None else black
        null = inputs(black)  # the null image, as MCDM Conditioning makes it
        adapter = mcdm.adapter
        if adapter is None:
            width = model.model.model_config.unet_config["context_dim"]
            adapter = EmbeddingAdapter(width, 1024, null.clip_tokens.shape[1])
        progress = training_progress(steps)
        trained, trained_adapter, before, after = train_mcdm(
            model, adapter, pairs, empty_text=text(""), null=null, steps=steps, learning_rate=learning_rate,
            seed=seed, on_step=progress)
        unet_path = numbered_path(LIKENESS_FOLDER, filename_prefix)
        adapter_path = unet_path.with_name(unet_path.stem + ".adapter.safetensors")
        save(trained, trained_adapter, unet_path, adapter_path,
             {"steps": steps, "learning_rate": learning_rate, "pairs": len(pairs), "loss_before": before,
              "loss_after": after})
        return io.NodeOutput(unet_path.name, before, after, progress.curve(before, after, f"MCDM training: {unet_path.name}"),
                             ui={"text": [
            f"{unet_path.name} + {adapter_path.name}: loss {before:.4f} → {after:.4f}"]})


NODES = [TrainMCDM]
