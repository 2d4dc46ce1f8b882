"""What loading the pack into an already started ComfyUI costs.

    <host python> tests/harness/import_probe.py COMFYUI_DIR PACK_DIR

Prints JSON: seconds for load_custom_node, and the modules it imported
that are not the pack's own. Run in a fresh process so nothing is cached.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def main(comfyui: str, pack_dir: str) -> None:
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_api_nodes = True
    import utils.extra_config  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(sys.modules)
    start = time.perf_counter()
    loaded = asyncio.run(nodes.load_custom_node(pack_dir))
    seconds = time.perf_counter() - start
    pack_prefix = pack_dir.replace(".", "_x_")
    added = sorted(name for name in set(sys.modules) - before if not name.startswith(pack_prefix))
    print(json.dumps({"loaded": loaded, "seconds": seconds, "foreign_modules": added}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
