"""Face Fusion nodes: identity-preserving generation from face photos (LikenessFaceFusion), and
LikenessTrainFaceKV, which trains Face Fusion's Linear_kf / Linear_vf with the UNet frozen."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.face_fusion.face_kv_attention import Identity, apply_face_fusion, reference_noise
from ..attention.shared import recipes
from ..attention.shared.layer_table import attention_keys, diffusion_model_of
from ..attention.shared.sigmas import SigmaRange, model_sampling_of
from .common import (LIKENESS_FOLDER, chosen_recipe, dataset_folder, files_fingerprint, image_file_tensor,
                     model_file_fingerprint, model_path, numbered_path, optimiser_inputs, require, require_mask,
                     require_model_family, trainer_outputs, training_progress)

CATEGORY = "likeness/face"
TRAINING_FREE = "self-attention to_k/to_v (training-free)"


def kv_choices() -> list[str]:
    import folder_paths

    files = [f for f in folder_paths.get_filename_list(LIKENESS_FOLDER) if f.endswith(".safetensors")]
    return [TRAINING_FREE, *sorted(files)]


class LikenessFaceFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFaceFusion",
            display_name="Likeness Face Fusion",
            category=CATEGORY,
            description="Passes the reference face through the UNet beside the image and concatenates its keys "
                        "and values to the text's in every cross-attention (Face Fusion Eq. 1–6). Chain the node "
                        "to add people; give each a mask to keep them apart (Eq. 7). On Flux.1/SD3.5 (training-free "
                        "only) the face's image-token keys and values join every joint attention's.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; it is cloned, never changed."),
                io.Latent.Input("face", tooltip="VAE-encoded face crop(s) of one person: a batch is several "
                                "references, fused in order (Eq. 6)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=4.0, step=0.01,
                               tooltip="Strength of the face keys: 1 is the paper, 0 removes the face exactly, "
                                       "above 1 favours the face over the prompt."),
                io.Combo.Input("kv", options=kv_choices(), default=TRAINING_FREE,
                               tooltip="Linear_kf/Linear_vf: the layer's own self-attention projections "
                                       "(no training), or weights trained by Likeness Train Face KV in "
                                       "models/likeness/."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The face acts from this point of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The face acts until this point of the schedule (1 = last step)."),
                io.Combo.Input("face_noise", options=["noised", "clean"], default="noised",
                               tooltip="noised: the face latent is noised to each step's sigma with fixed noise "
                                       "and read at that step's timestep, as Likeness Train Face KV trains it; "
                                       "clean: the latent as it is, read at the model's smallest timestep "
                                       "(0 for SD) at every step."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of the fixed noise added to the face latent (a trainer run with "
                                     "seed s drew its n-th example's face noise with seed s+1+n)."),
                io.Boolean.Input("uncond", default=True,
                                 tooltip="Let the negative (uncond) rows see the face too. Off: the face only "
                                         "guides the positive prediction, so CFG pushes towards it harder."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where this person is in the image. With several people, queries inside "
                                      "another person's mask never see this face (Eq. 7)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model.")],
        )

    @classmethod
    def validate_inputs(cls, kv: str = TRAINING_FREE) -> bool | str:
        from .model_files import missing_file

        return missing_file(LIKENESS_FOLDER, "kv", kv, kv_choices(), (TRAINING_FREE,))

    @classmethod
    def fingerprint_inputs(cls, kv: str = TRAINING_FREE, **_) -> tuple:
        return model_file_fingerprint(LIKENESS_FOLDER, kv) if kv != TRAINING_FREE else ()

    @classmethod
    def execute(cls, model, face: dict, weight: float, kv: str, start_percent: float, end_percent: float,
                face_noise: str, noise_seed: int, uncond: bool, mask=None) -> io.NodeOutput:
        family = require_model_family(model, dit=True)
        dit = family in ("flux", "sd3")
        require(not dit or kv == TRAINING_FREE, "kv", kv, f"'{TRAINING_FREE}' on Flux.1/SD3.5 (trained face K/V "
                "files are SD1.5/SDXL UNet layouts)")
        samples = face["samples"]
        require(samples.dim() == 4 and samples.shape[0] >= 1, "face", tuple(samples.shape),
                "a LATENT of one or more encoded face crops")
        latent = model.model.process_latent_in(samples.float())
        noise = reference_noise(latent.shape, noise_seed)
        if mask is not None:
            require(mask.dim() in (2, 3) and (mask.dim() == 2 or mask.shape[0] == 1), "mask", tuple(mask.shape),
                    "one MASK (this person's region)")
            require_mask(mask, purpose="where this person is")
            mask = mask.reshape(mask.shape[-2:]).float()
        sampling = model_sampling_of(model)
        identity = Identity(latent=latent, noise=noise, weight=weight,
                            sigma_range=SigmaRange.from_percent(sampling, start_percent, end_percent),
                            mask=mask, kv=None if kv == TRAINING_FREE else load_face_kv(kv),
                            clean=face_noise == "clean", uncond=uncond)
        layers = attention_keys(diffusion_model_of(model))
        if dit:
            from ..attention.face_fusion.joint_face_attention import apply_joint_face_fusion

            return io.NodeOutput(apply_joint_face_fusion(model, identity, layers))
        return io.NodeOutput(apply_face_fusion(model, identity, layers))


def load_face_kv(name: str):
    """Trained Linear_kf/Linear_vf weights, per layer, from models/likeness/."""

    from ..attention.face_fusion.face_kv_files import load_face_kv_file

    return load_face_kv_file(model_path(LIKENESS_FOLDER, "kv", name,
                                        f"'{TRAINING_FREE}' or a .safetensors file in models/likeness/"))


class LikenessTrainFaceKV(io.ComfyNode):
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
                *optimiser_inputs("images", recipes.FACE_KV_TRAINING),
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
                filename_prefix: str, weight_decay: float = recipes.FACE_KV_TRAINING.weight_decay,
                max_grad_norm: float = recipes.FACE_KV_TRAINING.max_grad_norm,
                batch_size: int = recipes.FACE_KV_TRAINING.batch) -> io.NodeOutput:
        from ..attention.face_fusion.face_kv_files import save_face_kv
        from ..attention.face_fusion.face_kv_training import train_face_kv
        from ..attention.magicstyle.feature_bank import model_fingerprint
        from ..attention.shared.training_loop import Batching

        require_model_family(model)
        recipe = chosen_recipe(recipes.FACE_KV_TRAINING, learning_rate, weight_decay, max_grad_norm, batch_size)
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
        from ..attention.face_fusion.face_kv_training import FACE_SUFFIX
        from ..attention.shared.training_folders import find_examples

        self.model, self.clip, self.vae = model, clip, vae
        self.examples = find_examples(folder, FACE_SUFFIX)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        import torch

        from ..attention.face_fusion.face_kv_training import Batch

        example = self.examples[index]
        with torch.no_grad():  # jobs/train.py reads examples inside the training loop: no graph through the VAE
            target = self.model.model.process_latent_in(self.vae.encode(image_file_tensor(example.image)))
            face = self.model.model.process_latent_in(self.vae.encode(image_file_tensor(example.face)))
            cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(example.caption))
        return Batch(target, face, cond)


NODES = [LikenessFaceFusion, LikenessTrainFaceKV]
