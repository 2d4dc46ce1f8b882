"""Bad input over the API, node by node: each is an error that names the input, the value and what
is accepted, raised before any sampling; the server keeps serving and nothing half-written is left."""

from __future__ import annotations

import pytest

from harness.server import PromptRejected
from harness.workflows import txt2img_prompt
from tiny import tiny_models

pytestmark = pytest.mark.slow

SD15 = "v1-5-pruned-emaonly.safetensors"


def checkpoint(node_id="1", name=SD15):
    return {node_id: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}}


def encode(node_id, text="", clip=("1", 1)):
    return {node_id: {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip), "text": text}}}


def image(node_id, name="likeness_portrait.png"):
    return {node_id: {"class_type": "LoadImage", "inputs": {"image": name}}}


def latent(node_id, width=64, height=64, batch=1):
    return {node_id: {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height,
                                                                   "batch_size": batch}}}


def preview_latent(node_id, source):
    return {node_id: {"class_type": "SaveLatent", "inputs": {"samples": list(source), "filename_prefix": "bad"}}}


def invert(model=("1", 0), capture="qkv", steps=2, latent_from=("3", 0)):
    return {"10": {"class_type": "LikenessInvert", "inputs": {
        "model": list(model), "conditioning": ["2", 0], "latent": list(latent_from), "steps": steps,
        "capture": capture, "layers": "all", "cache_on": "auto", "precision": "fp8"}}}


def v_prediction():
    return {"5": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction",
                                                                   "zsnr": False}}}


def sd3():
    return {"6": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_models.SD3_FILE, "weight_dtype": "default"}}}


def ffa(content, style, model=("1", 0)):
    return {"20": {"class_type": "LikenessFeatureFusionAttention", "inputs": {
        "model": list(model), "content": list(content), "style": list(style), "alpha": 0.8, "beta": 0.2,
        "temperature": 1.0, "layers": "all", "style_index": 0, "start_percent": 0.0, "end_percent": 1.0}},
        "21": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["20", 0], "add_noise": "disable", "noise_seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "ddim_uniform", "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["10", 0],
            "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        **preview_latent("22", ("21", 0))}


def sample_with(guider) -> dict:
    return {"30": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
            "31": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "32": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 1,
                                                             "denoise": 1.0}},
            **latent("33"),
            "34": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["30", 0], "guider": list(guider), "sampler": ["31", 0], "sigmas": ["32", 0],
                "latent_image": ["33", 0]}},
            **preview_latent("35", ("34", 0))}


