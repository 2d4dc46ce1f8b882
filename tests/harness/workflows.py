"""API-format prompts for the tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .paths import REPO

WORKFLOWS = REPO / "workflows"
TINY_FACE_PACK = "buffalo_l"  # written by tests/tiny/tiny_insightface.py
SHIPPED_FACE_PACK = "buffalo_l"  # the pack the shipped workflows choose (install.SHIPPED_INSIGHTFACE_PACK)


def shipped_workflows() -> list[str]:
    """Names of the pack's workflows (each has a UI file and an API twin)."""
    return sorted(path.stem for path in (WORKFLOWS / "api").glob("*.json"))


def api_inputs(prompt: dict) -> dict:
    """class_type and inputs of each node: what the server compares."""
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def with_bypassed(prompt: dict, ui_workflow: dict, node_ids) -> dict:
    """The prompt the editor queues with ``node_ids`` bypassed (ExecutableNodeDTO.resolveOutput): the
    nodes leave the prompt, and an input fed by one of their outputs is fed by what feeds the bypassed
    node's input of that output's type (the same slot first, then the first input of the type), or
    left out where none does. Types come from the UI workflow."""
    bypassed = {str(node_id) for node_id in node_ids}
    ui_nodes = {str(node["id"]): node for node in ui_workflow["nodes"]}

    def resolve(source: list):
        node_id, slot = str(source[0]), source[1]
        if node_id not in bypassed:
            return source
        node = ui_nodes[node_id]
        wanted = node["outputs"][slot]["type"]
        inputs = node.get("inputs", [])
        index = slot if slot < len(inputs) and inputs[slot]["type"] == wanted else next(
            (i for i, entry in enumerate(inputs) if entry["type"] == wanted), None)
        fed = None if index is None else prompt[node_id]["inputs"].get(inputs[index]["name"])
        return resolve(fed) if isinstance(fed, list) else None

    result = {}
    for node_id, node in prompt.items():
        if node_id in bypassed:
            continue
        inputs = {}
        for name, value in node["inputs"].items():
            value = resolve(value) if isinstance(value, list) else value
            if value is not None:
                inputs[name] = value
        result[node_id] = {**node, "inputs": inputs}
    return result


def for_tiny_models(prompt: dict, size: int = 64) -> dict:
    """A shipped prompt made quick here: small images (the model files keep their shipped names;
    ``place_tiny_models`` puts the tests' tiny files under those names)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("ImageScale", "EmptyLatentImage", "EmptySD3LatentImage"):
            # keep the aspect (a pair canvas is twice as wide as tall)
            inputs["width"], inputs["height"] = size * inputs["width"] // inputs["height"], size
        if node["class_type"] == "LikenessFaceCrop":
            inputs["crop_size"] = size
        if node["class_type"] == "LikenessFaceRegionCrop":
            inputs["size"] = size
    return prompt


def place_tiny_models(models: Path, checkpoints: dict[str, Path]) -> list[Path]:
    """The tests' tiny files (real layouts, tiny sizes) under every name the shipped workflows load
    (install.MODEL_FILES), and a tiny insightface pack under the name they choose. Returns the
    files placed; a file already there is kept."""
    from tiny import tiny_controlnet, tiny_dit, tiny_faceid, tiny_insightface, tiny_mcdm, tiny_models

    from .paths import load_installer

    staging = models.parent / "tiny-staging"
    mcdm = tiny_mcdm.write(staging)
    flux = tiny_dit.write_flux_workflow_files(staging / "flux")
    sources = {
        "flux1-dev.safetensors": flux["flux_tiny.safetensors"], "ae.safetensors": flux["ae_tiny.safetensors"],
        "clip_l.safetensors": flux["clip_l_tiny.safetensors"], "t5xxl_fp16.safetensors": flux["t5xxl_tiny.safetensors"],
        "sd3.5_large.safetensors": flux["sd3_tiny.safetensors"], "clip_g.safetensors": flux["clip_g_tiny.safetensors"],
        "v1-5-pruned-emaonly.safetensors": checkpoints["sd15"],
        "sd_xl_base_1.0.safetensors": checkpoints["sdxl"],
        "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": tiny_models.write_clip_vision(staging / "clip_vision"),
        "ip-adapter-faceid-plusv2_sd15.bin": tiny_faceid.write(staging / "faceid_sd15.bin", "sd15"),
        "ip-adapter-faceid-plusv2_sdxl.bin": tiny_faceid.write(staging / "faceid_sdxl.bin", "sdxl"),
        "control_v11p_sd15_openpose_fp16.safetensors": tiny_controlnet.write(staging / "controlnet"),
        "clip-vit-base-patch32.safetensors": staging / "clip_vision" / mcdm["clip_vision"],
        "outfit/unet.pth": staging / "likeness" / mcdm["unet"],
        "outfit/adapter.pth": staging / "likeness" / mcdm["adapter"],
        "open_clip_model.safetensors": staging / "open_clip" / "open_clip_model.safetensors",
    }
    # A tiny open_clip model for the CLIP scores, its config beside the placed name (a <stem>.json
    # next to the checkpoint is the architecture the metric nodes load).
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    clip_config = {"embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    config_path = models / "open_clip" / "open_clip_model.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(clip_config))
    sources["open_clip_model.safetensors"].parent.mkdir(parents=True, exist_ok=True)
    open_clip.add_model_config(str(config_path))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights = open_clip.create_model("open_clip_model").state_dict()
    save_file({name: tensor.contiguous() for name, tensor in weights.items()},
              str(sources["open_clip_model.safetensors"]))
    placed = []
    for model in load_installer().MODEL_FILES:
        target = models / model["directory"] / model["name"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(sources[model["name"]]).resolve())
        placed.append(target)
    placed.append(tiny_insightface.write_pack(models / "insightface", SHIPPED_FACE_PACK))
    return placed


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
