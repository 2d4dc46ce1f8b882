"""Every shipped workflow: runs through the server's API, loads in the editor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from harness.layout import load_layout, nodes_inside
from harness.paths import load_installer
from harness.workflows import (WORKFLOWS, api_inputs, for_tiny_models, load_api, load_ui, shipped_workflows,
                               with_bypassed)

pytestmark = pytest.mark.slow

LONG = {"magicstyle_sweep"}  # two 30-step inversions and four 30-step samplings, even on tiny models
EXPECTED_IMAGES = {"magicstyle": 1, "magicstyle_style_library": 2, "face_fusion": 1,
                   "face_fusion_multi_reference": 1, "face_fusion_two_people": 1, "infinite_id_sdxl": 1,
                   "infinite_id_sd15": 1, "infinite_id_style": 1, "identity_mix": 1, "diffedit_edit": 1,
                   "pair_generation": 2, "mcdm_edit": 1, "magicstyle_small_face": 1,
                   "magicstyle_sweep": 4, "infinite_id_two_people": 1, "magicstyle_flux": 1, "face_fusion_flux": 1,
                   "magicstyle_sd35": 1}


def test_every_workflow_has_a_ui_file_and_an_api_twin():
    names = shipped_workflows()
    assert set(EXPECTED_IMAGES) <= set(names)
    for name in names:
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert ui["nodes"] and ui["links"], name


@pytest.fixture(scope="module")
def workflow_files(server, base_directory, shipped_model_files):
    """The example pictures (as install.py copies them) and the tiny model files under the names
    every shipped workflow loads."""
    load_installer().copy_examples(base_directory / "input")


@pytest.mark.parametrize("name", shipped_workflows())
def test_workflow_runs_through_the_api(server, tiny_checkpoints, base_directory, workflow_files, name):
    """Each workflow as shipped, in one Run (magicstyle_style_library saves its style and applies it)."""
    prompt = for_tiny_models(load_api(name))
    if name == "magicstyle_style_library":  # as on a new user's host: no style saved before
        for saved in (base_directory / "models" / "likeness_features").glob("my_style_*"):
            saved.unlink()
    result = server.run_prompt(prompt, timeout=900 if name in LONG else 300)
    assert result.ok, result.error
    images = [Image.open(path) for path in result.files if "temp" not in path.parts]
    assert sum(image.size == (64, 64) for image in images) == EXPECTED_IMAGES.get(name, len(images))
    assert all(np.asarray(image).std() > 1.0 for image in images), "a flat image: NaN somewhere"
    if name == "pair_generation":  # LikenessSavePairs wrote the pair as a training example
        assert (base_directory / "input" / "likeness_pairs" / "pair_00001.source.png").exists()


@pytest.mark.parametrize("name", shipped_workflows())
def test_workflow_loads_in_the_editor_and_matches_its_twin(editor, name):
    report = editor.load(WORKFLOWS / f"{name}.json", name)
    assert report.problems == [], report
    # nodes the layout bypasses by default leave the prompt as the editor's bypass does
    twin = with_bypassed(load_api(name), load_ui(name), load_layout(WORKFLOWS, name).get("bypassed", []))
    assert api_inputs(editor.to_api_prompt()) == api_inputs(twin)


GROUPED = [(name, group["title"]) for name in shipped_workflows()
           for group in load_layout(WORKFLOWS, name).get("groups", [])]
# The groups a user may switch off (the others are stages the graph needs).
OPTIONAL = [(name, group["title"]) for name in shipped_workflows()
            for group in load_layout(WORKFLOWS, name).get("groups", []) if group.get("optional")]
# The groups whose title tells the user to bypass them: the optional ones, and magicstyle_style_library's
# "make the style" group once a style is saved (tested with its file below).
TOLD_TO_BYPASS = {(name, title) for name, title in GROUPED if "bypass" in title}

# The editor's groups: the nodes each holds (its own rule) and the prompt with them bypassed.
BYPASS_GROUP = """
(title) => {
  const group = app.graph.groups.find(g => g.title === title);
  group.recomputeInsideNodes();
  const ids = group.nodes.map(n => n.id);
  for (const node of group.nodes) node.mode = 4;
  return ids;
}
"""


@pytest.mark.parametrize("name, title", GROUPED)
def test_a_group_bypassed_in_the_editor_queues_the_prompt_the_api_tests_run(editor, name, title):
    """Every group holds exactly the layout's nodes (and its notes) by the editor's own rule; for a
    group the user is told to bypass, what the API tests run for "group off" is what the real editor
    queues once the group's nodes are bypassed. (Bypassing a stage the graph needs has no such
    promise: the editor then sends a converted widget's own value where the API tests leave the
    input out.)"""
    editor.load(WORKFLOWS / f"{name}.json", name)
    ids = editor.page.evaluate(BYPASS_GROUP, title)
    (wanted,) = [g for g in load_layout(WORKFLOWS, name)["groups"] if g["title"] == title]
    ui = load_ui(name)
    notes = {node["id"] for node in ui["nodes"] if node["type"] == "MarkdownNote"}
    assert {str(i) for i in set(ids) - notes} == set(wanted["nodes"])
    (saved,) = [g for g in ui["groups"] if g["title"] == title]
    assert set(ids) == nodes_inside(ui, saved)
    if (name, title) in TOLD_TO_BYPASS:
        expected = with_bypassed(load_api(name), ui, wanted["nodes"])
        assert api_inputs(editor.to_api_prompt()) == api_inputs(expected)


@pytest.mark.parametrize("name, title", OPTIONAL)
def test_the_workflow_runs_with_each_group_on_and_off(server, tiny_checkpoints, workflow_files, name, title):
    (group,) = [g for g in load_layout(WORKFLOWS, name)["groups"] if g["title"] == title]
    prompt = fewer_steps(for_tiny_models(load_api(name)), 4)  # the wiring is under test, not the schedule
    off = with_bypassed(prompt, load_ui(name), group["nodes"])
    assert set(off) == set(prompt) - set(group["nodes"])
    results = {}
    for state, graph in (("on", prompt), ("off", off)):
        result = server.run_prompt(graph, timeout=600)
        assert result.ok, (state, result.error)
        results[state] = saved_pixels(result)
    (on_image,), (off_image,) = results["on"], results["off"]
    assert np.asarray(off_image).std() > 1.0
    changed = (on_image != off_image).any(-1)
    if name == "magicstyle_small_face":  # the identity step acts on the restored face, pasted back under the mask
        region = region_mask(server, prompt)
        assert not changed[region == 0].any(), "the identity step changed pixels outside the face region"
        share = changed[region > 0.5].mean()
        print(f"{name}: the identity step changed {share:.0%} of the pixels inside the face region, none outside")
        assert share > 0.15, f"the identity step changed {share:.0%}"


def fewer_steps(prompt: dict, steps: int) -> dict:
    """The prompt with every inversion and sampler at ``steps`` (they must match for MagicStyle)."""
    for node in prompt.values():
        if "steps" in node["inputs"] and node["class_type"] in ("LikenessInvert", "KSampler", "KSamplerAdvanced",
                                                                "BasicScheduler"):
            node["inputs"]["steps"] = steps
    return prompt


def region_mask(server, prompt: dict) -> np.ndarray:
    """The paste-back mask of magicstyle_small_face's face region (node 21's MASK), as 0..1."""
    graph = {key: prompt[key] for key in ("1", "2", "4", "20", "21")}
    graph["90"] = {"class_type": "MaskToImage", "inputs": {"mask": ["21", 2]}}
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "region_mask"}}
    result = server.run_prompt(graph)
    assert result.ok, result.error
    (mask,) = saved_pixels(result)
    return mask[..., 0] / 255.0


# One input the second prompt changes, downstream of cached outputs the patch nodes receive.
CHANGED_INPUT = {"magicstyle": ("LikenessFeatureFusionAttention", "alpha", 0.6),
                 "face_fusion": ("LikenessFaceFusion", "weight", 2.0),
                 "infinite_id_sd15": ("LikenessInfiniteID", "weight", 0.6),
                 "mcdm_edit": ("LikenessMCDMGuider", "text_scale", 6.0)}


def saved_pixels(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(path), dtype=np.int16) for path in result.files if "temp" not in path.parts]


@pytest.mark.parametrize("name", sorted(CHANGED_INPUT))
def test_queued_twice_with_one_input_changed_the_cached_outputs_were_left_alone(server, tiny_checkpoints,
                                                                                workflow_files, name):
    """With ComfyUI's cache on, the second prompt reuses the first one's cached MODEL, features,
    conditionings...; had a node changed one of them, its result would differ from the same prompt
    computed from nothing."""
    prompt = for_tiny_models(load_api(name))
    node_class, input_name, value = CHANGED_INPUT[name]
    changed = json.loads(json.dumps(prompt))
    (node,) = [n for n in changed.values() if n["class_type"] == node_class]
    assert node["inputs"][input_name] != value
    node["inputs"][input_name] = value
    first = server.run_prompt(prompt)
    second = server.run_prompt(changed)
    assert first.ok and second.ok, (first.error, second.error)
    server.clear_cache()
    fresh = server.run_prompt(changed)
    assert fresh.ok, fresh.error
    (first_image,), (cached_image,), (fresh_image,) = saved_pixels(first), saved_pixels(second), saved_pixels(fresh)
    assert np.array_equal(cached_image, fresh_image)
    # The tiny models' pictures are dim (a few levels of 255); rounding would change a handful of
    # pixels, a changed input a fifth of them or more.
    changed_pixels = float((cached_image != first_image).any(-1).mean())
    assert changed_pixels > 0.15, f"{input_name}={value} changed {changed_pixels:.0%} of the pixels"


def test_a_style_saved_by_the_library_workflow_is_reused_with_its_first_group_bypassed(server, tiny_checkpoints,
                                                                                       base_directory,
                                                                                       workflow_files):
    """The style library's note: bypass group 2 to reuse a saved style. Load Features then reads the
    file in its list (the one the first Run saved), and the photos come out as in that first Run."""
    name = "magicstyle_style_library"
    prompt = fewer_steps(for_tiny_models(load_api(name)), 4)
    first = server.run_prompt(prompt)
    assert first.ok, first.error
    saved = first.outputs["7"]["text"][0]  # Save Features' file, as its node reports it
    (make_style,) = [g for g in load_layout(WORKFLOWS, name)["groups"] if g["title"].startswith("2 ·")]
    reuse = with_bypassed(prompt, load_ui(name), make_style["nodes"])
    assert "saved_file" not in reuse["8"]["inputs"] and "7" not in reuse
    reuse["8"]["inputs"]["file"] = saved
    again = server.run_prompt(reuse)
    assert again.ok, again.error
    pictures = saved_pixels(first), saved_pixels(again)
    assert len(pictures[0]) == len(pictures[1]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(*pictures))
    assert (base_directory / "models" / "likeness_features" / saved).exists()


def test_the_groups_a_user_is_told_to_bypass_say_so_in_their_title():
    """Each optional group's title says to bypass it, so the editor test above compares its prompt."""
    assert OPTIONAL and set(OPTIONAL) <= TOLD_TO_BYPASS
    assert {name for name, _ in TOLD_TO_BYPASS} == {"magicstyle_small_face", "magicstyle_style_library"}


