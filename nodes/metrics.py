"""Evaluation nodes: CLIP-I and CLIP-T with open_clip, from a local checkpoint, as the papers
compute them; and the names the metrics go by in reports, the sweep grid and its plot.

Whose metric is whose: MagicStyle (Table I) reports CLIP-I on whole images and an ArcFace FaceSim,
both as 100·cos; Infinite-ID (supplement A.2) computes CLIP-I on the detected, aligned faces of the
generated and the identity image (Eq. 9) and CLIP-T of each image with its own prompt, as cos;
Face Fusion reports a "CLIP Score" (image ↔ prompt) of 100·cos (Table 2) and the identity as the
cosine distance 1 − cos of face-recognition embeddings (Table 1).

open_clip is imported when the node runs, and only ever given a file path:
a model name alone would make it download weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from comfy_api.latest import io

from ..attention.measuring.metrics import cosine_matrix, per_image, scaled
from .common import OPEN_CLIP_FOLDER, model_file_fingerprint, model_path, require
from .face_analysis import FaceAnalysisType

CATEGORY = "likeness/metrics"
PAIRINGS = ("every reference", "one per image")
CLIP_I_ON = ("whole image", "face crops")
CLIP_SCALES = ("cosine", "100 x cosine")
FACE_CROP_SIZE = 224  # insightface's norm_crop framing at 224, as FaceID-PlusV2 crops for its CLIP

PAIRING_TOOLTIP = ("every reference: each image against every reference (the mean) and the one prompt. one per "
                   "image: image i against reference i and against line i of the text, as Infinite-ID scores each "
                   "generated image with its own identity image and prompt.")


def metric_label(metric: str, scale: str = "cosine", clip_i_on: str = "whole image") -> str:
    """What a metric is and whose paper it follows, as reports, the sweep grid and its plot write it
    (ASCII and '·' only: the font the plots use has no × or minus sign)."""
    cos = {"cosine": "cos", "100 x cosine": "100·cos", "1 - cosine": "1 - cos"}[scale]
    if metric == "FaceSim":
        return {"cosine": "FaceSim: ArcFace cos (MagicStyle)",
                "100 x cosine": "FaceSim: 100·ArcFace cos (MagicStyle Table I)",
                "1 - cosine": "ID distance: 1 - ArcFace cos (Face Fusion Table 1)"}[scale]
    if metric == "CLIP-I":
        if clip_i_on == "face crops":
            return f"CLIP-I: {cos}, face crops (Infinite-ID Eq. 9)"
        return f"CLIP-I: {cos}, whole images (MagicStyle{' Table I' if scale != 'cosine' else ''})"
    if metric == "CLIP-T":
        return ("CLIP Score: 100·cos image-prompt (Face Fusion Table 2)" if scale == "100 x cosine"
                else "CLIP-T: cos image-prompt (Infinite-ID)")
    raise ValueError(f"metric={metric!r}: expected FaceSim, CLIP-I or CLIP-T")


def checkpoint_choices() -> list[str]:
    import folder_paths

    return sorted(f for f in folder_paths.get_filename_list(OPEN_CLIP_FOLDER) if not f.endswith(".json"))


@lru_cache(maxsize=2)
def load_open_clip(path: str, architecture: str, stamp: tuple = ()):
    """(model, preprocess, tokenizer). A <checkpoint stem>.json beside the file
    is an open_clip model config (for architectures open_clip does not list).
    ``stamp`` (the files' fingerprint) makes a replaced file load again."""
    import open_clip

    config = Path(path).with_suffix(".json")
    if config.exists():
        open_clip.add_model_config(str(config))
        architecture = config.stem
    require(architecture in open_clip.list_models(), "architecture", architecture,
            "an open_clip architecture name such as ViT-H-14 or ViT-B-32")
    model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=path, weights_only=True)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(architecture)


