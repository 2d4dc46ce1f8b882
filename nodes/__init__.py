"""The ComfyUI surface of Likeness: one module per family, thin on purpose. A node class has its
node id's name; each ``execute`` checks its inputs, calls ``attention/`` and returns.

    magicstyle.py             Invert, AdaIN Latent, Feature Fusion Attention, the features nodes
                              (attention/magicstyle/)
    small_faces.py            Face Region Crop, Paste Back: MagicStyle on small faces
                              (attention/magicstyle/face_region.py)
    face_fusion.py            Face Fusion, Train Face KV (attention/face_fusion/)
    infinite_id.py            ID Adapter Loader, Infinite-ID, Train ID Adapter (attention/infinite_id/)
    portrait_editing.py       Mask-Guided Guider, Pair Guider, Split Pair, Edit Mask, Pair Prompts,
                              Save Pairs (attention/portrait_editing/, no MCDM)
    portrait_editing_mcdm.py  MCDM Loader, MCDM Conditioning, MCDM Guider, Train MCDM
    face_analysis.py          Face Analysis, Face Crop, Face Similarity (attention/faces/)
    metrics.py, sweep.py      CLIP Score; Sweep and Sweep Grid (attention/measuring/)
    common.py                 what the families share: custom types, model folders, input checks,
                              the trainer nodes' inputs and outputs

The trainers' folder readers (FaceExampleReader, IDPairReader, PairReader) sit beside their trainer
node: ``jobs/train.py`` reads folders with the same classes.
"""

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
