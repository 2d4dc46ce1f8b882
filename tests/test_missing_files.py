"""A host without model files: one POST /prompt of a shipped workflow names every file it needs.

ComfyUI's own loaders report "Value not in list" at validation; Likeness' pickers (whose V3
dropdowns ComfyUI 0.3.75 does not check) report theirs from validate_inputs, in the same answer,
each with the folder the file goes in and the publisher's link.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.paths import load_installer
from harness.server import ComfyServer, PromptRejected
from harness.workflows import load_api, shipped_workflows
from test_install import MODEL_INPUTS

pytestmark = pytest.mark.slow

CORE_LOADERS = {"CheckpointLoaderSimple", "CLIPVisionLoader", "ControlNetLoader", "UNETLoader", "DualCLIPLoader",
                "VAELoader"}
CORE_V3_LOADERS = {"TripleCLIPLoader"}


@pytest.fixture(scope="module")
def bare_server(host, tmp_path_factory, artifacts):
    """ComfyUI with the pack and the example pictures, and not one model file: a new user's host."""
    from harness.base import make_base_directory

    base = make_base_directory(tmp_path_factory.mktemp("bare") / "base")
    load_installer().copy_examples(base / "input")
    server = ComfyServer(Path(sys.executable), host.comfyui, base, artifacts / "bare_server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def needed_files(prompt: dict) -> dict[str, list[tuple[str, str]]]:
    """{node id: [(folder, file)]} of every model file the prompt's nodes load, read from the prompt
    and install.py's table (insightface packs as their folder)."""
    folders = {model["name"]: model["directory"] for model in load_installer().MODEL_FILES}
    needed: dict[str, list[tuple[str, str]]] = {}
    for node_id, node in prompt.items():
        for key in MODEL_INPUTS.get(node["class_type"], []):
            if node["inputs"].get(key, "none") != "none":
                needed.setdefault(node_id, []).append((folders[node["inputs"][key]], node["inputs"][key]))
        if node["class_type"] == "LikenessFaceAnalysis":
            pack = node["inputs"]["model_name"]
            needed.setdefault(node_id, []).append((f"insightface/models/{pack}", f"{pack}.zip"))
    return needed


def checked_at_validation(prompt: dict, needed: dict[str, list[tuple[str, str]]]) -> dict:
    """``needed`` less the nodes whose files ComfyUI cannot name before running: it checks no V3
    node's dropdown at validation (0.3.75), its own V3 loaders' neither; those files are named when
    the node runs (the workflow's note lists them with their links)."""
    return {node_id: files for node_id, files in needed.items()
            if prompt[node_id]["class_type"] not in CORE_V3_LOADERS}


def rejected(server, prompt: dict) -> dict:
    with pytest.raises(PromptRejected) as refusal:
        server.post("/prompt", {"prompt": prompt})
    return refusal.value.body


@pytest.mark.parametrize("name", shipped_workflows())
def test_one_post_names_every_missing_file_with_its_folder(bare_server, name):
    prompt = load_api(name)
    body = rejected(bare_server, prompt)
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    needed = needed_files(prompt)
    assert needed, name
    errors = body["node_errors"]
    needed = checked_at_validation(prompt, needed)
    # exactly the nodes that load a file report, and every file is named by its node
    assert set(errors) == set(needed), (name, sorted(errors), sorted(needed))
    links = {model["name"]: model["url"] for model in load_installer().MODEL_FILES}
    for node_id, files in needed.items():
        said = " ".join(f"{e['message']}: {e['details']}" for e in errors[node_id]["errors"])
        for folder, file in files:
            if file.endswith(".zip"):  # an insightface pack: its folder and its zip
                assert f"models/{folder}" in said and f"releases/download/v0.7/{file}" in said, (name, said)
            elif prompt[node_id]["class_type"] in CORE_LOADERS:  # ComfyUI's own message: the file and the input
                # (VAELoader always offers its built-in 'pixel_space' beside the files it finds)
                assert f"'{file}' not in []" in said or f"'{file}' not in ['pixel_space']" in said, (name, said)
            else:
                assert f"models/{folder}/{file} is missing" in said and links[file] in said, (name, said)


def test_a_missing_file_the_user_chose_names_what_the_folder_holds(bare_server, tmp_path):
    """A file that is not one of the shipped ones: the message lists the folder's files instead of a link."""
    folder = Path(bare_server.base_directory) / "models" / "ipadapter"
    (folder / "my_adapter.safetensors").write_bytes(b"")
    prompt = {"1": {"class_type": "LikenessIDAdapterLoader", "inputs": {"adapter_name": "someone_elses.bin",
                                                                      "lora": "none"}},
              "2": {"class_type": "LikenessMCDMLoader", "inputs": {"unet_name": "mine.pth", "adapter_name": "none",
                                                                 "clip_vision_name": "none"}},
              **{str(i): {"class_type": "PreviewAny", "inputs": {"source": [src, 0]}} for i, src in ((3, "1"), (4, "2"))}}
    try:
        body = rejected(bare_server, prompt)
    finally:
        (folder / "my_adapter.safetensors").unlink()
    adapter = " ".join(e["details"] for e in body["node_errors"]["1"]["errors"])
    assert "models/ipadapter/someone_elses.bin is missing (models/ipadapter/ holds my_adapter.safetensors)" in adapter
    mcdm = " ".join(e["details"] for e in body["node_errors"]["2"]["errors"])
    assert "models/likeness/mine.pth is missing (models/likeness/ holds no files); choose a file there" in mcdm