# (case, prompt, node type expected to fail (None: refused at validation), words the message names)
CASES = [
    ("v-prediction model into Invert",
     {**checkpoint(), **encode("2"), **latent("3"), **v_prediction(), **invert(model=("5", 0)),
      **preview_latent("11", ("10", 0))},
     "LikenessInvert", ["model", "v-prediction", "SD1.5- or SDXL-family"]),
    # SD3.5 runs MagicStyle and Face Fusion (tests/test_dit.py); an SD-only node refuses it by name
    ("SD3-shaped model into an SD-only node",
     {**checkpoint(), **encode("2"), **sd3(),
      "7": {"class_type": "LikenessMCDMGuider", "inputs": {
          "model": ["6", 0], "positive": ["2", 0], "negative": ["2", 0], "image_scale": 3.0, "spatial_scale": 2.0,
          "text_scale": 4.0}}, **sample_with(("7", 0))},
     "LikenessMCDMGuider", ["model", "SD3", "flow", "SD1.5- or SDXL-family"]),
    ("features of another size into FFA",
     {**checkpoint(), **encode("2"), **latent("3"), **latent("4", 96, 96),
      **invert(), "12": {"class_type": "LikenessInvert", "inputs": {
          "model": ["1", 0], "conditioning": ["2", 0], "latent": ["4", 0], "steps": 2, "capture": "kv",
          "layers": "all", "cache_on": "auto", "precision": "fp8"}},
      **ffa(("10", 1), ("12", 1))},
     "LikenessFeatureFusionAttention", ["style features", "size", "64x64", "96x96"]),
    ("features of another schedule at sampling",
     {**checkpoint(), **encode("2"), **latent("3"), **invert(steps=3),
      **ffa(("10", 1), ("10", 1))},
     "KSamplerAdvanced", ["steps", "3 ddim_uniform steps", "use the same steps"]),
    ("a style batch that fits no content batch",
     {**latent("3", batch=2), **latent("4", batch=3),
      "7": {"class_type": "LikenessAdaINLatent", "inputs": {"content": ["3", 0], "style": ["4", 0]}},
      **preview_latent("8", ("7", 0))},
     "LikenessAdaINLatent", ["style batch 3", "1 or match the content batch 2"]),
    ("an odd-width pair into Split Pair",
     {**image("3"), "4": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "nearest-exact",
                                                             "width": 65, "height": 32, "crop": "disabled"}},
      "5": {"class_type": "LikenessSplitPair", "inputs": {"pair": ["4", 0]}},
      "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}},
     "LikenessSplitPair", ["pair", "65 pixels wide", "even width"]),
    ("no face in the picture",
     {"3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
      "4": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
      "5": {"class_type": "LikenessFaceCrop", "inputs": {"analysis": ["4", 0], "image": ["3", 0], "index": 0,
                                                         "crop_size": 64, "padding": 0.0}},
      "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}},
     "LikenessFaceCrop", ["image", "no face found", "Expected an image showing a face"]),
    ("an insightface pack that is not there",
     {**image("3"), "4": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "antelopev2",
                                                                          "provider": "CPU"}},
      "5": {"class_type": "LikenessFaceCrop", "inputs": {"analysis": ["4", 0], "image": ["3", 0], "index": 0,
                                                         "crop_size": 64, "padding": 0.0}},
      "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}},
     None, ["model_name='antelopev2'", "not found", "antelopev2.zip"]),
    ("an ID adapter that is not a FaceID file",
     {"4": {"class_type": "LikenessIDAdapterLoader", "inputs": {"adapter_name": "bad_truncated_faceid.safetensors"}},
      **checkpoint(), **image("3"),
      "5": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
      "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
      "7": {"class_type": "LikenessInfiniteID", "inputs": {
          "model": ["1", 0], "id_adapter": ["4", 0], "analysis": ["5", 0], "clip_vision": ["6", 0], "image": ["3", 0],
          "weight": 1.0, "mixed_attention": True, "cross_attention_merge": True, "adain_mean": False,
          "mix_weights": "", "shortcut_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
      **encode("2"), **latent("8"),
      "9": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                 "negative": ["2", 0], "latent_image": ["8", 0], "denoise": 1.0}},
      **preview_latent("11", ("9", 0))},
     "LikenessIDAdapterLoader", ["adapter_name='bad_truncated_faceid.safetensors'", "truncated"]),
    ("an SDXL adapter on an SD1.5 model",
     {"4": {"class_type": "LikenessIDAdapterLoader", "inputs": {"adapter_name": "ip-adapter-faceid-plusv2_sdxl.bin"}},
      **checkpoint(), **image("3"),
      "5": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
      "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
      "7": {"class_type": "LikenessInfiniteID", "inputs": {
          "model": ["1", 0], "id_adapter": ["4", 0], "analysis": ["5", 0], "clip_vision": ["6", 0], "image": ["3", 0],
          "weight": 1.0, "mixed_attention": True, "cross_attention_merge": True, "adain_mean": False,
          "mix_weights": "", "shortcut_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
      **encode("2"), **latent("8"),
      "9": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                 "negative": ["2", 0], "latent_image": ["8", 0], "denoise": 1.0}},
      **preview_latent("11", ("9", 0))},
     "LikenessInfiniteID", ["id_adapter", "sdxl", "16"]),
    ("0 training steps",
     {**checkpoint(),
      "4": {"class_type": "LikenessIDAdapterLoader", "inputs": {"adapter_name": "ip-adapter-faceid-plusv2_sd15.bin"}},
      "5": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
      "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
      "7": {"class_type": "LikenessTrainIDAdapter", "inputs": {
          "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "id_adapter": ["4", 0], "analysis": ["5", 0],
          "clip_vision": ["6", 0], "folder": "bad_one_file", "steps": 0, "learning_rate": 1e-4, "seed": 0,
          "shortcut_scale": 1.0, "filename_prefix": "bad"}}},
     None, ["steps", "0", "min"]),
    ("a training folder with one file",
     {**checkpoint(),
      "4": {"class_type": "LikenessIDAdapterLoader", "inputs": {"adapter_name": "ip-adapter-faceid-plusv2_sd15.bin"}},
      "5": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
      "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
      "7": {"class_type": "LikenessTrainIDAdapter", "inputs": {
          "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "id_adapter": ["4", 0], "analysis": ["5", 0],
          "clip_vision": ["6", 0], "folder": "bad_one_file", "steps": 1, "learning_rate": 1e-4, "seed": 0,
          "shortcut_scale": 1.0, "filename_prefix": "bad"}}},
     "LikenessTrainIDAdapter", ["lonely.png", "lonely.id.png"]),
    ("a 4-channel model into the MCDM guider",
     {**checkpoint(), **encode("2"),
      "7": {"class_type": "LikenessMCDMGuider", "inputs": {
          "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "image_scale": 3.0, "spatial_scale": 2.0,
          "text_scale": 4.0}}, **sample_with(("7", 0))},
     "LikenessMCDMGuider", ["model", "4 input channels", "MCDM"]),
    ("a mask of all 0 into the mask-guided guider",
     {**checkpoint(), **encode("2"), **encode("3", "a cartoon"),
      "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
      "7": {"class_type": "LikenessMaskGuidedGuider", "inputs": {
          "model": ["1", 0], "target": ["3", 0], "source": ["2", 0], "negative": ["2", 0], "cfg": 5.0,
          "mask": ["4", 0], "mode": "noise"}}, **sample_with(("7", 0))},
     "LikenessMaskGuidedGuider", ["mask", "all 0", "1 where to edit"]),
    ("a person's mask of all 0 into Face Fusion",
     {**checkpoint(), **encode("2"), **latent("3"),
      "4": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
      "5": {"class_type": "LikenessFaceFusion", "inputs": {
          "model": ["1", 0], "face": ["3", 0], "weight": 1.0, "kv": "self-attention to_k/to_v (training-free)",
          "start_percent": 0.0, "end_percent": 1.0, "face_noise": "noised", "noise_seed": 0, "uncond": True,
          "mask": ["4", 0]}},
      "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                 "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
      **preview_latent("11", ("9", 0))},
     "LikenessFaceFusion", ["mask", "all 0", "where this person is"]),
    ("a face K/V folder with one file",
     {**checkpoint(),
      "7": {"class_type": "LikenessTrainFaceKV", "inputs": {
          "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "folder": "bad_one_file", "steps": 1,
          "learning_rate": 1e-4, "seed": 0, "filename_prefix": "bad"}}},
     "LikenessTrainFaceKV", ["lonely.png", "lonely.face.png"]),
    ("a features file that is not one",
     {"4": {"class_type": "LikenessLoadFeatures", "inputs": {"file": "bad_not_features.safetensors"}},
      **preview_latent("5", ("4", 1))},
     "LikenessLoadFeatures", ["bad_not_features.safetensors", "not a Likeness features file"]),
]


