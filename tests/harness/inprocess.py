"""ComfyUI imported into the pytest process, with the pack loaded.

Set-up order matters: command-line args before ``comfy.model_management``,
``utils.extra_config`` before ``nodes`` (nodes.py puts comfy/ on sys.path,
where comfy/utils.py would shadow the ``utils`` package).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch


def run_coroutine(coroutine):
    """``asyncio.run`` on a thread of its own: a test earlier in the session (the browser driver's
    sync API) may leave an event loop running in this thread, where asyncio.run refuses to start."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class ComfyInProcess:
    def __init__(self, comfyui: Path, base_directory: Path, pack_dir: Path) -> None:
        sys.path.insert(0, str(comfyui))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.base_directory = str(base_directory)
        comfy.cli_args.args.disable_api_nodes = True
        import utils.extra_config  # noqa: F401
        import nodes

        self.nodes = nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        before = set(nodes.NODE_CLASS_MAPPINGS)
        if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
            raise RuntimeError(f"ComfyUI could not load the pack from {pack_dir}")
        self.pack_node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        # ComfyUI names a folder module after its full path.
        self.pack_module = sys.modules[str(pack_dir).replace(".", "_x_")]

    def pack(self, submodule: str):
        """A module of the loaded pack, e.g. ``pack("attention.shared.dispatch")``."""
        import importlib

        return importlib.import_module(f"{self.pack_module.__name__}.{submodule}")

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_node(self, node_id: str, **inputs) -> tuple:
        """Run one node as the executor would (V1 or V3), under inference mode."""
        from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

        cls = self.node_class(node_id)
        with torch.inference_mode():
            if issubclass(cls, _ComfyNodeInternal):
                cls.VALIDATE_CLASS()
                execute = make_locked_method_func(cls, "execute", cls.PREPARE_CLASS_CLONE({}))
                result = execute(**inputs)
                return tuple(result.args)
            result = getattr(cls(), cls.FUNCTION)(**inputs)
            return tuple(result["result"] if isinstance(result, dict) else result)

    def load_checkpoint(self, name: str) -> tuple:
        """(MODEL, CLIP, VAE) through the core CheckpointLoaderSimple."""
        return self.run_node("CheckpointLoaderSimple", ckpt_name=name)
