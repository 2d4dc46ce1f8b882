"""ComfyUI's output cache (on, as on users' servers) and the nodes that read files: a changed file
or training folder runs the node again; an unchanged one is served from the cache."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow


def id_trainer_prompt(folder: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "LikenessIDAdapterLoader", "inputs": {"adapter_name": "ip-adapter-faceid-plusv2_sd15.bin"}},
        "3": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
        "4": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
        "5": {"class_type": "LikenessTrainIDAdapter", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "id_adapter": ["2", 0], "analysis": ["3", 0],
            "clip_vision": ["4", 0], "folder": folder, "steps": 1, "learning_rate": 1e-4, "seed": 0,
            "shortcut_scale": 1.0, "filename_prefix": prefix}},
    }


def add_pair(folder, name: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    portrait = Image.open(folder.parent / "likeness_portrait.png")
    portrait.resize((64, 64)).save(folder / f"{name}.png")
    portrait.save(folder / f"{name}.id.png")


def test_a_trainer_runs_again_when_its_folder_changes_and_not_otherwise(server, base_directory, shipped_model_files):
    folder = base_directory / "input" / "cache_id_pairs"
    shutil.rmtree(folder, ignore_errors=True)
    add_pair(folder, "first")
    written = lambda: sorted(p.name for p in (base_directory / "models" / "ipadapter").glob("cache_test_*"))  # noqa: E731
    prompt = id_trainer_prompt("cache_id_pairs", "cache_test")
    assert server.run_prompt(prompt).ok
    assert len(written()) == 1
    assert server.run_prompt(prompt).ok
    assert len(written()) == 1, "an unchanged folder: the cached result, no second training"
    add_pair(folder, "second")
    assert server.run_prompt(prompt).ok
    assert len(written()) == 2, "a picture added to the folder: trained again"


def test_load_features_reads_a_replaced_file(server, base_directory, comfy, tiny_checkpoints):
    """Save Features writes a file; replacing it under the same name must not serve the old one."""
    import torch

    features_dir = base_directory / "models" / "likeness_features"
    features_dir.mkdir(parents=True, exist_ok=True)
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    cond = comfy.run_node("CLIPTextEncode", clip=clip, text="")[0]
    names, latents = [], []
    for seed in (1, 2):
        latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}
        _, bank = comfy.run_node("LikenessInvert", model=model, conditioning=cond, latent=latent, steps=2,
                                 capture="kv", layers="decoder", cache_on="auto", precision="fp16")
        names.append(comfy.run_node("LikenessSaveFeatures", features=bank, filename_prefix=f"cache_feat_{seed}")[0])
        latents.append(bank.latent)
    target = features_dir / "cache_features.safetensors"
    prompt = {"1": {"class_type": "LikenessLoadFeatures", "inputs": {"file": target.name}},
              "2": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 1], "upscale_method": "nearest-exact",
                                                               "scale_by": 1.0}},
              "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "cache_feat"}}}
    from safetensors.torch import load_file

    for name, expected in zip(names, latents):
        shutil.copyfile(features_dir / name, target)
        result = server.run_prompt(prompt)
        assert result.ok, result.error
        (saved,) = result.outputs["3"]["latents"]
        loaded = load_file(str(base_directory / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
        # the file now under that name, not the cached one it replaced
        assert torch.equal(loaded, expected.to(loaded.dtype)), name
