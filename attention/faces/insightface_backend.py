"""insightface behind the face nodes: finding a pack, loading it, detecting, aligning, embedding.

insightface, onnxruntime and cv2 are imported only when a node runs. Only the
calls that insightface 0.7.3 and 2.x share are used: ``FaceAnalysis`` to load
and route a pack's ``*.onnx`` files, the detector's ``detect(img, input_size=)``,
the recogniser's ``get_feat`` and ``face_align.norm_crop``.

The crops a recogniser or IP-Adapter FaceID-PlusV2 reads are insightface's own
``norm_crop`` of the uint8 pixels (112 for ArcFace, as ``FaceAnalysis.get``
makes it; 224 for FaceID-PlusV2's CLIP image, as its model card makes it), so
the embedding and the CLIP input are bit for bit what those give. The face
image Face Crop returns (any size, padding) is our own warp with the same
ArcFace similarity transform.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The detector and recogniser file of each pack (the others in the zip,
# landmarks and gender/age, are not needed and not loaded).
PACKS = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
}
# Large faces (a close-up portrait) are missed at 640 and found at smaller sizes.
DETECTION_SIZES = (640, 512, 384, 256, 128)
DETECTION_THRESHOLD = 0.5
# The release each pack zip comes from (the links install.py and the README list too).
PACK_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/{name}.zip"
WHERE_TO_GET = PACK_URL + " (unzip it so the .onnx files sit directly in that folder)"

# ArcFace's 5 landmarks (eye centres, nose tip, mouth corners) in a 112×112 crop.
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                    (41.5493, 92.3655), (70.7299, 92.2041))


def insightface_roots() -> list[Path]:
    """Folders holding ``models/<pack>/``: a registered "insightface" entry
    (extra_model_paths.yaml) first, then ComfyUI's models/insightface."""
    import folder_paths

    registered = folder_paths.folder_names_and_paths.get("insightface", ([], set()))[0]
    roots: list[Path] = []
    for path in [*registered, os.path.join(folder_paths.models_dir, "insightface")]:
        if Path(path).resolve() not in [r.resolve() for r in roots]:
            roots.append(Path(path))
    return roots


def find_pack(name: str) -> Path:
    """The folder of pack ``name`` whose ``*.onnx`` sit directly in it, or a ValueError that says where."""
    detector, recogniser = PACKS.get(name, ("<detector>.onnx", "<recogniser>.onnx"))
    folders = [root / "models" / name for root in insightface_roots()]
    for folder in folders:
        if any(folder.glob("*.onnx")):
            return folder
    for folder in folders:
        nested = sorted({p.parent for p in folder.glob("*/*.onnx")})
        if nested:
            raise ValueError(
                f"model_name={name!r}: the insightface model files are in a nested folder {nested[0]}; "
                f"move its .onnx files up into {folder} ({detector}, {recogniser} directly in that folder).")
    raise ValueError(
        f"model_name={name!r}: insightface model not found. Expected {detector} and {recogniser} directly in "
        f"{folders[-1]}" + (f" (also looked in {', '.join(map(str, folders[:-1]))})" if len(folders) > 1 else "")
        + ". Get them from " + WHERE_TO_GET.format(name=name) + ".")


@dataclass(frozen=True)
class Face:
    """One detected face, in pixels of the image it was found in."""

    bbox: Any  # (4,) x1, y1, x2, y2
    kps: Any  # (5, 2) eye centres, nose tip, mouth corners
    score: float

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0) * max(self.bbox[3] - self.bbox[1], 0))


class FaceAnalyzer:
    """A loaded pack (the LIKENESS_FACE_ANALYSIS value): its detector and recogniser."""

    def __init__(self, name: str, provider: str, folder: Path, app) -> None:
        self.name, self.provider, self.folder, self.app = name, provider, folder, app
        self.detector = app.det_model
        self.recogniser = app.models["recognition"]

    def __repr__(self) -> str:
        return f"FaceAnalyzer({self.name!r}, {self.provider!r}, {str(self.folder)!r})"

    def detection_sizes(self) -> list[tuple[int, int]]:
        # A detector exported with a fixed input size takes only that size.
        shape = list(getattr(self.detector, "input_shape", None) or [])
        if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
            return [(shape[3], shape[2])]
        return [(s, s) for s in DETECTION_SIZES]

    def detect(self, image_bgr) -> tuple[list[Face], list[tuple[int, int]]]:
        """Faces, largest first, at the first detection size that finds any; and the sizes tried."""
        tried = []
        for size in self.detection_sizes():
            tried.append(size)
            bboxes, kpss = self.detector.detect(image_bgr, input_size=size, max_num=0)
            if len(bboxes) and kpss is None:
                raise ValueError(f"model_name={self.name!r}: the detector in {self.folder} gives no landmarks, "
                                 "which alignment needs; use the pack's own SCRFD *_bnkps / det_10g detector")
            if len(bboxes):
                faces = [Face(b[:4].copy(), k.copy(), float(b[4])) for b, k in zip(bboxes, kpss, strict=True)]
                # Stable: equal areas keep the detector's score order.
                return sorted(faces, key=lambda f: -f.area), tried
        return [], tried

    def gender(self, image_bgr, face: Face) -> str:
        """"man" or "woman", by the pack's gender-age model (genderage.onnx, in antelopev2 and buffalo_l)."""
        import numpy as np
        from insightface.app.common import Face as InsightFace

        model = self.app.models.get("genderage")
        if model is None:
            raise ValueError(f"model_name={self.name!r}: the pack in {self.folder} has no gender-age model "
                             "(genderage.onnx, part of antelopev2 and buffalo_l): unzip the whole pack there")
        found = InsightFace(bbox=np.asarray(face.bbox), kps=np.asarray(face.kps))
        gender, _ = model.get(image_bgr, found)
        return "man" if int(gender) == 1 else "woman"

    def recognition_size(self) -> int:
        return int(self.recogniser.input_size[0])

    @property
    def recognition_model(self) -> str:
        """The recognition network, by its file's name: w600k_r50 (buffalo_l), glintr100 (antelopev2)."""
        return Path(self.recogniser.model_file).stem

    def recognition_crop(self, image_bgr, face: Face):
        """The crop the recogniser reads: insightface's norm_crop at its input size (what ``get`` embeds)."""
        return norm_crop(image_bgr, face.kps, self.recognition_size())

    def embed(self, crop_bgr):
        """The L2-normed ArcFace embedding (512,) of a crop made by ``recognition_crop``."""
        import numpy as np

        feature = np.asarray(self.recogniser.get_feat(crop_bgr), dtype=np.float64).reshape(-1)
        return (feature / max(np.linalg.norm(feature), 1e-12)).astype(np.float32)


