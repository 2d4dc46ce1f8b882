"""The ComfyUI surface of Likeness: one module per family, thin on purpose."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (editing, face_analysis, face_fusion, face_training, infinite_id, infinite_id_training, magicstyle,
               mcdm, mcdm_training, metrics, pairs, face_region, sweep)
from .common import register_model_folders

FAMILIES = (magicstyle, face_fusion, face_training, face_analysis, infinite_id, infinite_id_training, editing, mcdm,
            pairs, mcdm_training, metrics, face_region, sweep)
register_model_folders()


class LikenessExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for family in FAMILIES for node in family.NODES]


async def comfy_entrypoint() -> LikenessExtension:
    return LikenessExtension()
