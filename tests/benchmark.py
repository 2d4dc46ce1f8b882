"""Numbers for the issues, measured the same way each time.

    <host python> tests/benchmark.py            (or: python3 tests/run.py builds the host first)

Timings on these machines are noisy: each figure is a ratio or a median
from one run, never a test assertion.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.base import make_base_directory  # noqa: E402
from harness.paths import PACK_NAME, TESTS, host_root, load_installer  # noqa: E402


def pack_import_cost(repeats: int = 5) -> dict:
    """Seconds load_custom_node spends on the pack in a started ComfyUI."""
    host = load_installer().Host(host_root())
    with tempfile.TemporaryDirectory() as folder:
        base = make_base_directory(Path(folder) / "base")
        seconds = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, str(TESTS / "harness" / "import_probe.py"), str(host.comfyui),
                                  str(base / "custom_nodes" / PACK_NAME)], capture_output=True, text=True, check=True)
            seconds.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    return {"pack_import_seconds_median": statistics.median(seconds), "runs": repeats}


def main() -> int:
    results = {"pack_import": pack_import_cost()}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
