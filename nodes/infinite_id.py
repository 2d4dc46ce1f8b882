"""Infinite-ID nodes (Wu et al., ECCV 2024): identity-preserved generation from face photos.

The identity stream's weights come in the IP-Adapter FaceID-PlusV2 layout
(``models/ipadapter/``), so the files users already have load as they are.
"""

from __future__ import annotations

import os

from comfy_api.latest import io

from .common import require

CATEGORY = "likeness/infinite_id"
IPADAPTER_FOLDER = "ipadapter"
ADAPTER_EXTENSIONS = {".safetensors", ".bin"}

IDAdapterType = io.Custom("LIKENESS_ID_ADAPTER")


def register_ipadapter_folder() -> None:
    """models/ipadapter/, shared with ComfyUI_IPAdapter_plus: keep its paths, add our extensions."""
    import folder_paths

    registered = folder_paths.folder_names_and_paths.get(IPADAPTER_FOLDER)
    if registered is None:
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = (
            [os.path.join(folder_paths.models_dir, IPADAPTER_FOLDER)], set(ADAPTER_EXTENSIONS))
    elif not ADAPTER_EXTENSIONS <= set(registered[1]):
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = (registered[0],
                                                                 set(registered[1]) | ADAPTER_EXTENSIONS)


def adapter_files() -> list[str]:
    import folder_paths

    register_ipadapter_folder()
    return sorted(name for name in folder_paths.get_filename_list(IPADAPTER_FOLDER)
                  if os.path.splitext(name)[1].lower() in ADAPTER_EXTENSIONS)


class IDAdapterLoader(io.ComfyNode):
    """The identity stream's weights: FaceID-PlusV2's projection and image K/V per layer."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessIDAdapterLoader",
            display_name="Likeness ID Adapter Loader",
            category=CATEGORY,
            description="Loads the identity adapter of Infinite-ID: an IP-Adapter FaceID-PlusV2 file for SD1.5 "
                        "or SDXL (ArcFace + CLIP ViT-H projection and image key/value projections), or one "
                        "saved by Likeness in the same layout. The file is checked key by key.",
            inputs=[
                io.Combo.Input("adapter_name", options=adapter_files(),
                               tooltip="A FaceID-PlusV2 .bin or .safetensors in models/ipadapter/ "
                                       "(ip-adapter-faceid-plusv2_sd15 or _sdxl from h94/IP-Adapter-FaceID); "
                                       "use the one made for your checkpoint's family."),
            ],
            outputs=[IDAdapterType.Output(display_name="id_adapter",
                                          tooltip="The identity adapter, for the Infinite-ID nodes.")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        import folder_paths

        from ..attention.id_adapter import load_id_adapter

        register_ipadapter_folder()
        path = folder_paths.get_full_path(IPADAPTER_FOLDER, adapter_name)
        require(path is not None, "adapter_name", adapter_name,
                f"a .safetensors or .bin file in models/{IPADAPTER_FOLDER}/ "
                f"(found: {', '.join(adapter_files()) or 'none'})")
        try:
            adapter = load_id_adapter(path)
        except ValueError as error:
            raise ValueError(f"adapter_name={adapter_name!r} cannot be used: {error}") from error
        return io.NodeOutput(adapter)


register_ipadapter_folder()

NODES = [IDAdapterLoader]
