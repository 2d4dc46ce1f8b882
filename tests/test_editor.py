"""Workflows in the real graph editor (headless Chromium)."""

from __future__ import annotations


import copy
import json
from contextlib import contextmanager

import numpy as np
import pytest

from harness.paths import TESTS
from harness.workflows import WORKFLOWS, api_inputs

pytestmark = pytest.mark.slow

CORE_WORKFLOW = TESTS / "workflows" / "core_txt2img.json"


def test_the_editor_knows_every_likeness_node(editor, comfy):
    registered = set(editor.registered_types())
    assert set(comfy.pack_node_ids) <= registered


def test_core_workflow_loads_without_problems(editor):
    report = editor.load(CORE_WORKFLOW, "core_txt2img")
    assert report.problems == []
    assert report.node_count == 7
    assert report.screenshot.stat().st_size > 10_000


def test_core_workflow_turns_into_its_api_twin(editor):
    editor.load(CORE_WORKFLOW, "core_txt2img_roundtrip")
    twin = json.loads((TESTS / "workflows" / "api" / "core_txt2img.json").read_text())
    assert api_inputs(editor.to_api_prompt()) == api_inputs(twin)


def test_an_unknown_node_type_is_reported_missing(editor):
    workflow = json.loads(CORE_WORKFLOW.read_text())
    broken = copy.deepcopy(workflow)
    sampler = next(node for node in broken["nodes"] if node["type"] == "KSampler")
    sampler["type"] = "LikenessNoSuchNode"
    report = editor.load(broken, "unknown_node")
    assert "LikenessNoSuchNode" in report.missing
    assert report.unregistered == ["LikenessNoSuchNode"]
    assert report.problems == ["LikenessNoSuchNode"]
    # and the editor recovers: the good workflow loads cleanly afterwards
    assert editor.load(workflow, "after_unknown").problems == []


def test_a_workflow_the_editor_rejects_is_reported(editor):
    workflow = json.loads(CORE_WORKFLOW.read_text())
    workflow["nodes"][0]["outputs"][0]["slot_index"] = None  # not allowed by the editor's schema
    report = editor.load(workflow, "invalid_schema")
    assert any("schema" in alert for alert in report.alerts), report


def test_a_console_error_the_offline_editor_never_logs_fails(editor):
    """Only the start-up noise of an offline editor (../shared/HOST.md) is tolerated, matched exactly."""
    before = len(editor.console_errors)
    editor.page.evaluate("() => console.error('Failed to load resource: the server responded with a status of 404 "
                         "(Not Found)')")
    editor.page.evaluate("() => console.error(\"TypeError: Cannot read properties of undefined (reading 'id')\")")
    editor.page.wait_for_timeout(200)
    logged = editor.console_errors[before:]
    assert len(logged) == 2 and not any(error.harmless for error in logged), logged
    del editor.console_errors[before:]  # logged on purpose: not an error of the editor
    assert all(error.harmless for error in editor.console_errors), editor.unexpected_console_errors()


def shipped_model_links(workflow: dict) -> list[str]:
    """"<models folder> / <file>" of every model the workflow's nodes carry metadata for."""
    return sorted({f"{m['directory']} / {m['name']}" for node in workflow["nodes"]
                   for m in node.get("properties", {}).get("models", [])})


@contextmanager
def model_files_hidden(shipped_model_files):
    """The tests' model files under the shipped names, and the insightface pack, hidden (renamed to a
    dot name, which ComfyUI's model listing and the face nodes skip) while the block runs: a host
    where the user has not fetched them yet."""
    placed = [path for path in shipped_model_files if path.is_symlink() or path.is_dir()]
    hidden = [path.with_name("." + path.name) for path in placed]
    for path, away in zip(placed, hidden):
        path.rename(away)
    try:
        yield
    finally:
        for path, away in zip(placed, hidden):
            away.rename(path)


