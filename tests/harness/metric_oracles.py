"""The papers' metrics computed here, from insightface and open_clip called directly (never through
the pack): the expected values of tests/test_metrics_oracle.py and tests/test_sweep.py.

- FaceSim (MagicStyle; Face Fusion's distance is 1 − it): insightface's own ``FaceAnalysis.get`` on
  each photo (its detector, its norm_crop alignment, its recogniser), the largest face's
  ``normed_embedding``, cosines.
- CLIP-I / CLIP-T: open_clip's model built from its config, the checkpoint's weights loaded into
  it, open_clip's eval preprocess and tokenizer; cosines of the normalised embeddings. CLIP-I on face
  crops (Infinite-ID Eq. 9): the largest face that insightface finds, cut with its ``norm_crop`` at
  224 (FaceID-PlusV2's crop for its CLIP).

Photos are (H, W, 3) uint8 RGB arrays: exactly what a ComfyUI IMAGE of value k/255 holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def insightface_app(pack_folder: Path):
    """insightface's FaceAnalysis on a pack folder <root>/models/<name>/, loaded the usual way
    (``root`` and ``name``), on the CPU, detecting at 640 with threshold 0.5."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=pack_folder.name, root=str(pack_folder.parent.parent),
                       allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    return app


def largest_face(app, photo: np.ndarray):
    faces = app.get(np.ascontiguousarray(photo[..., ::-1]))
    assert faces, "insightface found no face"
    return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))


def face_cosines(app, photos: list[np.ndarray], references: list[np.ndarray]) -> np.ndarray:
    """(N, R): ArcFace cosine of each photo's largest face with each reference's."""
    mine = np.stack([largest_face(app, p).normed_embedding for p in photos]).astype(np.float64)
    theirs = np.stack([largest_face(app, r).normed_embedding for r in references]).astype(np.float64)
    return mine @ theirs.T


def face_crop(app, photo: np.ndarray, size: int = 224) -> np.ndarray:
    """The largest face, aligned by insightface's norm_crop at ``size``: uint8 RGB."""
    from insightface.utils import face_align

    face = largest_face(app, photo)
    return face_align.norm_crop(np.ascontiguousarray(photo[..., ::-1]), face.kps, image_size=size)[..., ::-1].copy()


class OpenCLIP:
    """open_clip's model for a checkpoint and its <stem>.json config, built and loaded here."""

    def __init__(self, checkpoint: Path):
        import open_clip
        import torch

        config = checkpoint.with_suffix(".json")
        open_clip.add_model_config(str(config))  # registered under the file's stem
        name = config.stem
        self.model = open_clip.create_model(name).eval()
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(checkpoint))
        else:
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        # CLIP's evaluation transform: resize, centre crop, CLIP's own normalisation.
        self.preprocess = open_clip.image_transform(self.model.visual.image_size, is_train=False,
                                                    mean=open_clip.OPENAI_DATASET_MEAN,
                                                    std=open_clip.OPENAI_DATASET_STD)
        self.tokenizer = open_clip.get_tokenizer(name)

    def images(self, photos: list[np.ndarray]):
        import torch
        from PIL import Image

        with torch.no_grad():
            batch = torch.stack([self.preprocess(Image.fromarray(p)) for p in photos])
            return torch.nn.functional.normalize(self.model.encode_image(batch).double(), dim=-1)

    def texts(self, prompts: list[str]):
        import torch

        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts)).double(), dim=-1)

    def image_cosines(self, photos, references) -> np.ndarray:
        return (self.images(photos) @ self.images(references).T).numpy()

    def text_cosines(self, photos, prompts) -> np.ndarray:
        return (self.images(photos) @ self.texts(prompts).T).numpy()