def load_analysis(name: str, provider: str) -> FaceAnalyzer:
    """Load pack ``name`` from ComfyUI's models folder on ``provider`` (a PROVIDERS key)."""
    folder = find_pack(name)
    import onnxruntime
    from insightface.app import FaceAnalysis

    available = onnxruntime.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted not in available:
        offered = [key for key, value in PROVIDERS.items() if value in available]
        raise ValueError(f"provider={provider!r} cannot be used: this onnxruntime offers {', '.join(offered)}. "
                         "For CUDA, run Likeness' install.py with ComfyUI's Python (it installs onnxruntime-gpu).")
    providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
    files = ", ".join(sorted(p.name for p in folder.glob("*.onnx")))
    detector, recogniser = PACKS.get(name, ("a detector", "a recogniser"))
    try:
        # An absolute folder as the name: insightface uses it as is and never downloads.
        app = FaceAnalysis(name=str(folder.resolve()), root=str(folder.parent.parent),
                           allowed_modules=["detection", "recognition", "genderage"], providers=providers)
    except AssertionError:
        raise ValueError(f"model_name={name!r}: no face detector among the files in {folder} ({files}); "
                         f"expected {detector} there. Get it from {WHERE_TO_GET.format(name=name)}.") from None
    if "recognition" not in app.models:
        raise ValueError(f"model_name={name!r}: no recognition model among the files in {folder} ({files}); "
                         f"expected {recogniser} there. Get it from {WHERE_TO_GET.format(name=name)}.")
    app.prepare(ctx_id=-1 if provider == "CPU" else 0, det_thresh=DETECTION_THRESHOLD, det_size=(640, 640))
    return FaceAnalyzer(name, provider, folder, app)


def similarity_transform(source, target):
    """The 2×3 least-squares similarity (Umeyama, no reflection) taking ``source`` points onto ``target``."""
    import numpy as np

    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    return np.hstack([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]])


def face_template(size: int, padding: float = 0.0):
    """ArcFace's landmark template for a ``size`` crop, zoomed out by ``1 + padding`` about the centre."""
    import numpy as np

    points = np.asarray(ARCFACE_TEMPLATE, np.float64) * (size / 112.0)
    return size / 2 + (points - size / 2) / (1.0 + padding)


def align(image, kps, size: int, padding: float = 0.0):
    """The face warped into a ``size``×``size`` crop (uint8 BGR or float RGB in, same out); outside is 0."""
    import cv2

    matrix = similarity_transform(kps, face_template(size, padding))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def norm_crop(image_bgr, kps, size: int):
    """insightface's ``face_align.norm_crop`` (uint8 in, uint8 out): the ArcFace template scaled to
    ``size``, fitted to ``kps`` by scikit-image's similarity estimate in the points' own precision."""
    import warnings

    import numpy as np
    from insightface.utils import face_align

    with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the estimate() norm_crop calls
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.norm_crop(image_bgr, landmark=np.asarray(kps), image_size=size)


def to_bgr_uint8(image):
    """One ComfyUI IMAGE (H, W, 3) float RGB in 0..1 → what insightface reads (H, W, 3) uint8 BGR."""
    import numpy as np
    import torch

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.cpu().numpy()[..., ::-1])


def box_mask(height: int, width: int, bbox):
    """(H, W) float32: 1 on the pixels whose centres lie in ``bbox``, 0 elsewhere."""
    import numpy as np

    mask = np.zeros((height, width), np.float32)
    x1, y1 = (max(int(np.ceil(v - 0.5)), 0) for v in bbox[:2])
    x2, y2 = (int(np.floor(v - 0.5)) + 1 for v in bbox[2:4])
    mask[y1:min(y2, height), x1:min(x2, width)] = 1.0
    return mask
