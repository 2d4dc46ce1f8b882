"""Evaluation nodes: CLIP-I and CLIP-T with open_clip, from a local checkpoint.

open_clip is imported when the node runs, and only ever given a file path:
a model name alone would make it download weights.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from comfy_api.latest import io

from ..attention.metrics import cosine_matrix
from .common import OPEN_CLIP_FOLDER, model_file_fingerprint, model_path, require

CATEGORY = "likeness/metrics"


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

    return [Image.fromarray((image.cpu().numpy() * 255).clip(0, 255).astype(np.uint8)) for image in images]


class CLIPScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessCLIPScore",
            display_name="Likeness CLIP Score",
            category=CATEGORY,
            description="CLIP-I (image ↔ reference image) and CLIP-T (image ↔ prompt) cosine similarities with an "
                        f"open_clip checkpoint from models/{OPEN_CLIP_FOLDER}/ (never downloaded).",
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_choices(),
                               tooltip=f"An open_clip checkpoint (.safetensors, .bin or .pt) in "
                                       f"models/{OPEN_CLIP_FOLDER}/."),
                io.String.Input("architecture", default="ViT-H-14",
                                tooltip="open_clip architecture of the checkpoint (ignored when a .json config "
                                        "with the checkpoint's name sits beside it)."),
                io.Image.Input("images", tooltip="Generated image(s) to score."),
                io.Image.Input("reference", optional=True, tooltip="Reference image for CLIP-I."),
                io.String.Input("text", optional=True, default="", multiline=True,
                                tooltip="Prompt for CLIP-T."),
            ],
            outputs=[io.Float.Output(display_name="clip_i", tooltip="Mean CLIP-I (0 without a reference)."),
                     io.Float.Output(display_name="clip_t", tooltip="Mean CLIP-T (0 without text)."),
                     io.String.Output(display_name="report", tooltip="Per-image scores.")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str, **_) -> tuple:
        return checkpoint_fingerprint(checkpoint)

    @classmethod
    def execute(cls, checkpoint: str, architecture: str, images, reference=None, text: str = "") -> io.NodeOutput:
        clip_i, clip_t, lines = clip_scores(checkpoint, architecture, images, reference, text)
        return io.NodeOutput(0.0 if clip_i is None else clip_i, 0.0 if clip_t is None else clip_t, "\n".join(lines),
                             ui={"text": lines})


def clip_scores(checkpoint: str, architecture: str, images, reference=None, text: str = "",
                input_name: str = "checkpoint") -> tuple[float | None, float | None, list[str]]:
    """Mean CLIP-I against ``reference`` (None without one), mean CLIP-T against ``text`` (None
    without it) and one report line per image. Shared by CLIP Score and the sweep grid."""
    import torch

    path = model_path(OPEN_CLIP_FOLDER, input_name, checkpoint, f"a file in models/{OPEN_CLIP_FOLDER}/")
    model, preprocess, tokenizer = load_open_clip(path, architecture, checkpoint_fingerprint(checkpoint))
    with torch.no_grad():
        embed = lambda batch: model.encode_image(torch.stack([preprocess(p) for p in _pil_images(batch)]))  # noqa: E731
        image_features = embed(images)
        clip_i = cosine_matrix(image_features, embed(reference)).mean(1) if reference is not None else None
        clip_t = cosine_matrix(image_features, model.encode_text(tokenizer([text])))[:, 0] if text else None
    lines = [f"image {i}: CLIP-I {'-' if clip_i is None else f'{clip_i[i]:.4f}'}, "
             f"CLIP-T {'-' if clip_t is None else f'{clip_t[i]:.4f}'}" for i in range(images.shape[0])]
    return (None if clip_i is None else float(clip_i.mean()), None if clip_t is None else float(clip_t.mean()),
            lines)


NODES = [CLIPScore]
