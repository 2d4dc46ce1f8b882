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
from harness.paths import PACK_NAME, REPO, TESTS, host_root, load_installer  # noqa: E402


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


def magicstyle(size: int = 256, steps: int = 10, bytes_size: int | None = 512, bytes_steps: int = 3) -> dict:
    """Issue 3's figures on a full-size random SD1.5 UNet, ComfyUI on this CPU.

    Cache bytes come from a real 512×512 inversion of ``bytes_steps`` steps,
    scaled to 30 (a 30-step one takes ~20 minutes here); step times are
    per step, so 10 steps at 256×256 measure them."""
    import importlib

    sys.path.insert(0, str(host_root_comfyui()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    sys.path.insert(0, str(REPO))  # nodes.py is never imported here, so attention/ cannot shadow it
    import tiny_models
    from harness.magicstyle_bench import full_sd15, measure

    attention = {name: importlib.import_module(f"attention.{name}")
                 for name in ("inversion", "ffa", "schedule", "unet_layers", "feature_bank")}
    return measure(full_sd15(tiny_models.initialise), attention, size=size, steps=steps, bytes_size=bytes_size,
                   bytes_steps=bytes_steps)


def host_root_comfyui() -> Path:
    return load_installer().Host(host_root()).comfyui


def main() -> int:
    results = {"pack_import": pack_import_cost()}
    if "--skip-magicstyle" not in sys.argv:
        results["magicstyle_cpu"] = magicstyle()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
