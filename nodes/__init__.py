"""The ComfyUI surface of Likeness: one module per family, thin on purpose."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (face_analysis, face_fusion, infinite_id, magicstyle, metrics, portrait_editing, portrait_editing_mcdm,
               small_faces, sweep)
from .common import register_model_folders

FAMILIES = (magicstyle, face_fusion, face_analysis, infinite_id, portrait_editing, portrait_editing_mcdm, metrics,
            small_faces, sweep)
register_model_folders()


class LikenessExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for family in FAMILIES for node in family.NODES]


async def comfy_entrypoint() -> LikenessExtension:
    return LikenessExtension()
