"""Face analysis nodes: load an insightface pack, crop and embed faces, score likeness (FaceSim).

The pack's ``*.onnx`` files live in ``models/insightface/models/<name>/``;
nothing is downloaded. insightface loads only when a node runs.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.faces.insightface_backend import DETECTION_THRESHOLD, PACKS, PROVIDERS, FaceAnalyzer, load_analysis
from ..attention.measuring.metrics import SCALES

CATEGORY = "likeness/face"

FaceAnalysisType = io.Custom("LIKENESS_FACE_ANALYSIS")
# (N, 512) float32, each row L2-normed: one ArcFace embedding per image.
FaceEmbedding = io.Custom("LIKENESS_FACE_EMBEDDING")


def _largest_faces(analysis: FaceAnalyzer, images, input_name: str, on_missing: str = "error") -> list:
    """Per image of the batch: (uint8 BGR pixels, faces largest first); no face raises unless ``on_missing`` allows."""
    from ..attention.faces.insightface_backend import to_bgr_uint8

    found = []
    for i, image in enumerate(images):
        pixels = to_bgr_uint8(image)
        faces, tried = analysis.detect(pixels)
        if not faces and on_missing == "error":
            sizes = ", ".join(str(w) for w, _ in tried)
            raise ValueError(
                f"{input_name}: no face found in image {i} of the batch of {len(images)} "
                f"({pixels.shape[1]}×{pixels.shape[0]} px; {analysis.name} detector at threshold "
                f"{DETECTION_THRESHOLD}, detection sizes tried: {sizes}). Expected an image showing a face "
                "(frontal or three-quarter view, not covered); crop closer if the face is very small.")
        found.append((pixels, faces))
    return found


class LikenessFaceAnalysis(io.ComfyNode):
    """Loads an insightface pack (detector + ArcFace recogniser) for the face nodes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFaceAnalysis",
            display_name="Likeness Face Analysis (insightface)",
            category=CATEGORY,
            description="Loads an insightface model pack from models/insightface/models/<name>/ (the .onnx files "
                        "directly in that folder): its face detector and its ArcFace recognition model.",
            inputs=[
                io.Combo.Input("model_name", options=list(PACKS), default="buffalo_l",
                               tooltip="Which insightface pack; unzip it into models/insightface/models/<name>/. "
                                       "buffalo_l (recognition network w600k_r50): the one IP-Adapter FaceID-PlusV2 "
                                       "was trained with, so Likeness Infinite-ID, pair generation and Likeness "
                                       "Train ID Adapter need it for the public FaceID files (an adapter Likeness "
                                       "trained names its own in its metadata). antelopev2 (glintr100): InstantID's; "
                                       "its embeddings are not in w600k_r50's space, so FaceID adapters refuse it. "
                                       "Face Crop (Face Fusion's face image), Face Region Crop and Pair Prompts "
                                       "only detect and align (both packs have the same SCRFD-10GF detector and "
                                       "gender-age model): either pack. Face Similarity (FaceSim) scores with the "
                                       "chosen pack's network: compare scores from one pack only."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="CPU",
                               tooltip="Where onnxruntime runs the models. CUDA needs onnxruntime-gpu (install.py "
                                       "installs it where torch sees CUDA); CPU works everywhere."),
            ],
            outputs=[FaceAnalysisType.Output(display_name="analysis")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        from .model_files import missing_insightface_pack

        return missing_insightface_pack(model_name)

    @classmethod
    def fingerprint_inputs(cls, model_name: str, **_) -> tuple:
        from ..attention.faces.insightface_backend import insightface_roots
        from .common import files_fingerprint

        return files_fingerprint(*(root / "models" / model_name for root in insightface_roots()))

    @classmethod
    def execute(cls, model_name: str, provider: str) -> io.NodeOutput:
        return io.NodeOutput(load_analysis(model_name, provider))


class LikenessFaceCrop(io.ComfyNode):
    """One face per image: aligned crops, its box as a mask, and its ArcFace embedding."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFaceCrop",
            display_name="Likeness Face Crop",
            category=CATEGORY,
            description="Finds the faces in each image (retrying smaller detection sizes when none is found), "
                        "picks one, and aligns it on its 5 landmarks with ArcFace's similarity transform.",
            inputs=[
                FaceAnalysisType.Input("analysis", tooltip="From Likeness Face Analysis."),
                io.Image.Input("image", tooltip="Photo(s) of the person; each image of a batch gives one face."),
                io.Int.Input("index", default=0, min=0, max=63,
                             tooltip="Which face when there are several: 0 is the largest, 1 the next, ..."),
                io.Int.Input("crop_size", default=512, min=64, max=2048, step=8,
                             tooltip="Side of the aligned face image, e.g. 512 for an SD1.5 UNet, 1024 for SDXL."),
                io.Float.Input("padding", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Zooms out around the face: 0 is ArcFace's tight framing (as norm_crop and "
                                       "IP-Adapter FaceID-PlusV2), 0.5 shows 1.5× as much around it (hair, chin)."),
            ],
            outputs=[
                io.Image.Output(display_name="face", tooltip="The aligned face, crop_size × crop_size."),
                io.Image.Output(display_name="arcface_crop", tooltip="The 112×112 crop the embedding was "
                                "computed from (insightface's norm_crop alignment)."),
                io.Mask.Output(display_name="mask", tooltip="The face's detection box in the input image: "
                               "1 inside, 0 outside."),
                FaceEmbedding.Output(display_name="embedding", tooltip="ArcFace embedding, one L2-normed "
                                     "512-vector per image."),
            ],
        )

    @classmethod
    def execute(cls, analysis: FaceAnalyzer, image, index: int, crop_size: int, padding: float) -> io.NodeOutput:
        return io.NodeOutput(*crop_faces(analysis, image, index, crop_size, padding))


def crop_faces(analysis: FaceAnalyzer, image, index: int = 0, crop_size: int = 512, padding: float = 0.0, *,
               input_name: str = "image"):
    """Per image: the aligned face (B, S, S, 3), the ArcFace crop, the face box MASK and the
    L2-normed embedding (B, 512). Shared by Face Crop, the Infinite-ID node and CLIP-I on faces."""
    import numpy as np
    import torch

    from ..attention.faces.insightface_backend import align, box_mask

    faces, crops, arcface, masks, embeddings = _largest_faces(analysis, image, input_name), [], [], [], []
    for i, (pixels, found) in enumerate(faces):
        if index >= len(found):
            raise ValueError(f"index={index} cannot be used: image {i} has {len(found)} face(s); expected "
                             f"0..{len(found) - 1} (0 = the largest face)")
        face = found[index]
        rgb = image[i].detach().float().cpu().numpy()
        crops.append(align(np.ascontiguousarray(rgb), face.kps, crop_size, padding))
        rec_crop = analysis.recognition_crop(pixels, face)
        embeddings.append(analysis.embed(rec_crop))
        arcface.append(rec_crop[..., ::-1].astype(np.float32) / 255.0)
        masks.append(box_mask(pixels.shape[0], pixels.shape[1], face.bbox))

    def batch(arrays) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).float()

    return batch(crops).clamp(0, 1), batch(arcface), batch(masks), batch(embeddings)


# FaceID-PlusV2's CLIP image: its model card's face_align.norm_crop(image, landmark=kps, image_size=224).
FACEID_CLIP_CROP = 224


def faceid_inputs(analysis: FaceAnalyzer, image):
    """What IP-Adapter FaceID-PlusV2 reads of each image's largest face, as its model card makes it:
    the norm_crop at 224 for CLIP (B, 224, 224, 3) float RGB 0..1, and the L2-normed embedding
    (B, 512) of insightface's own 112 recognition crop. Shared by Infinite-ID and its trainer."""
    import numpy as np
    import torch

    from ..attention.faces.insightface_backend import norm_crop

    crops, embeddings = [], []
    for pixels, found in _largest_faces(analysis, image, "image"):
        crops.append(norm_crop(pixels, found[0].kps, FACEID_CLIP_CROP)[..., ::-1].astype(np.float32) / 255.0)
        embeddings.append(analysis.embed(analysis.recognition_crop(pixels, found[0])))
    return (torch.from_numpy(np.ascontiguousarray(np.stack(crops))),
            torch.from_numpy(np.ascontiguousarray(np.stack(embeddings))).float())


class LikenessFaceSimilarity(io.ComfyNode):
    """FaceSim of the papers: cosine similarity of ArcFace embeddings, reference vs generated."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from .metrics import PAIRINGS

        return io.Schema(
            node_id="LikenessFaceSimilarity",
            display_name="Likeness Face Similarity (FaceSim)",
            category=CATEGORY,
            description="Mean cosine similarity between the ArcFace embedding of the largest face in each "
                        "generated image and the reference face(s): MagicStyle's FaceSim (Table I, an ArcFace "
                        "recogniser, printed as 100·cos). Face Fusion reports the same embeddings' cosine "
                        "distance 1 − cos (Table 1); Infinite-ID the same formula with FaceNet (not offered).",
            inputs=[
                FaceAnalysisType.Input("analysis", tooltip="From Likeness Face Analysis."),
                io.Image.Input("reference", tooltip="Photo(s) of the person; several references are averaged "
                               "(each generated face is compared with every reference)."),
                io.Image.Input("images", tooltip="Generated image(s) to score; the largest face of each counts."),
                io.Combo.Input("no_face", options=["zero", "skip", "error"], default="zero",
                               tooltip="A generated image without a face: scores 0 (the likeness is lost), is "
                                       "left out of the mean, or stops the run with an error."),
                io.Combo.Input("pairing", options=list(PAIRINGS), default=PAIRINGS[0], optional=True,
                               tooltip="every reference: each generated face against every reference face (the "
                                       "mean). one per image: image i against reference i, as Infinite-ID scores "
                                       "each generated image with its own identity image."),
                io.Combo.Input("scale", options=list(SCALES), default="cosine", optional=True,
                               tooltip="cosine: -1..1 (1 = same face). 100 x cosine: as MagicStyle's Table I "
                                       "prints FaceSim. 1 - cosine: Face Fusion's cosine distance (Table 1; "
                                       "lower is closer; an image without a face counts as 1 under 'zero')."),
            ],
            outputs=[
                io.Float.Output(display_name="face_sim", tooltip="The mean, as 'scale' reports it."),
                io.String.Output(display_name="report", tooltip="One line per generated image."),
            ],
        )

    @classmethod
    def execute(cls, analysis: FaceAnalyzer, reference, images, no_face: str, pairing: str = "every reference",
                scale: str = "cosine") -> io.NodeOutput:
        mean, report, _ = face_similarity(analysis, reference, images, no_face, pairing=pairing, scale=scale)
        return io.NodeOutput(mean, report)


def face_similarity(analysis: FaceAnalyzer, reference, images, no_face: str = "zero", *,
                    pairing: str = "every reference", scale: str = "cosine") -> tuple[float, str, list]:
    """FaceSim: the mean over images of each image's largest face's ArcFace cosine against every
    reference face (or its own, pairing "one per image"), a report, and the per-image scores (None:
    left out), all as ``scale`` reports them. Shared by Face Similarity and the sweep grid."""
    import numpy as np
    import torch

    from ..attention.measuring.metrics import scaled
    from .common import require
    from .metrics import PAIRINGS, metric_label

    require(pairing in PAIRINGS, "pairing", pairing, " or ".join(PAIRINGS))
    require(scale in SCALES, "scale", scale, " or ".join(SCALES))
    paired = pairing == PAIRINGS[1]
    if paired:
        require(reference.shape[0] == images.shape[0], "reference", f"{reference.shape[0]} image(s)",
                f"one reference per image ({images.shape[0]}) with pairing '{pairing}'")

    def embedding(pixels, face):
        return analysis.embed(analysis.recognition_crop(pixels, face)).astype(np.float64)

    references = np.stack([embedding(p, faces[0]) for p, faces in _largest_faces(analysis, reference,
                                                                                    "reference")])
    as_scaled = lambda cosine: float(scaled(torch.tensor(cosine, dtype=torch.float64), scale))  # noqa: E731
    scores, lines = [], []
    for i, (pixels, faces) in enumerate(_largest_faces(analysis, images, "images", on_missing=no_face)):
        if not faces:
            lines.append(f"image {i}: no face" + (", counted as 0 (cosine)" if no_face == "zero" else ", left out"))
            scores.append(as_scaled(0.0) if no_face == "zero" else None)
            continue
        cosines = references @ embedding(pixels, faces[0])
        scores.append(as_scaled(cosines[i] if paired else cosines.mean()))
        x1, y1, x2, y2 = (int(round(v)) for v in faces[0].bbox)
        lines.append(f"image {i}: {scores[-1]:.4f} (face {x2 - x1}×{y2 - y1} px at {x1},{y1}; "
                     f"{len(faces)} face(s) found)")
    counted = [score for score in scores if score is not None]
    mean = float(np.mean(counted)) if counted else as_scaled(0.0)
    lines.append(f"{metric_label('FaceSim', scale)} ({analysis.name}, {len(references)} reference(s), "
                 f"{pairing}): {mean:.4f} over {len(counted)} of {len(images)} image(s)")
    return mean, "\n".join(lines), scores


NODES = [LikenessFaceAnalysis, LikenessFaceCrop, LikenessFaceSimilarity]
