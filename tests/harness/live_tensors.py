"""Test-only: a route on the test server that counts the tensors Python still holds
(GET /likeness_test/live_tensors), for the soak test. Loaded from custom_nodes/ by
tests/harness/base.py; never shipped.

Resident memory moves with the allocator and with what ComfyUI's cache holds; the tensors
alive after the same pass over every workflow do not, so a tensor kept per prompt shows up
here long before it shows in RSS."""

from __future__ import annotations

import gc


def live_tensors() -> dict:
    import torch

    gc.collect()
    storages: dict[int, int] = {}
    count = 0
    for thing in gc.get_objects():
        try:
            if not isinstance(thing, torch.Tensor) or thing.device.type == "meta":
                continue
            storage = thing.untyped_storage()
        except Exception:  # objects that refuse isinstance/attribute access while half torn down
            continue
        count += 1
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return {"tensors": count, "storages": len(storages), "bytes": sum(storages.values())}


def register_route() -> None:
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/likeness_test/live_tensors")
    async def answer(request):
        return web.json_response(live_tensors())