def test_every_ui_workflow_explains_itself():
    """Groups by stage that hold every node, titled; one note outside them that names every model
    file the workflow loads with its folder and link, what to change first and the paper."""
    installer = load_installer()
    for name in shipped_workflows():
        ui, api = load_ui(name), load_api(name)
        notes = [node for node in ui["nodes"] if node["type"] == "MarkdownNote"]
        grouped = set()
        for group in ui["groups"]:
            assert group["title"].strip(), name
            grouped |= nodes_inside(ui, group)
        assert len(ui["groups"]) >= 3, name
        assert {node["id"] for node in ui["nodes"] if node["type"] != "MarkdownNote"} <= grouped, name
        (overview,) = [node for node in notes if node["id"] not in grouped]
        text = overview["widgets_values"][0]
        for words in ("**What it does.**", "**Model files**", "**Change first:**", "**Paper:**"):
            assert words in text, (name, words)
        values = {v for node in api.values() for v in node["inputs"].values() if isinstance(v, str)}
        for model in installer.MODEL_FILES:
            if model["name"] in values:
                assert f"`{model['name']}` → `models/{model['directory']}/`" in text and model["url"] in text, \
                    (name, model["name"])
        for pack in {n["inputs"]["model_name"] for n in api.values() if n["class_type"] == "LikenessFaceAnalysis"}:
            assert f"models/insightface/models/{pack}/" in text, (name, pack)
            assert installer.INSIGHTFACE_PACK_URL.format(pack=pack) in text, (name, pack)
        # the models in the note are the ones the workflow loads: no other
        named = [model["name"] for model in installer.MODEL_FILES if f"`{model['name']}`" in text]
        assert set(named) <= values, name


