"""jobs/train.py with the tests' tiny model configs known to ComfyUI's model detection (a real
SD1.5 checkpoint needs nothing of the kind): the same arguments, the same main()."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--comfyui") + 1]).expanduser().resolve()))
    sys.path.insert(0, str(TESTS))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # the tests run on the CPU, as jobs/train.py does where there is no CUDA
    from tiny import tiny_models

    tiny_models.register()
    sys.argv = [str(TESTS.parent / "jobs" / "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