def thumbnail_cells(path) -> np.ndarray:
    """The mean colour of each cell of an 8x8 grid over the picture, as the editor test's page computes it."""
    from PIL import Image

    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    rows = [(height * i) // 8 for i in range(9)]
    columns = [(width * i) // 8 for i in range(9)]
    return np.array([pixels[rows[y]:rows[y + 1], columns[x]:columns[x + 1]].mean(axis=(0, 1))
                     for y in range(8) for x in range(8)]).ravel()


def test_the_template_browser_lists_every_workflow_with_its_thumbnail(editor, server):
    from harness.workflows import shipped_workflows

    templates = server.get("/workflow_templates")
    assert sorted(templates.get("likeness", [])) == shipped_workflows()
    pictures = {name: thumbnail_cells(WORKFLOWS / f"{name}.jpg") for name in shipped_workflows()}
    shown = editor.template_cards("likeness", shipped_workflows(),
                                  {name: cells.tolist() for name, cells in pictures.items()})
    assert sorted(shown) == shipped_workflows()
    for name, card in shown.items():
        # the card's title and description as this editor makes them for a custom node's template:
        # the file name, and the name with '_' shown as spaces (it reads no other metadata; see
        # docs/workflows.md). A newer editor that reads metadata fails this: then ship it.
        lines = [line.strip() for line in card["text"].splitlines() if line.strip()]
        assert name in lines and name.replace("_", " ") in lines, (name, lines)
    for name, card in shown.items():
        # the card shows the pack's picture: workflows/<name>.jpg, and no other thumbnail is as near
        drawn = np.asarray(card["cells"])
        distance = {other: float(np.abs(drawn - cells).max()) for other, cells in pictures.items()}
        assert distance[name] < 3 and min(distance, key=distance.get) == name, (name, distance)
        assert card["loaded_width"] > 100, f"{name}: its thumbnail did not load"


def test_without_model_files_the_dialog_and_one_run_name_every_file(editor, base_directory, shipped_model_files):
    """Without the model files the editor names every file a shipped workflow needs that it can
    download, with its folder, and shows no red error row; one Run then names every model file of
    the workflow at once in the error dialog (ComfyUI's loaders and Likeness' own pickers, the
    insightface pack included), and the nodes that need them are the ones marked. With the tests'
    tiny files under those names the editor names none, and each workflow opens with its note and
    the titled groups of its stages. (One loop over the workflows: each load costs seconds.)"""
    from harness.workflows import WORKFLOWS, load_api, load_ui, shipped_workflows
    from test_missing_files import checked_at_validation, needed_files

    with model_files_hidden(shipped_model_files):
        editor.reload()
        for name in shipped_workflows():
            workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
            expected = shipped_model_links(workflow)
            assert expected, f"{name} loads models but carries no links"
            report = editor.load(workflow, f"missing_models_{name}")
            assert report.missing_models == expected, name
            assert report.missing_model_errors == [], (name, report.missing_model_errors)
            answer = editor.run(f"run_without_models_{name}_errors")
            needed = checked_at_validation(load_api(name), needed_files(load_api(name)))
            assert answer["refusal_logged"], name
            assert set(answer["node_errors"]) == set(needed), (name, sorted(answer["node_errors"]))
            for files in needed.values():
                for _, file in files:
                    assert file in answer["dialog"], (name, file, answer["dialog"][:2000])
    editor.reload()
    for name in shipped_workflows():
        report = editor.load(WORKFLOWS / f"{name}.json", f"models_present_{name}")
        assert report.missing_models == [], name
        shown = editor.page.evaluate("""() => ({
          groups: app.graph.groups.map(g => g.title),
          notes: app.graph._nodes.filter(n => n.type === "MarkdownNote").map(n => n.widgets[0].value),
        })""")
        ui = load_ui(name)
        assert shown["groups"] == [group["title"] for group in ui["groups"]] and len(shown["groups"]) >= 3, name
        overview = [text for text in shown["notes"] if "**What it does.**" in text]
        assert len(overview) == 1 and "**Model files**" in overview[0] and "**Paper:**" in overview[0], name
