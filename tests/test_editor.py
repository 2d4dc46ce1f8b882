"""Workflows in the real graph editor (headless Chromium)."""

from __future__ import annotations

import copy
import json

import pytest

from harness.paths import TESTS
from harness.workflows import api_inputs

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
