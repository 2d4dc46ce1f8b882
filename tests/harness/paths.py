"""Where the harness finds the repository, the installer and the host."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
PACK_NAME = "likeness"


def load_installer():
    """The pack's install.py, imported by path (the repository root must not
    go on sys.path: its ``nodes/`` would shadow ComfyUI's ``nodes.py``)."""
    if "likeness_install" in sys.modules:
        return sys.modules["likeness_install"]
    spec = importlib.util.spec_from_file_location("likeness_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["likeness_install"] = module
    spec.loader.exec_module(module)
    return module


def host_root() -> Path:
    """The host this pytest runs in: $LIKENESS_HOST (tests/run.py sets it), or
    the folder holding the virtual environment of this interpreter."""
    if os.environ.get("LIKENESS_HOST"):
        return Path(os.environ["LIKENESS_HOST"])
    return Path(sys.prefix).parent


def cache_root() -> Path:
    return Path(os.environ.get("LIKENESS_HOST_CACHE", Path.home() / ".cache" / "likeness"))
