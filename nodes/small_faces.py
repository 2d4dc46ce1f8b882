"""Small faces (MagicStyle with MagicID's DIIR): crop a face's region at the model's native size,
restore it there (invert, FFA, sampler: the ordinary nodes), and paste it back.

``LikenessFaceRegionCrop`` finds the face with the pack's detector (as Likeness Face Crop) and
returns the square crop, the region it came from and its feathered mask; ``LikenessPasteBack``
blends the restored crop into the full (stylised) image under that mask.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.faces.insightface_backend import FaceAnalyzer
from ..attention.magicstyle.face_region import FaceRegion, crop_regions, paste_back_batch, square_box
from .face_analysis import FaceAnalysisType, _largest_faces

CATEGORY = "likeness/face"

# A tuple of attention.magicstyle.face_region.FaceRegion, one per image of the batch it was cut from.
FaceRegionType = io.Custom("LIKENESS_FACE_REGION")


class LikenessFaceRegionCrop(io.ComfyNode):
    """The face's square region, resized to the model's native size, and how to put it back."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFaceRegionCrop",
            display_name="Likeness Face Region Crop",
            category=CATEGORY,
            description="For faces that fill a small part of the photo: the detected face's box grown by the "
                        "margin and made square (shifted inside at the image's borders), resized to the model's "
                        "native size so the face is restored at full resolution; Likeness Paste Back puts it back.",
            inputs=[
                FaceAnalysisType.Input("analysis", tooltip="From Likeness Face Analysis."),
                io.Image.Input("image", tooltip="The original photo(s); each image of a batch gives one region."),
                io.Int.Input("index", default=0, min=0, max=63,
                             tooltip="Which face when there are several: 0 is the largest, 1 the next, ... "
                                     "Chain a crop, restoration and paste-back per face to restore several."),
                io.Float.Input("margin", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="The square's side is the face box's longer side × (1 + margin): 1.0 "
                                       "doubles it (hair, neck and some background for the model to work with)."),
                io.Int.Input("size", default=512, min=64, max=4096, step=8,
                             tooltip="Side of the crop: the model's native size, 512 for SD1.5, 1024 for SDXL."),
                io.Int.Input("feather", default=16, min=0, max=512,
                             tooltip="Width in image pixels of the mask's soft edge, inside the square (0: a hard "
                                     "edge). Capped at half the square so its centre is always fully restored."),
            ],
            outputs=[
                io.Image.Output(display_name="crop", tooltip="The face region, size × size."),
                FaceRegionType.Output(display_name="region", tooltip="Where the crop came from (box, source "
                                      "size, scale, feather): for Likeness Paste Back."),
                io.Mask.Output(display_name="mask", tooltip="The feathered mask in the full image: 0 outside the "
                               "square, ramping up to 1 inside it."),
            ],
        )

    @classmethod
    def execute(cls, analysis: FaceAnalyzer, image, index: int, margin: float, size: int,
                feather: int) -> io.NodeOutput:
        height, width = int(image.shape[1]), int(image.shape[2])
        regions = []
        for i, (_, found) in enumerate(_largest_faces(analysis, image, "image")):
            if index >= len(found):
                raise ValueError(f"index={index} cannot be used: image {i} has {len(found)} face(s); expected "
                                 f"0..{len(found) - 1} (0 = the largest face)")
            box = square_box(found[index].bbox, margin, height, width)
            regions.append(FaceRegion(box, (height, width), size, float(feather)))
        crops, masks = crop_regions(image, regions)
        return io.NodeOutput(crops, tuple(regions), masks)


class LikenessPasteBack(io.ComfyNode):
    """The restored crop resized back onto its region and blended under the feathered mask."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessPasteBack",
            display_name="Likeness Paste Back",
            category=CATEGORY,
            description="Resizes the restored crop back onto the region Likeness Face Region Crop cut it from and "
                        "blends it in under the feathered mask; where the mask is 0 the image is unchanged, bit "
                        "for bit. Chain one per face to restore several.",
            inputs=[
                io.Image.Input("image", tooltip="The full image to paste into (e.g. the stylised photo). The same "
                               "size as the photo the region was cut from, that size scaled, or VAE Encode's crop "
                               "of it to a multiple of 8."),
                io.Image.Input("restored", tooltip="The restored crop (any size: it is resized onto the region)."),
                FaceRegionType.Input("region", tooltip="From Likeness Face Region Crop."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, image, restored, region: tuple[FaceRegion, ...]) -> io.NodeOutput:
        return io.NodeOutput(paste_back_batch(image, restored, list(region)))


NODES = [LikenessFaceRegionCrop, LikenessPasteBack]
