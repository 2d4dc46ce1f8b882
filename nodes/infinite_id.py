"""Infinite-ID nodes (Wu et al., ECCV 2024): identity-preserved generation from face photos.

The identity stream's weights come in the IP-Adapter FaceID-PlusV2 layout
(``models/ipadapter/``), so the files users already have load as they are.
"""

from __future__ import annotations

import os

from comfy_api.latest import io

from .common import model_path, require
from .face_analysis import FaceAnalysisType

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

        from ..attention.id_adapter import load_id_adapter

        register_ipadapter_folder()
        path = model_path(IPADAPTER_FOLDER, "adapter_name", adapter_name,
                          f"a .safetensors or .bin file in models/{IPADAPTER_FOLDER}/ "
                          f"(found: {', '.join(adapter_files()) or 'none'})")
        try:
            adapter = load_id_adapter(path)
        except ValueError as error:
            raise ValueError(f"adapter_name={adapter_name!r} cannot be used: {error}") from error
        return io.NodeOutput(adapter)


class InfiniteID(io.ComfyNode):
    """Identity stream + text stream: mixed attention, cross-attention merge, AdaIN-mean."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessInfiniteID",
            display_name="Likeness Infinite-ID",
            category=CATEGORY,
            description="Runs Infinite-ID's identity stream (image cross-attention on ArcFace + CLIP identity "
                        "tokens) beside the text stream on the same latent, with mixed self-attention (Eq. 5), "
                        "cross-attention merge (Eq. 6) and, for style prompts, AdaIN-mean (Eq. 7–8).",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; it is cloned, never changed."),
                IDAdapterType.Input("id_adapter", tooltip="From Likeness ID Adapter Loader (same family as "
                                    "the model: SD1.5 or SDXL)."),
                FaceAnalysisType.Input("analysis", tooltip="From Likeness Face Analysis: finds, aligns and "
                                       "embeds the reference faces."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H/14 image encoder (the one FaceID-PlusV2 "
                                    "was trained with)."),
                io.Image.Input("image", tooltip="Reference photo(s). Several images are several identities (or "
                               "views of one), mixed by mix_weights (paper A.7)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="0 = the text-only model exactly, 1 = the identity stream (the paper); "
                                       "the prediction is ε_text + weight·(ε_id − ε_text)."),
                io.Boolean.Input("mixed_attention", default=True,
                                 tooltip="Identity self-attention also attends to the text stream's keys and "
                                         "values (Eq. 5)."),
                io.Boolean.Input("cross_attention_merge", default=True,
                                 tooltip="Add the text cross-attention to the image cross-attention of the "
                                         "identity stream (Eq. 6)."),
                io.Boolean.Input("adain_mean", default=False,
                                 tooltip="Align identity keys/values to the text ones (Eq. 7–8): on for style "
                                         "prompts such as line art."),
                io.String.Input("mix_weights", default="",
                                tooltip="One weight per reference image, e.g. '0.7, 0.3' to interpolate two "
                                        "people; empty = equal weights."),
                io.Float.Input("shortcut_scale", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="FaceID-PlusV2's s_scale: weight of the CLIP (structure) path."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The identity stream acts from this point of the schedule."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The identity stream acts until this point of the schedule."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model.")],
        )

    @classmethod
    def execute(cls, model, id_adapter, analysis, clip_vision, image, weight: float, mixed_attention: bool,
                cross_attention_merge: bool, adain_mean: bool, mix_weights: str, shortcut_scale: float,
                start_percent: float, end_percent: float) -> io.NodeOutput:
        import torch

        from ..attention import infinite_id
        from ..attention.schedule import SigmaRange, model_sampling_of
        from ..attention.unet_layers import attention_keys, diffusion_model_of
        from .face_analysis import crop_faces

        keys = attention_keys(diffusion_model_of(model))
        missing = [k for k in keys if k not in id_adapter.kv_weights]
        require(not missing and len(keys) == len(id_adapter.kv_weights), "id_adapter", id_adapter.kind,
                f"an adapter for this model's {len(keys)} cross-attention layers (it has "
                f"{len(id_adapter.kv_weights)}; SD1.5 adapters have 16, SDXL ones 70)")
        weights = infinite_id.parse_mix_weights(mix_weights, image.shape[0])
        # FaceID-PlusV2 reads CLIP from the aligned 224 face crop, ArcFace from its own 112 crop.
        faces, _, _, embeddings = crop_faces(analysis, image, crop_size=224)
        hidden = clip_vision.encode_image(faces)["penultimate_hidden_states"]
        empty = clip_vision.encode_image(torch.zeros_like(faces[:1]))["penultimate_hidden_states"]
        tokens, uncond = infinite_id.identity_tokens(id_adapter, embeddings, hidden, empty, weights, shortcut_scale)
        sampling = model_sampling_of(model)
        settings = infinite_id.InfiniteID(
            tokens=tokens, uncond_tokens=uncond, kv=id_adapter.kv_weights, weight=weight,
            mixed_attention=mixed_attention, cross_attention_merge=cross_attention_merge, adain_mean=adain_mean,
            sigma_range=SigmaRange.from_percent(sampling, start_percent, end_percent))
        return io.NodeOutput(infinite_id.apply_infinite_id(model, settings, keys))


register_ipadapter_folder()

NODES = [IDAdapterLoader, InfiniteID]
