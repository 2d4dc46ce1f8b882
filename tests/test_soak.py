"""Hundreds of prompts through one server with its cache on (tests/harness/soak.py)."""

from __future__ import annotations

import json

import pytest

from harness.paths import load_installer
from harness.soak import soak

pytestmark = pytest.mark.slow


def test_a_long_mixed_run_keeps_serving_and_does_not_grow(server, base_directory, shipped_model_files, artifacts):
    load_installer().copy_examples(base_directory / "input")
    figures = soak(server, prompts=160, first={"magicstyle_style_library": ["7"]})
    (artifacts / "soak.json").write_text(json.dumps(figures.as_dict(), indent=1))
    assert figures.unexpected == [], figures.unexpected
    assert figures.succeeded + figures.failed_as_expected + figures.interrupted == figures.prompts
    assert figures.failed_as_expected >= 12 and figures.succeeded >= 150
    assert server.get("/system_stats")["system"]
    # The tensors Python holds after the same pass over every workflow: a tensor kept per prompt
    # (a feature bank, a patched model, an exception's frames) adds up over 80 prompts.
    for half in (0, 1):
        tensors, tensor_bytes = figures.tensor_growth(half)
        assert tensors <= 0 and tensor_bytes <= 0, figures.as_dict()
    # Resident memory swings by tens of MB with no tensor kept (measured over the first half +1.6%
    # to +5.1%, over the second +0.4% to -5.9%, in all -0.8% to +2.1%). Issue 12's bound: under 5%
    # from the warm server to the end. Over the second half, after the allocator has met interrupts
    # and failures in the first, a leak of 0.4 MB a prompt grows a ~1.4 GB server by 3%.
    assert figures.rss_growth_total < 0.05, figures.as_dict()
    assert figures.rss_growth(1) < 0.03, figures.as_dict()
