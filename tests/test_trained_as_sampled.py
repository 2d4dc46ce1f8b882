"""Rule 8, what a trainer learns is what sampling runs, for each of the three trainers.

The loss a trainer reports after training is its validation loss: the first example at a fixed
sigma and noise (drawn from the loop's validation generator), full conditions, the trained
weights. The same example's loss is computed here through the sampling path only: the file the
trainer has just written, read by the loader and patch nodes users sample with (ID Adapter Loader
+ Infinite-ID, Face Fusion with the kv file, MCDM Loader + MCDM Conditioning), applied to the base
model, the example's latent noised by ComfyUI's sampler and sent through its model call at cfg 1.
Each test also shows the comparison can tell: the sampling path without the part that differed
(FaceID's LoRA, the trained kv) gives another loss by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch

from harness.sampling import encode, sampled_loss
from harness.training_job import write_faces, write_identity_pairs
from test_infinite_id_node import clip_vision, parts  # noqa: F401  (fixtures)
from test_mcdm import write_pairs
from tiny import tiny_faceid, tiny_mcdm

SAME = 1e-5  # relative: float32 rounding of the same computation batched and ordered differently
APART = 1e-3  # relative: what a missing LoRA or untrained kv changes, far above SAME


def validation_draw(comfy, model, seed: int, shape) -> tuple[float, torch.Tensor]:
    """The sigma and noise of the trainer's first validation example (training.optimise)."""
    training = comfy.pack("attention.shared.training_loop")
    generator = training.draw_generator(seed, -1, 0)
    sigma = model.get_model_object("model_sampling").sigma(torch.randint(100, 900, (1,), generator=generator).float())
    return float(sigma), torch.randn(shape, generator=generator)


def encoded(comfy, vae, path: str) -> dict:
    image = comfy.run_node("LoadImage", image=path)[0]
    return comfy.run_node("VAEEncode", pixels=image, vae=vae)[0]


@pytest.mark.parametrize("lora_scale", [1.0, 0.5])
def test_id_adapter_trainer_loss_is_the_infinite_id_sampling_loss(comfy, tiny_checkpoints, base_directory, parts,
                                                                  lora_scale):
    """Trained at FaceID's LoRA scale s, the file sampled at the loader's defaults and lora_scale 1
    (the LoRA written at s), Infinite-ID set to the training forward: weight 1, mixed attention, merge
    and AdaIN-mean off (the text cross-attention off), the empty prompt."""
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    analysis, clip_vision, _ = parts
    start = tiny_faceid.write(base_directory / "models" / "ipadapter" / "tiny_faceid_as_sampled.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=start.name)
    folder = f"id_as_sampled_{lora_scale:g}"
    write_identity_pairs(base_directory / "input" / folder, 1)
    seed = 3
    extra = {} if lora_scale == 1.0 else {"lora_scale": lora_scale}
    name, _, after, _ = comfy.run_node(
        "LikenessTrainIDAdapter", model=model, clip=clip, vae=vae, id_adapter=adapter, analysis=analysis,
        clip_vision=clip_vision, folder=folder, steps=1, learning_rate=1e-3, seed=seed, shortcut_scale=1.0,
        filename_prefix="id_as_sampled", batch_size=1, **extra)

    latent = encoded(comfy, vae, f"{folder}/pair_00000.png")
    sigma, noise = validation_draw(comfy, model, seed, latent["samples"].shape)
    (identity_image,) = comfy.run_node("LoadImage", image=f"{folder}/pair_00000.id.png")[:1]
    empty = encode(comfy, clip, "")

    def sampling_loss(lora: str) -> float:
        (trained,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=name, lora=lora)
        (patched,) = comfy.run_node(
            "LikenessInfiniteID", model=model, id_adapter=trained, analysis=analysis, clip_vision=clip_vision,
            image=identity_image, weight=1.0, mixed_attention=False, cross_attention_merge=False, adain_mean=False,
            mix_weights="", shortcut_scale=1.0, start_percent=0.0, end_percent=1.0)
        return sampled_loss(comfy, patched, empty, latent, sigma, noise)

    sampled = sampling_loss("from the adapter file")
    assert abs(sampled - after) <= SAME * after, (sampled, after)
    assert abs(sampling_loss("none") - after) > APART * after, "the LoRA must matter for the test to tell"


def test_face_kv_trainer_loss_is_the_face_fusion_sampling_loss(comfy, tiny_checkpoints, base_directory):
    """Face Fusion with the written kv file, weight 1, the face noised (the node's default) with the
    noise the trainer gave its first example (seed + 1), the caption as the positive prompt."""
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    write_faces(base_directory / "input" / "face_kv_as_sampled", 1)
    seed = 4
    name, _, after, _ = comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae,
                                       folder="face_kv_as_sampled", steps=1, learning_rate=1e-2, seed=seed,
                                       filename_prefix="face_kv_as_sampled", batch_size=1)
    latent = encoded(comfy, vae, "face_kv_as_sampled/pair_00000.png")
    face = encoded(comfy, vae, "face_kv_as_sampled/pair_00000.face.png")
    sigma, noise = validation_draw(comfy, model, seed, latent["samples"].shape)
    caption = (base_directory / "input" / "face_kv_as_sampled" / "pair_00000.txt").read_text()

    def sampling_loss(kv: str) -> float:
        (patched,) = comfy.run_node("LikenessFaceFusion", model=model, face=face, weight=1.0, kv=kv,
                                    start_percent=0.0, end_percent=1.0, face_noise="noised", noise_seed=seed + 1,
                                    uncond=True)
        return sampled_loss(comfy, patched, encode(comfy, clip, caption), latent, sigma, noise)

    sampled = sampling_loss(name)
    assert abs(sampled - after) <= SAME * after, (sampled, after)
    untrained = sampling_loss(comfy.pack("nodes.face_fusion").TRAINING_FREE)
    assert abs(untrained - after) > APART * after, "the trained kv must matter for the test to tell"


