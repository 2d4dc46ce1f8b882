"""LikenessTrainIDAdapter: Infinite-ID's identity-enhanced training."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention import recipes
from .common import (chosen_recipe, dataset_folder, files_fingerprint, image_file_tensor, numbered_path,
                     optimiser_inputs, require, require_model_family, trainer_outputs, training_progress)
from .face_analysis import FaceAnalysisType
from .infinite_id import IDAdapterType, IPADAPTER_FOLDER, register_ipadapter_folder, require_recognition_model

CATEGORY = "likeness/infinite_id"
IDENTITY_SUFFIX = ".id"


class TrainIDAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainIDAdapter",
            display_name="Likeness Train ID Adapter",
            category=CATEGORY,
            description="Identity-enhanced training (Infinite-ID Sec. 3.2): trains the face mapper, the CLIP mapper "
                        "and the image cross-attention with the UNet frozen and the text cross-attention off, on "
                        "pairs <name>.id.png (identity image) + <name>.png (another image of the same person). "
                        "It runs Likeness Infinite-ID's identity stream, FaceID's LoRA included (frozen, as the "
                        "adapter's loader chose it), and writes the FaceID-PlusV2 layout to models/ipadapter/ "
                        "with that LoRA, so sampling reads back what was trained.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (frozen)."),
                io.Clip.Input("clip", tooltip="Encodes an empty prompt (SDXL still needs its pooled vector)."),
                io.Vae.Input("vae", tooltip="Encodes the target images."),
                IDAdapterType.Input("id_adapter", tooltip="The adapter to start from (FaceID-PlusV2 or a "
                                    "Likeness-trained one)."),
                FaceAnalysisType.Input("analysis", tooltip="Aligns and embeds the identity images: the pack whose "
                                       "recognition model the adapter was trained with (buffalo_l for the public "
                                       "FaceID files); the file written records it."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H/14 image encoder."),
                io.String.Input("folder", default="id_adapter_dataset",
                                tooltip="Training folder, absolute or inside ComfyUI's input folder."),
                *optimiser_inputs("pairs", recipes.ID_ADAPTER),
                io.Float.Input("shortcut_scale", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="FaceID-PlusV2's s_scale during training."),
                io.Float.Input("lora_scale", default=1.0, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="Scale of FaceID's LoRA during training, as Likeness Infinite-ID's "
                                       "lora_scale (0 = no LoRA). The file written carries the LoRA at this "
                                       "scale, so sample it at lora_scale 1."),
                io.Float.Input("identity_dropout", default=recipes.ID_ADAPTER_IDENTITY_DROPOUT, min=0.0, max=1.0,
                               step=0.01, optional=True,
                               tooltip="Share of the examples trained with the identity dropped for the 'no face' "
                                       "input (IP-Adapter's 5%), which sampling gives every uncond row."),
                io.String.Input("filename_prefix", default="infinite_id",
                                tooltip="File name in models/ipadapter/; a counter is added."),
            ],
            outputs=trainer_outputs("adapter"),
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> tuple:
        return files_fingerprint(dataset_folder(folder))

    @classmethod
    def execute(cls, model, clip, vae, id_adapter, analysis, clip_vision, folder: str, steps: int,
                learning_rate: float, seed: int, shortcut_scale: float, filename_prefix: str,
                weight_decay: float = recipes.ID_ADAPTER.weight_decay,
                max_grad_norm: float = recipes.ID_ADAPTER.max_grad_norm, batch_size: int = recipes.ID_ADAPTER.batch,
                lora_scale: float = 1.0,
                identity_dropout: float = recipes.ID_ADAPTER_IDENTITY_DROPOUT) -> io.NodeOutput:
        from ..attention.id_adapter import save_id_adapter
        from ..attention.id_adapter_training import train_id_adapter
        from ..attention.training import Batching

        require_model_family(model)
        recipe = chosen_recipe(recipes.ID_ADAPTER, learning_rate, weight_decay, max_grad_norm, batch_size)
        require(0 <= identity_dropout <= 1, "identity_dropout", identity_dropout, "a share between 0 and 1")
        try:  # the LoRA the identity stream trains with, checked before any pair is read
            id_adapter.faceid_lora(model, lora_scale)
        except ValueError as error:
            raise ValueError(f"id_adapter={id_adapter.source!r} cannot be used with this model: {error}") from error
        require_recognition_model(id_adapter, analysis)
        reader = IDPairReader(dataset_folder(folder), model, clip, vae, analysis, clip_vision)
        pairs = [reader[index] for index in range(len(reader))]
        progress = training_progress(steps)
        trained, before, after = train_id_adapter(
            model, id_adapter, pairs, steps=steps, seed=seed, no_face_hidden=reader.no_face_hidden, recipe=recipe,
            scale=shortcut_scale, lora_scale=lora_scale, identity_dropout=identity_dropout, on_step=progress,
            batching=Batching(recipe.batch))
        register_ipadapter_folder()
        path = numbered_path(IPADAPTER_FOLDER, filename_prefix)
        save_id_adapter(trained, path)
        curve = progress.curve(before, after, f"ID adapter training: {path.name}")
        return io.NodeOutput(path.name, before, after, curve,
                             ui={"text": [f"{path.name}: loss {before:.4f} → {after:.4f}"]})


class IDPairReader:
    """An identity training folder as pairs, each read and encoded (target latent, ArcFace embedding
    and CLIP hidden states of the identity image's aligned face) when first asked: the node asks for
    all of them, jobs/train.py only for those its process draws."""

    def __init__(self, folder, model, clip, vae, analysis, clip_vision):
        import torch

        from ..attention.face_kv_training import find_examples
        from ..attention.infinite_id import no_face_clip_hidden

        self.model, self.vae, self.analysis, self.clip_vision = model, vae, analysis, clip_vision
        self.examples = find_examples(folder, IDENTITY_SUFFIX)
        with torch.no_grad():
            self.empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        self.no_face_hidden = no_face_clip_hidden(clip_vision)  # what a dropped identity is read from

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        import torch

        from ..attention.id_adapter_training import Pair
        from .face_analysis import faceid_inputs

        example = self.examples[index]
        with torch.no_grad():  # jobs/train.py reads pairs inside the training loop: no graph through the encoders
            faces, embeddings = faceid_inputs(self.analysis, image_file_tensor(example.face))
            hidden = self.clip_vision.encode_image(faces)["penultimate_hidden_states"]
            target = self.model.model.process_latent_in(self.vae.encode(image_file_tensor(example.image)))
        return Pair(target, embeddings, hidden, self.empty)


NODES = [TrainIDAdapter]
