"""IP-Adapter FaceID-PlusV2 reads the face recognition network it was trained with (buffalo_l's
w600k_r50 for h94's files, what a Likeness-trained file records), and the crop its model card
makes: expected values from insightface's own FaceAnalysis.get / norm_crop and IP-Adapter's
ProjPlusModel (ip-adapterv), computed in the test (tests/harness/faceid_reference.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from harness.faceid_reference import (RecordingClipVision, identities_of, model_card_inputs, proj_plus_model,
                                      write_float32_adapter)
from harness.paths import REPO, load_installer
from harness.sampling import txt2img_latent
from tiny import tiny_insightface, tiny_models

BUFFALO_ZIP = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
ANTELOPE_ZIP = "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()  # (512, 512, 3) uint8 RGB: the tiny detector's face


@pytest.fixture(scope="module")
def packs(comfy, base_directory):
    """Both packs in the user's models folder, each with its own recognition network; antelopev2
    is taken away afterwards (other tests expect it missing there)."""
    root = base_directory / "models" / "insightface"
    folders = {name: tiny_insightface.write_pack(root, name) for name in ("buffalo_l", "antelopev2")}
    analyses = {name: comfy.run_node("LikenessFaceAnalysis", model_name=name, provider="CPU")[0] for name in folders}
    yield folders, analyses
    shutil.rmtree(folders["antelopev2"], ignore_errors=True)


@pytest.fixture(scope="module")
def clip_vision(comfy, base_directory):
    path = tiny_models.write_clip_vision(base_directory / "models" / "clip_vision")
    return comfy.run_node("CLIPVisionLoader", clip_name=path.name)[0]


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    return comfy.load_checkpoint(tiny_checkpoints["sd15"])


def load_adapter(comfy, base_directory, name: str):
    return comfy.run_node("LikenessIDAdapterLoader", adapter_name=name)[0]


def infinite_id(comfy, model, adapter, analysis, clip_vision, image, **overrides):
    settings = dict(weight=1.0, mixed_attention=True, cross_attention_merge=True, adain_mean=False, mix_weights="",
                    shortcut_scale=0.7, start_percent=0.0, end_percent=1.0)
    settings.update(overrides)
    return comfy.run_node("LikenessInfiniteID", model=model, id_adapter=adapter, analysis=analysis,
                          clip_vision=clip_vision, image=image, **settings)[0]


def as_image(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(photo).float()[None] / 255


def test_the_two_tiny_packs_embed_one_face_differently(packs, photo):
    folders, _ = packs
    buffalo, antelope = (model_card_inputs(folders[name], photo) for name in ("buffalo_l", "antelopev2"))
    assert torch.equal(buffalo.clip_image, antelope.clip_image)  # one detector, one crop
    assert float((buffalo.embedding * antelope.embedding).sum()) < 0.5  # two networks, two spaces


def test_infinite_id_refuses_an_analysis_from_another_recognition_network(comfy, base_directory, packs, clip_vision,
                                                                         sd15, photo):
    _, analyses = packs
    model, _, _ = sd15
    write_float32_adapter(base_directory / "models" / "ipadapter" / "faceid_public_like.bin", "sd15")
    adapter = load_adapter(comfy, base_directory, "faceid_public_like.bin")
    assert adapter.face_recognition.model == "w600k_r50"  # no metadata in a .bin: FaceID's own
    with pytest.raises(ValueError) as error:
        infinite_id(comfy, model, adapter, analyses["antelopev2"], clip_vision, as_image(photo))
    message = str(error.value)
    for part in ("analysis='antelopev2'", "glintr100", "w600k_r50", "models/insightface/models/buffalo_l/",
                 BUFFALO_ZIP):
        assert part in message, (part, message)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_identity_tokens_are_proj_plus_model_on_what_the_model_card_computes(comfy, base_directory, packs,
                                                                           clip_vision, tiny_checkpoints, photo,
                                                                           kind):
    """With buffalo_l: the CLIP image the node encodes is insightface's norm_crop at 224 bit for bit,
    and the tokens equal ProjPlusModel(faces[0].normed_embedding, CLIP(norm_crop), s_scale 0.7)."""
    folders, analyses = packs
    model, _, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    name = f"faceid_card_{kind}.safetensors"
    write_float32_adapter(base_directory / "models" / "ipadapter" / name, kind)
    adapter = load_adapter(comfy, base_directory, name)
    recording = RecordingClipVision(clip_vision)
    patched = infinite_id(comfy, model, adapter, analyses["buffalo_l"], recording, as_image(photo))

    card = model_card_inputs(folders["buffalo_l"], photo)
    assert len(recording.encoded) == 1 and torch.equal(recording.encoded[0], card.clip_image)
    with torch.no_grad():
        hidden = clip_vision.encode_image(card.clip_image)["penultimate_hidden_states"].float()
        expected = proj_plus_model(kind)(card.embedding, hidden, shortcut=True, scale=0.7)
    (identity,) = identities_of(patched)
    torch.testing.assert_close(identity.tokens, expected, rtol=1e-5, atol=1e-5)


def test_a_trained_adapter_records_its_network_and_requires_it(comfy, base_directory, packs, clip_vision, sd15,
                                                              photo):
    """The trainer writes the analysis' network into the file; a file recording antelopev2's glintr100
    is refused with buffalo_l (and names antelopev2's folder and zip) and runs with antelopev2; the
    trainer refuses an analysis its adapter was not trained on before reading its folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, analyses = packs
    model, clip, vae = sd15
    write_float32_adapter(base_directory / "models" / "ipadapter" / "faceid_to_train.safetensors", "sd15")
    adapter = load_adapter(comfy, base_directory, "faceid_to_train.safetensors")
    folder = base_directory / "input" / "recognition_pairs"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(photo).resize((64, 64)).save(folder / "a.png")
    Image.fromarray(photo).save(folder / "a.id.png")
    training = dict(model=model, clip=clip, vae=vae, clip_vision=clip_vision, folder="recognition_pairs", steps=1,
                    learning_rate=1e-4, seed=0, shortcut_scale=1.0)
    with pytest.raises(ValueError, match="glintr100.*w600k_r50"):
        comfy.run_node("LikenessTrainIDAdapter", id_adapter=adapter, analysis=analyses["antelopev2"],
                       filename_prefix="refused", **training)
    written = comfy.run_node("LikenessTrainIDAdapter", id_adapter=adapter, analysis=analyses["buffalo_l"],
                             filename_prefix="recorded", **training)[0]
    path = base_directory / "models" / "ipadapter" / written
    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata()
    assert metadata["likeness.face_recognition_model"] == "w600k_r50"
    assert metadata["likeness.face_recognition_pack"] == "buffalo_l"

    # The same weights, recorded as trained on antelopev2's network.
    save_file(load_file(str(path)), str(path.with_name("recorded_antelopev2.safetensors")),
              metadata={**metadata, "likeness.face_recognition_model": "glintr100",
                        "likeness.face_recognition_pack": "antelopev2"})
    antelope_adapter = load_adapter(comfy, base_directory, "recorded_antelopev2.safetensors")
    with pytest.raises(ValueError) as error:
        infinite_id(comfy, model, antelope_adapter, analyses["buffalo_l"], clip_vision, as_image(photo))
    assert "models/insightface/models/antelopev2/" in str(error.value) and ANTELOPE_ZIP in str(error.value)
    patched = infinite_id(comfy, model, antelope_adapter, analyses["antelopev2"], clip_vision, as_image(photo))
    assert torch.isfinite(txt2img_latent(comfy, patched, clip)).all()
    # Training it further needs antelopev2 too, and the new file records it again.
    with pytest.raises(ValueError, match="w600k_r50.*glintr100"):
        comfy.run_node("LikenessTrainIDAdapter", id_adapter=antelope_adapter, analysis=analyses["buffalo_l"],
                       filename_prefix="refused", **training)
    again = comfy.run_node("LikenessTrainIDAdapter", id_adapter=antelope_adapter, analysis=analyses["antelopev2"],
                           filename_prefix="recorded_again", **training)[0]
    with safe_open(str(base_directory / "models" / "ipadapter" / again), framework="pt") as opened:
        assert opened.metadata()["likeness.face_recognition_model"] == "glintr100"
    assert not list((base_directory / "models" / "ipadapter").glob("refused*"))


def adapter_feeding_face_analyses(api: dict) -> list[str]:
    """Ids of the Face Analysis nodes whose analysis goes into a node that feeds a FaceID adapter."""
    feeding = {"LikenessInfiniteID", "LikenessTrainIDAdapter"}
    return sorted({node["inputs"]["analysis"][0] for node in api.values()
                   if node["class_type"] in feeding and isinstance(node["inputs"].get("analysis"), list)})


def test_every_shipped_workflow_that_feeds_a_faceid_adapter_loads_buffalo_l():
    """Read from both twins: the API file, and the UI file's widget value of the same node. buffalo_l,
    because every shipped adapter is one of h94's FaceID-PlusV2 files (install.MODEL_FILES)."""
    checked = []
    for api_path in sorted((REPO / "workflows" / "api").glob("*.json")):
        api = json.loads(api_path.read_text())
        ui = {str(node["id"]): node for node in json.loads((REPO / "workflows" / api_path.name).read_text())["nodes"]}
        adapters = [n["inputs"]["adapter_name"] for n in api.values() if n["class_type"] == "LikenessIDAdapterLoader"]
        assert all(name.startswith("ip-adapter-faceid-plusv2_") for name in adapters), (api_path.name, adapters)
        for node_id in adapter_feeding_face_analyses(api):
            assert api[node_id]["class_type"] == "LikenessFaceAnalysis"
            assert api[node_id]["inputs"]["model_name"] == "buffalo_l", api_path.name
            assert ui[node_id]["type"] == "LikenessFaceAnalysis" and ui[node_id]["widgets_values"][0] == "buffalo_l", \
                api_path.name
            checked.append(api_path.stem)
    assert {"infinite_id_sd15", "infinite_id_sdxl", "infinite_id_style", "identity_mix", "infinite_id_two_people",
            "pair_generation"} <= set(checked)


def test_the_installer_lists_the_pack_the_workflows_load(capsys, tmp_path):
    load_installer().print_model_folders(tmp_path)
    printed = capsys.readouterr().out
    assert "models/insightface/models/buffalo_l/w600k_r50.onnx" in printed and BUFFALO_ZIP in printed
    readme = (REPO / "README.md").read_text()
    shipped_table = readme[readme.index("## Model files"):readme.index("## Workflows")]
    assert BUFFALO_ZIP in shipped_table and "models/insightface/models/buffalo_l/" in shipped_table


@pytest.mark.slow  # two runs of jobs/train.py, each starting ComfyUI in its own process
def test_the_training_job_reads_the_adapters_network_and_refuses_another(host, base_directory, tiny_checkpoints,
                                                                         tmp_path):
    """jobs/train.py id_adapter without --face-model loads the pack the adapter was trained with
    (buffalo_l for a file without metadata) and records it; --face-model antelopev2 stops with the error."""
    import subprocess

    from safetensors import safe_open

    from harness.training_job import id_adapter_inputs, job_command, one_thread_each, run_job

    inputs = {"checkpoint": base_directory / "models" / "checkpoints" / tiny_checkpoints["sd15"],
              **id_adapter_inputs(tmp_path / "models")}
    tiny_insightface.write_pack(inputs["insightface"], "antelopev2")
    command = job_command(host.comfyui, inputs, tmp_path / "default", processes=0, steps=1, trainer="id_adapter")
    at = command.index("--face-model")
    run_job(command[:at] + command[at + 2:])
    with safe_open(str(tmp_path / "default" / "id_adapter.safetensors"), framework="pt") as opened:
        metadata = opened.metadata()
    assert (metadata["likeness.face_recognition_model"], metadata["likeness.face_recognition_pack"]) == \
        ("w600k_r50", "buffalo_l")

    command = job_command(host.comfyui, {**inputs, "face_model": "antelopev2"}, tmp_path / "refused", processes=0,
                          steps=1, trainer="id_adapter")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=900, env=one_thread_each())
    assert refused.returncode != 0
    assert "glintr100" in refused.stderr and "w600k_r50" in refused.stderr and BUFFALO_ZIP in refused.stderr
    assert not (tmp_path / "refused" / "id_adapter.safetensors").exists()
