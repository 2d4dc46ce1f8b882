"""comfy-cli in a small virtual environment of its own (test-only): its `comfy node validate` is
the check the Comfy Registry's publishing runs. Cached under $LIKENESS_HOST_CACHE like the host."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import venv
from pathlib import Path

from harness.paths import cache_root

COMFY_CLI = "comfy-cli==1.23.0"


def comfy_cli() -> Path:
    """The ``comfy`` executable, built once per pinned version."""
    root = cache_root() / f"comfy-cli-{hashlib.sha256(COMFY_CLI.encode()).hexdigest()[:12]}"
    executable = root / "bin" / "comfy"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "ready").exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(root)
            # comfy-cli needs no torch; nothing here reaches the test host's packages.
            subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            COMFY_CLI], check=True)
            (root / "ready").touch()
    return executable


if __name__ == "__main__":
    print(comfy_cli(), file=sys.stderr)
