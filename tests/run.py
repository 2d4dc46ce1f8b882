"""The test command: builds (or reuses) a ComfyUI host, then runs pytest in it.

    python3 tests/run.py                 # the whole suite, as CI runs it
    python3 tests/run.py -m "not slow"   # the fast tests while you work

Extra arguments go to pytest. The host lives outside the repository, in
$LIKENESS_HOST_CACHE (default ~/.cache/likeness), one folder per recipe, so a
changed recipe builds a new one and an unchanged one is reused in seconds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import install  # noqa: E402  (the pack's own installer builds the host)

# Test-only packages: never in the pack's requirements.
TEST_PACKAGES = ("pytest>=8", "playwright==1.65.2",
                 # an independent face detector/embedder whose weights ship in its wheels
                 "dlib-bin==20.0.1.post1", "face-recognition-models==0.3.0",
                 # the MCDM's released code is built on diffusers: the key conversion is proven against it
                 "diffusers==0.35.2",
                 # IP-Adapter's authors' code (Apache-2.0): the oracle for FaceID-PlusV2's tokens and LoRA
                 "ip-adapterv==0.1.0")
CHROMIUM = Path("/usr/bin/chromium")
LAST_USED = "last-used"


def host_cache() -> Path:
    return Path(os.environ.get("LIKENESS_HOST_CACHE", Path.home() / ".cache" / "likeness"))


def ensure_chromium() -> None:
    """Debian's chromium for the graph-editor tests (no browser download)."""
    if CHROMIUM.exists() or shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def prune_old_hosts(keep: Path, idle_hours: float = 1.0) -> None:
    """A host is several GB; hosts of older recipes are not used again. One
    used in the last hours may still be serving another checkout's run: kept."""
    now = time.time()
    for old in keep.parent.glob("host-*"):
        stamp = old / LAST_USED
        last = stamp.stat().st_mtime if stamp.exists() else old.stat().st_mtime
        if old != keep and old.is_dir() and now - last > idle_hours * 3600:
            shutil.rmtree(old, ignore_errors=True)


def main() -> int:
    recipe = install.host_recipe(TEST_PACKAGES)
    root = host_cache() / f"host-{install.recipe_digest(recipe)}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first one's build
        host = install.build_host(root, TEST_PACKAGES, install_pack=False)
    (root / LAST_USED).touch()
    prune_old_hosts(root)
    ensure_chromium()
    env = {**os.environ, "LIKENESS_HOST": str(host.root), "PYTHONDONTWRITEBYTECODE": "1"}
    arguments = sys.argv[1:]
    # Test files or folders named on the command line replace the default (the whole tests/ folder).
    named = [a for a in arguments if not a.startswith("-") and (REPO / a).exists() or Path(a).exists()]
    command = [str(host.python), "-m", "pytest", *([] if named else [str(REPO / "tests")]), *arguments]
    return subprocess.call(command, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
