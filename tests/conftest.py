"""Fixtures: the host, tiny models, ComfyUI in-process, its server, its editor.

Everything is built from nothing the first time and cached outside the
repository ($LIKENESS_HOST_CACHE, default ~/.cache/likeness), keyed by the
recipe that made it, so a changed recipe rebuilds and an unchanged one is
reused. Run through ``python3 tests/run.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.base import make_base_directory  # noqa: E402
from harness.paths import PACK_NAME, REPO, cache_root, host_root, load_installer  # noqa: E402
from tiny import tiny_models  # noqa: E402

ARTIFACTS = Path(os.environ.get("LIKENESS_ARTIFACTS", REPO / ".test-artifacts"))

@pytest.fixture(scope="session")
def host():
    """The ComfyUI host: the interpreter running pytest plus a ComfyUI tree,
    which is unpacked here the first time."""
    installer = load_installer()
    built = installer.Host(host_root())
    if not (built.comfyui / "main.py").exists():
        installer.extract_comfyui(built.comfyui, Path(sys.executable))
    return built


@pytest.fixture(scope="session")
def base_directory(tmp_path_factory, host) -> Path:
    """A ComfyUI base directory with the pack in custom_nodes/."""
    base = make_base_directory(tmp_path_factory.mktemp("comfy-base"))
    load_installer().copy_examples(base / "input")  # the pictures install.py puts in the input folder
    return base


@pytest.fixture(scope="session")
def comfy(host, base_directory):
    """ComfyUI imported into this process with the pack loaded."""
    from harness.inprocess import ComfyInProcess

    in_process = ComfyInProcess(host.comfyui, base_directory, base_directory / "custom_nodes" / PACK_NAME)
    tiny_models.register()
    return in_process


@pytest.fixture(scope="session")
def tiny_checkpoints(comfy, base_directory) -> dict[str, str]:
    """Tiny SD1.5 and SDXL checkpoints in models/checkpoints: {"sd15": file name, "sdxl": ...}."""
    cache = cache_root() / f"tiny-{tiny_models.recipe_digest()}"
    paths = tiny_models.write_checkpoints(cache)
    names = {}
    for kind, path in paths.items():
        link = base_directory / "models" / "checkpoints" / path.name
        if not link.exists():
            link.symlink_to(path)
        names[kind] = path.name
    return names


@pytest.fixture(scope="session")
def shipped_model_files(base_directory, tiny_checkpoints) -> list[Path]:
    """The tests' tiny files under the names the shipped workflows load (install.MODEL_FILES)."""
    from harness.workflows import place_tiny_models

    folder = base_directory / "models" / "checkpoints"
    return place_tiny_models(base_directory / "models", {kind: folder / name for kind, name in tiny_checkpoints.items()})


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def server(host, base_directory, tiny_checkpoints, artifacts):
    """ComfyUI's main.py serving the pack and the tiny models; always stopped."""
    from harness.server import ComfyServer

    running = ComfyServer(Path(sys.executable), host.comfyui, base_directory, artifacts / "server.log")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def editor(server, artifacts):
    """The server's real graph editor in headless Chromium."""
    from harness import required
    from harness.editor import CHROMIUM, GraphEditor

    if not Path(CHROMIUM).exists():
        required.missing(f"{CHROMIUM} is missing: tests/run.py installs Debian's chromium when run as root "
                         "(apt-get install chromium)")
    page = GraphEditor(server.url, artifacts)
    try:
        yield page
        # Errors outside any one load (start-up, between tests) fail the session's last editor test.
        unexpected = page.unexpected_console_errors()
        assert not unexpected, f"the editor logged errors: {unexpected}"
    finally:
        page.close()
