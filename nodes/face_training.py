"""LikenessTrainFaceKV: trains Face Fusion's Linear_kf / Linear_vf, UNet frozen."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention import recipes
from .common import (LIKENESS_FOLDER, chosen_recipe, dataset_folder, files_fingerprint, image_file_tensor,
                     numbered_path, optimiser_inputs, require_model_family, trainer_outputs, training_progress)

CATEGORY = "likeness/face"


class TrainFaceKV(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainFaceKV",
            display_name="Likeness Train Face KV",
            category=CATEGORY,
            description="Trains only Face Fusion's Linear_kf/Linear_vf (the UNet stays frozen) with the diffusion "
                        "loss on a folder of <name>.png targets, <name>.face.png face crops and <name>.txt "
                        "captions, and saves them to models/likeness/ for Likeness Face Fusion.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (frozen)."),
                io.Clip.Input("clip", tooltip="Encodes the captions."),
                io.Vae.Input("vae", tooltip="Encodes the images and face crops."),
                io.String.Input("folder", default="face_kv_dataset",
                                tooltip="Training folder, absolute or inside ComfyUI's input folder."),
                *optimiser_inputs("images", recipes.FACE_KV),
                io.String.Input("filename_prefix", default="face_kv",
                                tooltip="File name in models/likeness/; a counter is added."),
            ],
            outputs=trainer_outputs("weights"),
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> tuple:
        return files_fingerprint(dataset_folder(folder))

    @classmethod
    def execute(cls, model, clip, vae, folder: str, steps: int, learning_rate: float, seed: int,
                filename_prefix: str, weight_decay: float = recipes.FACE_KV.weight_decay,
                max_grad_norm: float = recipes.FACE_KV.max_grad_norm,
                batch_size: int = recipes.FACE_KV.batch) -> io.NodeOutput:
        from ..attention.face_kv import save_face_kv
        from ..attention.face_kv_training import train_face_kv
        from ..attention.feature_bank import model_fingerprint
        from ..attention.training import Batching

        require_model_family(model)
        recipe = chosen_recipe(recipes.FACE_KV, learning_rate, weight_decay, max_grad_norm, batch_size)
        reader = FaceExampleReader(dataset_folder(folder), model, clip, vae)
        examples = reader.examples
        batches = [reader[index] for index in range(len(reader))]
        progress = training_progress(steps)
        weights, before, after = train_face_kv(model, batches, steps=steps, recipe=recipe, seed=seed,
                                               on_step=progress, batching=Batching(recipe.batch))
        path = numbered_path(LIKENESS_FOLDER, filename_prefix)
        save_face_kv(weights, path, {"steps": steps, "learning_rate": learning_rate, "weight_decay": weight_decay,
                                     "max_grad_norm": max_grad_norm, "batch_size": batch_size,
                                     "examples": len(examples), "loss_before": before, "loss_after": after,
                                     "model_fingerprint": model_fingerprint(model)})
        return io.NodeOutput(path.name, before, after, progress.curve(before, after, f"Face K/V training: {path.name}"),
                             ui={"text": [f"{path.name}: loss {before:.4f} → {after:.4f}"]})


class FaceExampleReader:
    """A face training folder as examples, each read and encoded (target and face latents, caption)
    when first asked: the node asks for all of them, jobs/train.py only for those its process draws."""

    def __init__(self, folder, model, clip, vae):
        from ..attention.face_kv_training import find_examples

        self.model, self.clip, self.vae = model, clip, vae
        self.examples = find_examples(folder)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        import torch

        from ..attention.face_kv_training import Batch

        example = self.examples[index]
        with torch.no_grad():  # jobs/train.py reads examples inside the training loop: no graph through the VAE
            target = self.model.model.process_latent_in(self.vae.encode(image_file_tensor(example.image)))
            face = self.model.model.process_latent_in(self.vae.encode(image_file_tensor(example.face)))
            cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(example.caption))
        return Batch(target, face, cond)


NODES = [TrainFaceKV]
