"""API-format prompts for the tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .paths import REPO

WORKFLOWS = REPO / "workflows"
TINY_FACE_PACK = "buffalo_l"  # written by tests/tiny_insightface.py


def shipped_workflows() -> list[str]:
    """Names of the pack's workflows (each has a UI file and an API twin)."""
    return sorted(path.stem for path in (WORKFLOWS / "api").glob("*.json"))


def api_inputs(prompt: dict) -> dict:
    """class_type and inputs of each node: what the server compares."""
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def for_tiny_models(prompt: dict, checkpoints: dict[str, str], size: int = 64) -> dict:
    """A shipped prompt made runnable here: the tiny checkpoint of its family
    (SDXL when the shipped one is), tiny adapters and encoders, small images."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoints["sdxl" if "xl" in inputs["ckpt_name"].lower() else "sd15"]
        if node["class_type"] == "LikenessIDAdapterLoader":
            inputs["adapter_name"] = f"tiny_faceid_{'sdxl' if 'sdxl' in inputs['adapter_name'] else 'sd15'}.safetensors"
        if node["class_type"] == "LikenessMCDMLoader":  # tests/tiny_mcdm.py's files
            inputs.update(unet_name="tiny_mcdm/unet.pth", adapter_name="tiny_mcdm/adapter.pth",
                          clip_vision_name="tiny_clip_vit_b32.safetensors")
        if node["class_type"] == "ControlNetLoader":
            inputs["control_net_name"] = "tiny_controlnet_sd15.safetensors"
        if node["class_type"] == "CLIPVisionLoader":
            inputs["clip_name"] = "tiny_clip_vision.safetensors"
        if node["class_type"] in ("ImageScale", "EmptyLatentImage"):
            # keep the aspect (a pair canvas is twice as wide as tall)
            inputs["width"], inputs["height"] = size * inputs["width"] // inputs["height"], size
        if node["class_type"] == "LikenessFaceCrop":
            inputs["crop_size"] = size
        if node["class_type"] == "LikenessFaceAnalysis":
            inputs["model_name"] = TINY_FACE_PACK
    return prompt


def write_test_images(folder: Path, names: list[str] | dict[str, int]) -> None:
    """Real photos that scikit-image ships, under the names workflows use
    (a list takes the photos in order; a dict names the photo for each file)."""
    import skimage.data
    from PIL import Image

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    # faces for the face workflows: the astronaut, mirrored for a second person
    photos += [skimage.data.astronaut()[:, ::-1].copy()]
    chosen = names.items() if isinstance(names, dict) else ((name, i) for i, name in enumerate(names))
    for name, index in chosen:
        Image.fromarray(photos[index % len(photos)]).save(folder / name)


def txt2img_prompt(ckpt_name: str, width: int, height: int, seed: int = 1, steps: int = 2,
                   prefix: str = "likeness_test") -> dict:
    """A core-nodes-only text-to-image prompt in API format."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