def checkpoint_fingerprint(checkpoint: str) -> tuple:
    """The checkpoint's and its .json config's fingerprint: a replaced file loads and scores again."""
    return model_file_fingerprint(OPEN_CLIP_FOLDER, checkpoint, str(Path(checkpoint).with_suffix(".json")))


def _pil_images(images):
    import numpy as np
    from PIL import Image

    # Rounded to the nearest 8-bit value, as the face nodes read pixels (k/255 in float comes back as k).
    return [Image.fromarray((image.detach().float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8))
            for image in images]


class LikenessCLIPScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessCLIPScore",
            display_name="Likeness CLIP Score",
            category=CATEGORY,
            description="CLIP-I (image ↔ reference image) and CLIP-T (image ↔ prompt): cosine similarities of "
                        f"open_clip embeddings, with a checkpoint from models/{OPEN_CLIP_FOLDER}/ (never downloaded). "
                        "CLIP-I on whole images is MagicStyle's (Table I); on face crops, Infinite-ID's (Eq. 9: "
                        "both images' detected, aligned faces). CLIP-T is Infinite-ID's; ×100 it is Face "
                        "Fusion's CLIP Score (Table 2). MagicStyle's and Face Fusion's tables print 100·cos.",
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_choices(),
                               tooltip=f"An open_clip checkpoint (.safetensors, .bin or .pt) in "
                                       f"models/{OPEN_CLIP_FOLDER}/."),
                io.String.Input("architecture", default="ViT-H-14",
                                tooltip="open_clip architecture of the checkpoint (ignored when a .json config "
                                        "with the checkpoint's name sits beside it)."),
                io.Image.Input("images", tooltip="Generated image(s) to score."),
                io.Image.Input("reference", optional=True, tooltip="Reference image(s) for CLIP-I."),
                io.String.Input("text", optional=True, default="", multiline=True,
                                tooltip="Prompt for CLIP-T (with pairing 'one per image': one prompt per line)."),
                io.Combo.Input("clip_i_on", options=list(CLIP_I_ON), default=CLIP_I_ON[0], optional=True,
                               tooltip="whole image: MagicStyle's CLIP-I. face crops: Infinite-ID's (Eq. 9), "
                                       "the largest face of each image and reference, aligned on its landmarks "
                                       f"({FACE_CROP_SIZE}×{FACE_CROP_SIZE}, insightface's norm_crop framing); "
                                       "needs 'analysis'. CLIP-T always sees the whole image."),
                FaceAnalysisType.Input("analysis", optional=True,
                                       tooltip="Likeness Face Analysis: finds the faces for CLIP-I on face crops."),
                io.Combo.Input("pairing", options=list(PAIRINGS), default=PAIRINGS[0], optional=True,
                               tooltip=PAIRING_TOOLTIP),
                io.Combo.Input("scale", options=list(CLIP_SCALES), default=CLIP_SCALES[0], optional=True,
                               tooltip="cosine: -1..1, as Infinite-ID reports. 100 x cosine: as MagicStyle's "
                                       "Table I (CLIP-I) and Face Fusion's Table 2 (CLIP Score) print them."),
            ],
            outputs=[io.Float.Output(display_name="clip_i", tooltip="Mean CLIP-I (0 without a reference)."),
                     io.Float.Output(display_name="clip_t", tooltip="Mean CLIP-T (0 without text)."),
                     io.String.Output(display_name="report", tooltip="Per-image scores, named as above.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str) -> bool | str:
        from .model_files import missing_file

        return missing_file(OPEN_CLIP_FOLDER, "checkpoint", checkpoint, checkpoint_choices())

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str, **_) -> tuple:
        return checkpoint_fingerprint(checkpoint)

    @classmethod
    def execute(cls, checkpoint: str, architecture: str, images, reference=None, text: str = "",
                clip_i_on: str = CLIP_I_ON[0], analysis=None, pairing: str = PAIRINGS[0],
                scale: str = CLIP_SCALES[0]) -> io.NodeOutput:
        scores = clip_scores(checkpoint, architecture, images, reference, text, clip_i_on=clip_i_on,
                             analysis=analysis, pairing=pairing, scale=scale)
        clip_i, clip_t = scores.means()
        return io.NodeOutput(0.0 if clip_i is None else clip_i, 0.0 if clip_t is None else clip_t,
                             "\n".join(scores.lines), ui={"text": scores.lines})


@dataclass
class CLIPScores:
    """Per image: CLIP-I and CLIP-T (None: not asked for), as ``scale`` reports them; a line each."""

    clip_i: list[float] | None
    clip_t: list[float] | None
    lines: list[str]

    def means(self) -> tuple[float | None, float | None]:
        mean = lambda values: None if values is None else sum(values) / len(values)  # noqa: E731
        return mean(self.clip_i), mean(self.clip_t)


def clip_scores(checkpoint: str, architecture: str, images, reference=None, text: str = "",
                input_name: str = "checkpoint", *, clip_i_on: str = CLIP_I_ON[0], analysis=None,
                pairing: str = PAIRINGS[0], scale: str = CLIP_SCALES[0]) -> CLIPScores:
    """CLIP-I of each image against ``reference`` (None without one) and CLIP-T against ``text``
    (None without it), as described in CLIP Score. Shared by CLIP Score and the sweep grid."""
    import torch

    require(clip_i_on in CLIP_I_ON, "clip_i_on", clip_i_on, " or ".join(CLIP_I_ON))
    require(pairing in PAIRINGS, "pairing", pairing, " or ".join(PAIRINGS))
    require(scale in CLIP_SCALES, "scale", scale, " or ".join(CLIP_SCALES))
    count, paired = images.shape[0], pairing == PAIRINGS[1]
    prompts = [line.strip() for line in text.splitlines() if line.strip()] if paired else [text]
    if paired and reference is not None:
        require(reference.shape[0] == count, "reference", f"{reference.shape[0]} image(s)",
                f"one reference per image ({count}) with pairing '{pairing}'")
    if paired and text:
        require(len(prompts) == count, "text", f"{len(prompts)} line(s)",
                f"one prompt per line, one per image ({count}), with pairing '{pairing}'")
    on_faces = clip_i_on == CLIP_I_ON[1] and reference is not None
    if on_faces:
        require(analysis is not None, "analysis", None,
                "a Likeness Face Analysis: CLIP-I on face crops finds the faces with it")
    path = model_path(OPEN_CLIP_FOLDER, input_name, checkpoint, f"a file in models/{OPEN_CLIP_FOLDER}/")
    model, preprocess, tokenizer = load_open_clip(path, architecture, checkpoint_fingerprint(checkpoint))
    with torch.no_grad():
        embed = lambda batch: model.encode_image(torch.stack([preprocess(p) for p in _pil_images(batch)]))  # noqa: E731
        clip_i = clip_t = None
        if reference is not None:
            generated, references = images, reference
            if on_faces:
                generated = face_crops(analysis, images, "images")
                references = face_crops(analysis, reference, "reference")
            clip_i = scaled(per_image(cosine_matrix(embed(generated), embed(references)), paired), scale).tolist()
        if text:
            text_features = model.encode_text(tokenizer(prompts))
            clip_t = scaled(per_image(cosine_matrix(embed(images), text_features), paired), scale).tolist()
    names = (metric_label("CLIP-I", scale, clip_i_on), metric_label("CLIP-T", scale))
    lines = [f"image {i}: " + "; ".join(f"{name} {'-' if values is None else f'{values[i]:.4f}'}"
                                         for name, values in zip(names, (clip_i, clip_t))) for i in range(count)]
    return CLIPScores(clip_i, clip_t, lines)


def face_crops(analysis, images, input_name: str):
    """The largest face of each image, aligned (what Infinite-ID's FA(·) hands its CLIP-I)."""
    from .face_analysis import crop_faces

    return crop_faces(analysis, images, 0, FACE_CROP_SIZE, 0.0, input_name=input_name)[0]


NODES = [LikenessCLIPScore]
