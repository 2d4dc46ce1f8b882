"""The pack inside ComfyUI's real server, driven over its HTTP API."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harness.server import PromptRejected
from harness.workflows import txt2img_prompt

pytestmark = pytest.mark.slow


def test_object_info_lists_the_pack_nodes(server, comfy):
    info = server.get("/object_info")
    listed = sorted(name for name in info if name.startswith("Likeness"))
    assert listed == sorted(comfy.pack_node_ids)
    assert listed, "the pack registered no nodes"
    for name in listed:
        assert info[name]["category"].startswith("likeness/")
        for section in ("required", "optional"):
            for input_name, spec in info[name]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


@pytest.mark.parametrize("kind,width,height", [("sd15", 64, 96), ("sdxl", 96, 64)])
def test_txt2img_writes_a_png_of_the_requested_size(server, tiny_checkpoints, kind, width, height):
    result = server.run_prompt(txt2img_prompt(tiny_checkpoints[kind], width, height, prefix=f"t2i_{kind}"))
    assert result.ok, result.error
    assert len(result.files) == 1
    with Image.open(result.files[0]) as image:
        assert image.format == "PNG"
        assert image.size == (width, height)
        # a NaN anywhere in model, VAE or sampler decodes to a flat black image
        assert np.asarray(image).std() > 1.0


def test_a_node_error_comes_back_with_its_message(server):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "3": {"class_type": "LikenessAdaINLatent", "inputs": {"content": ["1", 0], "style": ["2", 0]}},
        "4": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                         "scale_by": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["6", 2]}},
        "6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    result = server.run_prompt(prompt)
    assert result.status == "error"
    assert result.error["node_type"] == "LikenessAdaINLatent"
    assert "style batch 3" in result.error["exception_message"]


def test_an_invalid_prompt_is_rejected(server):
    prompt = txt2img_prompt("no_such_checkpoint.safetensors", 64, 64)
    with pytest.raises(PromptRejected) as rejected:
        server.run_prompt(prompt)
    assert "no_such_checkpoint" in str(rejected.value)