@pytest.fixture(scope="module")
def bad_files(base_directory, shipped_model_files):
    import torch
    from safetensors.torch import save_file

    from tiny import tiny_faceid

    models = base_directory / "models"
    tiny_models.write_sd3(models / "diffusion_models")
    good = tiny_faceid.write(models / "ipadapter" / "bad_source.safetensors", "sd15")
    data = good.read_bytes()
    (models / "ipadapter" / "bad_truncated_faceid.safetensors").write_bytes(data[: len(data) // 2])
    (models / "likeness_features").mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(models / "likeness_features" / "bad_not_features.safetensors"))
    folder = base_directory / "input" / "bad_one_file"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(folder / "lonely.png")


def partial_files(base_directory) -> list:
    return [p for p in base_directory.rglob("*") if p.name.endswith(".partial")]


@pytest.mark.parametrize("case, prompt, failing, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_the_server_keeps_serving(server, base_directory, bad_files, case, prompt, failing,
                                                         words):
    if failing is None:
        with pytest.raises(PromptRejected) as rejected:
            server.run_prompt(prompt)
        message = str(rejected.value)
    else:
        result = server.run_prompt(prompt)
        assert result.status == "error", f"{case}: expected an error"
        assert result.error["node_type"] == failing, result.error
        message = result.error["exception_message"]
        # refused by name, never by a shape error from deep inside the model
        assert not any(deep in message for deep in ("mat1 and mat2", "size mismatch", "must match the size")), message
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert partial_files(base_directory) == []
    after = server.run_prompt(txt2img_prompt(SD15, 64, 64, seed=len(case)))
    assert after.ok, f"the server must keep serving after {case}: {after.error}"
