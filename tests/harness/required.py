"""What a test needs beside the pack (an oracle package, a browser): skipped on a developer's
machine that lacks it, a failure in CI (env CI=true), where a skipped oracle would pass
unproven what it exists to prove."""

from __future__ import annotations

import importlib
import importlib.util
import os
from importlib.machinery import ModuleSpec
from types import ModuleType

import pytest


def in_ci() -> bool:
    """Whether this run is CI's (read when asked, so a test can set it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> None:
    """Stop the test: a failure in CI, a skip elsewhere. ``message`` says what is missing and
    what installs it."""
    if in_ci():
        pytest.fail(f"{message} (CI runs every test: a missing requirement fails it)", pytrace=False)
    pytest.skip(message)


def installed(name: str, reason: str) -> ModuleSpec:
    """The spec of top-level package ``name`` (found, not imported), or ``missing(...)`` when it
    is not installed (``reason``: what installs it)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        missing(f"{name} is not installed: {reason}")
    return spec


def module(name: str, reason: str) -> ModuleType:
    """``import name``: like ``pytest.importorskip``, but CI fails instead of skipping. A package
    that is there but fails to import is an error, never a skip."""
    installed(name.split(".")[0], reason)
    return importlib.import_module(name)
