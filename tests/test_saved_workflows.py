"""Workflows users saved with an earlier Likeness still load with every link and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.workflows import api_inputs, load_api

SAVED = Path(__file__).parent / "workflows" / "saved_earlier"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(p.stem for p in SAVED.glob("*.json")))
def test_a_workflow_saved_before_new_inputs_keeps_its_links_and_values(editor, name):
    """The UI file as shipped before the DiT inputs were added to Invert and FFA: the editor's
    prompt is today's twin (the new inputs at their defaults)."""
    report = editor.load(json.loads((SAVED / f"{name}.json").read_text()), name)
    assert report.problems == [], report
    assert api_inputs(editor.to_api_prompt()) == api_inputs(load_api(name))
