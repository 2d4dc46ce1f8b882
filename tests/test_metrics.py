"""The metric nodes: 1.0 for identical inputs, deterministic, local files only."""

from __future__ import annotations

import json

import pytest
import torch

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_open_clip(base_directory):
    """A tiny open_clip model saved as a user's checkpoint, with its config beside it."""
    import open_clip
    from safetensors.torch import save_file

    folder = base_directory / "models" / "open_clip"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny_clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny_clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny_clip.safetensors"))
    return "tiny_clip.safetensors"


def photos(count=2, size=48):
    generator = torch.Generator().manual_seed(3)
    return torch.rand(count, size, size, 3, generator=generator)


def score(comfy, checkpoint, images, reference=None, text=""):
    return comfy.run_node("LikenessCLIPScore", checkpoint=checkpoint, architecture="ViT-H-14", images=images,
                          reference=reference, text=text)


def test_clip_i_of_identical_images_is_one(comfy, tiny_open_clip):
    images = photos(1)
    clip_i, clip_t, report = score(comfy, tiny_open_clip, images, reference=images)
    assert clip_i == pytest.approx(1.0, abs=1e-5)
    assert clip_t == 0.0 and "CLIP-I 1.0000" in report


def test_scores_are_deterministic_and_discriminate(comfy, tiny_open_clip):
    images, other = photos(2), photos(1, size=40) * 0.2
    first = score(comfy, tiny_open_clip, images, reference=other, text="a portrait photo")
    second = score(comfy, tiny_open_clip, images, reference=other, text="a portrait photo")
    assert first == second
    clip_i, clip_t, _ = first
    assert -1.0 <= clip_t <= 1.0 and clip_i < 0.9999


def test_a_missing_checkpoint_is_named(comfy, tiny_open_clip):
    with pytest.raises(ValueError, match="checkpoint"):
        score(comfy, "missing.safetensors", photos(1))
