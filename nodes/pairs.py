"""Pair generation's prompts (the portrait-editing supplement's recipe) and Save Pairs, the training
folder LikenessTrainMCDM reads."""

from __future__ import annotations

import re

from comfy_api.latest import io

from ..attention.atomic import atomic_path
from .common import dataset_folder, require

CATEGORY = "likeness/editing"
SOURCE_SUFFIX = ".source"  # <name>.source.png beside the target <name>.png
# The supplement's prompts: [X] man/woman from the identity photo, [Y] the source domain, [Z] the target.
SHARED_TEMPLATE = "the same [X] on the left and right"
SOURCE_TEMPLATE = "a [X], [Y]"
TARGET_TEMPLATE = "a [X], [Z]"


def fill_template(template: str, gender: str, source_domain: str, target_domain: str) -> str:
    return template.replace("[X]", gender).replace("[Y]", source_domain).replace("[Z]", target_domain)


class PairPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .face_analysis import FaceAnalysisType

        return io.Schema(
            node_id="LikenessPairPrompts",
            display_name="Likeness Pair Prompts",
            category=CATEGORY,
            # an output node: ComfyUI reports its text in /history even when the sampling after it
            # comes from the cache (jobs/make_pairs.py reads the prompts there)
            is_output_node=True,
            description="The portrait-editing paper's three prompts for a pair: 'the same [X] on the left and "
                        "right', 'a [X], [Y]', 'a [X], [Z]', with [X] man or woman as insightface's gender-age "
                        "model reads the identity photo, [Y] the source domain and [Z] the target domain.",
            inputs=[
                FaceAnalysisType.Input("analysis", tooltip="From Likeness Face Analysis (its pack's genderage.onnx "
                                       "reads the gender)."),
                io.Image.Input("image", tooltip="The identity photo; its largest face is read."),
                io.String.Input("source_domain", default="normal costume",
                                tooltip="[Y]: the source domain, e.g. 'normal costume' or 'neutral expression'."),
                io.String.Input("target_domain", default="Santa Claus costume",
                                tooltip="[Z]: the edit, e.g. 'Santa Claus costume', 'laughing'."),
                io.String.Input("shared_template", default=SHARED_TEMPLATE, optional=True,
                                tooltip="The shared prompt p ([X], [Y], [Z] are filled in)."),
                io.String.Input("source_template", default=SOURCE_TEMPLATE, optional=True,
                                tooltip="The source prompt p_a."),
                io.String.Input("target_template", default=TARGET_TEMPLATE, optional=True,
                                tooltip="The target prompt p_b."),
            ],
            outputs=[io.String.Output(display_name="shared", tooltip="p, for the whole canvas."),
                     io.String.Output(display_name="source", tooltip="p_a, the left image's prompt."),
                     io.String.Output(display_name="target", tooltip="p_b, the right image's prompt."),
                     io.String.Output(display_name="gender", tooltip="[X]: 'man' or 'woman'.")],
        )

    @classmethod
    def execute(cls, analysis, image, source_domain: str, target_domain: str, shared_template: str = SHARED_TEMPLATE,
                source_template: str = SOURCE_TEMPLATE, target_template: str = TARGET_TEMPLATE) -> io.NodeOutput:
        from .face_analysis import _largest_faces

        require(image.shape[0] == 1, "image", f"a batch of {image.shape[0]}", "one identity photo")
        ((pixels, faces),) = _largest_faces(analysis, image, "image")
        gender = analysis.gender(pixels, faces[0])
        prompts = [fill_template(t, gender, source_domain, target_domain)
                   for t in (shared_template, source_template, target_template)]
        return io.NodeOutput(*prompts, gender, ui={"text": [f"[X] = {gender}", *prompts]})


class SavePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessSavePairs",
            display_name="Likeness Save Pairs",
            category=CATEGORY,
            description="Saves source/target image pairs as a training folder for Likeness Train MCDM: <name>.png "
                        "(target), <name>.source.png (source), <name>.txt (the target prompt) and "
                        "<name>.source.txt (the source prompt). Numbers continue after existing pairs.",
            inputs=[
                io.Image.Input("source", tooltip="Left halves of the pair canvas (Likeness Split Pair)."),
                io.Image.Input("target", tooltip="Right halves: the edited images."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The target prompt p_b: the edit the MCDM learns (its text condition)."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="The source prompt p_a: Likeness Train MCDM's identity pairs (5%) learn "
                                        "source → source under it."),
                io.String.Input("folder", default="likeness_pairs",
                                tooltip="Dataset folder, absolute or inside ComfyUI's input folder (the trainer "
                                        "reads the same name)."),
                io.String.Input("filename_prefix", default="pair", tooltip="File name start; a counter is added."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The dataset folder written to.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, source, target, prompt: str, source_prompt: str, folder: str,
                filename_prefix: str) -> io.NodeOutput:
        import numpy as np
        from PIL import Image

        require(source.shape == target.shape, "target", f"images of shape {tuple(target.shape)}",
                f"the source's shape {tuple(source.shape)} (one target per source, same size)")
        require(re.fullmatch(r"[\w\- ]+", filename_prefix or ""), "filename_prefix", filename_prefix,
                "letters, digits, spaces, '-' or '_'")
        path = dataset_folder(folder)
        path.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for f in path.glob(f"{filename_prefix}_*.png")
                 if (m := re.fullmatch(rf"{re.escape(filename_prefix)}_(\d+)(?:\.source)?\.png", f.name))]
        counter = max(taken, default=0) + 1
        names = []
        for index in range(source.shape[0]):
            stem = f"{filename_prefix}_{counter + index:05d}"
            # Each file whole; the target .png last: a trainer sees a pair only once all four exist.
            for suffix, image, text in ((SOURCE_SUFFIX, source, source_prompt), ("", target, prompt)):
                with atomic_path(path / f"{stem}{suffix}.txt") as partial:
                    partial.write_text(text)
                pixels = (image[index, ..., :3].clamp(0, 1) * 255).round().byte()
                with atomic_path(path / f"{stem}{suffix}.png") as partial:
                    Image.fromarray(np.asarray(pixels.cpu())).save(partial, format="PNG")
            names.append(stem)
        return io.NodeOutput(str(path), ui={"text": [f"{len(names)} pairs in {path}: {', '.join(names)}"]})


NODES = [PairPrompts, SavePairs]
