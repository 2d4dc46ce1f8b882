"""Writes are whole or absent, and interrupts leave everything as it was: an interrupt (or a
crash) during a save leaves no truncated file; interrupting a run leaves the MODEL unchanged."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from harness.sampling import encode, txt2img_latent


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    return comfy.load_checkpoint(tiny_checkpoints["sd15"])


def interrupting_save(monkeypatch, model_management):
    """safetensors' save_file that writes half a file, then ComfyUI's interrupt arrives."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_interrupt(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise model_management.InterruptProcessingException()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)


def likeness_files(folder, prefix):
    return sorted(p.name for p in folder.glob(f"{prefix}*"))


def test_an_interrupted_save_features_leaves_no_file(comfy, sd15, base_directory, monkeypatch):
    import comfy.model_management as model_management

    model, clip, _ = sd15
    _, bank = comfy.run_node("LikenessInvert", model=model, conditioning=encode(comfy, clip, ""),
                             latent={"samples": torch.randn(1, 4, 8, 8)}, steps=2, capture="kv", layers="decoder",
                             cache_on="auto", precision="fp8")
    folder = base_directory / "models" / "likeness_features"
    interrupting_save(monkeypatch, model_management)
    with pytest.raises(model_management.InterruptProcessingException):
        comfy.run_node("LikenessSaveFeatures", features=bank, filename_prefix="interrupted_save")
    assert likeness_files(folder, "interrupted_save") == []
    monkeypatch.undo()
    (name,) = comfy.run_node("LikenessSaveFeatures", features=bank, filename_prefix="interrupted_save")
    assert likeness_files(folder, "interrupted_save") == [name]


def write_id_pairs(folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    portrait = Image.open(folder.parent / "likeness_portrait.png")
    portrait.resize((64, 64)).save(folder / "a.png")
    portrait.save(folder / "a.id.png")


@pytest.fixture(scope="module")
def id_trainer_inputs(comfy, base_directory, shipped_model_files, sd15):
    model, clip, vae = sd15
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name="ip-adapter-faceid-plusv2_sd15.bin")
    (analysis,) = comfy.run_node("LikenessFaceAnalysis", model_name="buffalo_l", provider="CPU")
    (clip_vision,) = comfy.run_node("CLIPVisionLoader", clip_name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    write_id_pairs(base_directory / "input" / "writes_id_pairs")
    return dict(model=model, clip=clip, vae=vae, id_adapter=adapter, analysis=analysis, clip_vision=clip_vision,
                folder="writes_id_pairs", learning_rate=1e-4, seed=0, shortcut_scale=1.0, batch_size=1)


def test_an_interrupted_id_adapter_save_leaves_no_file(comfy, base_directory, id_trainer_inputs, monkeypatch):
    import comfy.model_management as model_management

    folder = base_directory / "models" / "ipadapter"
    interrupting_save(monkeypatch, model_management)
    with pytest.raises(model_management.InterruptProcessingException):
        comfy.run_node("LikenessTrainIDAdapter", steps=1, filename_prefix="interrupted_id", **id_trainer_inputs)
    assert likeness_files(folder, "interrupted_id") == []


def test_an_interrupted_id_adapter_training_leaves_the_model_as_it_was(comfy, sd15, base_directory,
                                                                        id_trainer_inputs, monkeypatch):
    import comfy.model_management as model_management

    model, clip, _ = sd15
    before = txt2img_latent(comfy, model, clip)
    calls = []

    def interrupt_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_on_the_second_step)
    with pytest.raises(model_management.InterruptProcessingException):
        comfy.run_node("LikenessTrainIDAdapter", steps=20, filename_prefix="interrupted_training",
                       **id_trainer_inputs)
    monkeypatch.undo()
    assert likeness_files(base_directory / "models" / "ipadapter", "interrupted_training") == []
    assert torch.equal(txt2img_latent(comfy, model, clip), before)


