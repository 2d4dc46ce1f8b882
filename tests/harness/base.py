"""A ComfyUI base directory (--base-directory) for the tests."""

from __future__ import annotations

import json
from pathlib import Path

from .paths import PACK_NAME, REPO, TESTS

MODEL_FOLDERS = ("checkpoints", "clip_vision", "ipadapter", "loras", "likeness", "insightface", "controlnet")

# Loads the tiny model configs into the server process, and the soak test's count of live
# tensors (harness/live_tensors.py); never shipped.
TINY_MODELS_NODE = f'''\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("likeness_tiny_models", {str(TESTS / "tiny" / "tiny_models.py")!r})
module = importlib.util.module_from_spec(spec)
sys.modules["likeness_tiny_models"] = module
spec.loader.exec_module(module)
module.register()
spec = importlib.util.spec_from_file_location("likeness_live_tensors", {str(TESTS / "harness" / "live_tensors.py")!r})
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
probe.register_route()
NODE_CLASS_MAPPINGS = {{}}
'''

# A new user gets the template browser over an empty graph; the tests want
# the default graph, as a returning user sees it.
EDITOR_SETTINGS = {"Comfy.TutorialCompleted": True}


def make_base_directory(base: Path) -> Path:
    """The pack and the test-only model registration in custom_nodes/,
    empty model folders, and a returning user's editor settings."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    (custom_nodes / "likeness_tiny_models").mkdir()
    (custom_nodes / "likeness_tiny_models" / "__init__.py").write_text(TINY_MODELS_NODE)
    for folder in MODEL_FOLDERS:
        (base / "models" / folder).mkdir(parents=True)
    for folder in ("input", "output", "temp"):
        (base / folder).mkdir()
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(EDITOR_SETTINGS))
    return base
