"""Face Fusion nodes: identity-preserving generation from face photos."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.face_fusion import Identity, apply_face_fusion, reference_noise
from ..attention.schedule import SigmaRange, model_sampling_of
from ..attention.unet_layers import attention_keys, diffusion_model_of
from .common import (LIKENESS_FOLDER, model_file_fingerprint, model_path, require, require_mask,
                     require_model_family)

CATEGORY = "likeness/face"
TRAINING_FREE = "self-attention to_k/to_v (training-free)"


def kv_choices() -> list[str]:
    import folder_paths

    files = [f for f in folder_paths.get_filename_list(LIKENESS_FOLDER) if f.endswith(".safetensors")]
    return [TRAINING_FREE, *sorted(files)]


class FaceFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFaceFusion",
            display_name="Likeness Face Fusion",
            category=CATEGORY,
            description="Passes the reference face through the UNet beside the image and concatenates its keys "
                        "and values to the text's in every cross-attention (Face Fusion Eq. 1–6). Chain the node "
                        "to add people; give each a mask to keep them apart (Eq. 7).",
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
        require_model_family(model)
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
        return io.NodeOutput(apply_face_fusion(model, identity, layers))


def load_face_kv(name: str):
    """Trained Linear_kf/Linear_vf weights, per layer, from models/likeness/."""

    from ..attention.face_kv import load_face_kv_file

    return load_face_kv_file(model_path(LIKENESS_FOLDER, "kv", name,
                                        f"'{TRAINING_FREE}' or a .safetensors file in models/likeness/"))


NODES = [FaceFusion]