PATCHES = {
    "ffa": lambda comfy, model, clip: comfy.run_node(
        "LikenessFeatureFusionAttention", model=model,
        **dict(zip(("content", "style"), [comfy.run_node(
            "LikenessInvert", model=model, conditioning=encode(comfy, clip, ""), latent={"samples": torch.randn(
                1, 4, 8, 8, generator=torch.Generator().manual_seed(s))}, steps=10, capture="qkv", layers="all",
            cache_on="auto", precision="fp8")[1] for s in (1, 2)])),
        alpha=0.8, beta=0.2, temperature=1.0, layers="all", style_index=0, start_percent=0.0, end_percent=1.0)[0],
}


@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_interrupting_a_patched_run_leaves_the_model_bit_identical(comfy, sd15, patch, monkeypatch):
    import comfy.model_management as model_management

    model, clip, _ = sd15
    before = txt2img_latent(comfy, model, clip, steps=10, sampler="euler")
    patched = PATCHES[patch](comfy, model, clip)
    calls = []

    def interrupt_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 40:  # ComfyUI checks in every op: well into the run
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_midway)
    with pytest.raises(model_management.InterruptProcessingException):
        txt2img_latent(comfy, patched, clip, steps=10, sampler="euler")
    monkeypatch.undo()
    assert torch.equal(txt2img_latent(comfy, model, clip, steps=10, sampler="euler"), before)


# Loaded into the server by PYTHONPATH: when a "killed*" file is about to be renamed into place,
# cut the written file to half (as a kill mid-write leaves it) and SIGKILL the server right there.
KILL_BEFORE_RENAME = """
import os, signal
_replace = os.replace
def replace(source, destination, *args, **kwargs):
    name = os.path.basename(str(destination))
    if name.startswith("killed") and str(source).endswith(".partial"):
        with open(source, "r+b") as partial:
            partial.truncate(os.path.getsize(source) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(source, destination, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.slow
def test_a_server_killed_while_saving_leaves_no_truncated_file(host, base_directory, tiny_checkpoints, artifacts,
                                                               tmp_path):
    """SIGKILL the server inside Save Features' write (its .partial file half written), start it
    again: no features file exists under a real name until the prompt runs to the end the second
    time, and that file loads."""
    import sys
    from pathlib import Path

    from harness.server import ComfyServer

    folder = base_directory / "models" / "likeness_features"
    for earlier in folder.glob("killed*"):
        earlier.unlink()
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoints["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "4": {"class_type": "LikenessInvert", "inputs": {
            "model": ["1", 0], "conditioning": ["2", 0], "latent": ["3", 0], "steps": 20, "capture": "qkv",
            "layers": "all", "cache_on": "auto", "precision": "fp16"}},
        "5": {"class_type": "LikenessSaveFeatures", "inputs": {"features": ["4", 1], "filename_prefix": "killed"}},
    }
    hook = tmp_path / "kill_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_BEFORE_RENAME)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    server = ComfyServer(Path(sys.executable), host.comfyui, base_directory, artifacts / "killed-server.log",
                         env=environment)
    try:
        server.wait_ready()
        server.post("/prompt", {"prompt": prompt, "client_id": "kill-test"})
        assert server.process.wait(timeout=300) == -signal.SIGKILL, server.log_tail()
    finally:
        server.stop()
    (partial,) = folder.glob("killed*.partial")
    assert partial.stat().st_size > 0
    assert not [p for p in folder.glob("killed*.safetensors")], "no file under its real name: it was not finished"
    again = ComfyServer(Path(sys.executable), host.comfyui, base_directory, artifacts / "restarted-server.log")
    try:
        again.wait_ready()
        result = again.run_prompt(prompt, timeout=600)
        assert result.ok, result.error
        (name,) = [p.name for p in folder.glob("killed*.safetensors")]
        load = {"1": {"class_type": "LikenessLoadFeatures", "inputs": {"file": name}},
                "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 1], "filename_prefix": "killed"}}}
        assert again.run_prompt(load).ok
    finally:
        again.stop()