def test_mcdm_trainer_loss_is_the_mcdm_sampling_loss(comfy, tiny_checkpoints, base_directory):
    """The written UNet and adapter through MCDM Loader, the source image and target prompt through
    MCDM Conditioning (its positive: c_s, the image tokens after the text), the target's latent."""
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    files = tiny_mcdm.write(base_directory / "models")
    start = comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                           clip_vision_name=files["clip_vision"])
    write_pairs(base_directory / "input" / "mcdm_as_sampled", [(70, 71)], prompt="a man in a suit")
    seed = 2
    name, _, after, _ = comfy.run_node("LikenessTrainMCDM", model=start[0], mcdm=start[1], clip=clip, vae=vae,
                                       folder="mcdm_as_sampled", steps=1, learning_rate=1e-3, seed=seed,
                                       filename_prefix="mcdm_as_sampled", batch_size=1)
    latent = encoded(comfy, vae, "mcdm_as_sampled/pair_00000.png")
    (source,) = comfy.run_node("LoadImage", image="mcdm_as_sampled/pair_00000.source.png")[:1]
    sigma, noise = validation_draw(comfy, model, seed, latent["samples"].shape)

    def sampling_loss(unet: str, adapter: str) -> float:
        trained, state = comfy.run_node("LikenessMCDMLoader", unet_name=unet, adapter_name=adapter,
                                        clip_vision_name=files["clip_vision"])
        positive, _, _ = comfy.run_node("LikenessMCDMConditioning", mcdm=state,
                                        positive=encode(comfy, clip, "a man in a suit"),
                                        negative=encode(comfy, clip, ""), vae=vae, image=source)
        return sampled_loss(comfy, trained, positive, latent, sigma, noise)

    sampled = sampling_loss(name, name.replace(".safetensors", ".adapter.safetensors"))
    assert abs(sampled - after) <= SAME * after, (sampled, after)
    assert abs(sampling_loss(files["unet"], files["adapter"]) - after) > APART * after, "training must tell"