def test_the_sweep_runs_ffas_blocks_on_flux_once_per_line(server, workflow_files):
    """Likeness Sweep's choices into FFA's text input `blocks` (Flux): the graph runs once per line,
    each line reaching FFA as written, and the grid labels each column with its line."""
    prompt = for_tiny_models(load_api("magicstyle_flux"))
    (ffa,) = [k for k, node in prompt.items() if node["class_type"] == "LikenessFeatureFusionAttention"]
    (decode,) = [k for k, node in prompt.items() if node["class_type"] == "VAEDecode"]
    prompt["90"] = {"class_type": "LikenessSweep", "inputs": {"label": "blocks", "start": 0.0, "stop": 1.0,
                                                              "count": 1, "choices": "d0\nd1, s1\nd0, s0"}}
    prompt[ffa]["inputs"]["blocks"] = ["90", 4]
    prompt["91"] = {"class_type": "LikenessSweepGrid", "inputs": {"images": [decode, 0], "values": ["90", 0],
                                                                  "label": ["90", 3], "choices": ["90", 4]}}
    prompt["92"] = {"class_type": "PreviewImage", "inputs": {"images": ["91", 0]}}
    result = server.run_prompt(prompt, timeout=600)
    assert result.ok, (result.error or {}).get("exception_message")
    pictures = [np.asarray(Image.open(p), dtype=np.float32) for p in result.files
                if "magicstyle_flux" in p.name and p.suffix == ".png"]
    assert len(pictures) == 3
    report = json.loads(result.outputs["91"]["text"][0])
    assert report["choices"] == ["d0", "d1, s1", "d0, s0"] and report["values"] == [0.0, 1.0, 2.0]
    # Each line reaches FFA's blocks as it is: a line naming a block the model lacks stops the run there.
    prompt["90"]["inputs"]["choices"] = "d0\nd7"
    refused = server.run_prompt(prompt, timeout=600)
    assert not refused.ok and "d7" in (refused.error or {}).get("exception_message", "")


def test_face_fusion_runs_on_sd35_over_the_api(server, workflow_files):
    """face_fusion_flux with magicstyle_sd35's loaders (SD3.5 checkpoint, triple CLIP, cfg 5 with a
    negative): Face Fusion on the MMDiT through the server, as a user's graph would run it. (What it
    computes is proven in-process, tests/test_face_fusion_dit.py: the tiny VAE's pictures are too
    flat to show it.)"""
    flux = for_tiny_models(load_api("face_fusion_flux"))
    sd35 = for_tiny_models(load_api("magicstyle_sd35"))
    prompt = {k: v for k, v in flux.items() if v["class_type"] not in ("UNETLoader", "DualCLIPLoader", "VAELoader",
                                                                        "FluxGuidance")}
    prompt["1"], prompt["2"] = sd35["1"], sd35["2"]
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == ["3", 0]:  # the VAE: the checkpoint's
                node["inputs"][name] = ["1", 2]
    prompt["15"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "lowres, blurry"}}
    (sampler,) = [k for k, v in prompt.items() if v["class_type"] == "KSampler"]
    prompt[sampler]["inputs"].update(positive=["9", 0], negative=["15", 0], cfg=5.0)
    result = server.run_prompt(prompt, timeout=600)
    assert result.ok, (result.error or {}).get("exception_message")
    assert [Image.open(p).size for p in result.files if p.suffix == ".png" and "temp" not in p.parts] == [(64, 64)]
