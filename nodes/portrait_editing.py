"""Portrait-editing nodes that need no MCDM: editing masks (DiffEdit-style),
mask-guided noise blending, pair generation on a double-width canvas, pair generation's prompts
(the portrait-editing supplement's recipe) and Save Pairs, the training folder LikenessTrainMCDM reads."""

from __future__ import annotations

import re

from comfy_api.latest import io

from ..attention.portrait_editing.editing_guiders import MaskGuidedCFGGuider, PairCFGGuider
from ..attention.portrait_editing.editing_math import NORMALISATIONS
from ..attention.shared.atomic_files import atomic_path
from .common import dataset_folder, require, require_mask, require_model_family

CATEGORY = "likeness/editing"


class LikenessMaskGuidedGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessMaskGuidedGuider",
            display_name="Likeness Mask-Guided Guider",
            category=CATEGORY,
            description="Mask-guided noise blending (Eq. 3): inside the mask the target prompt's guided "
                        "prediction, outside the source prompt's, every step; or a latent blend that keeps the "
                        "source image outside the mask. Use with SamplerCustomAdvanced on the noised input "
                        "(img2img).",
            inputs=[
                io.Model.Input("model", tooltip="Any SD1.5/SDXL model (an MCDM too)."),
                io.Conditioning.Input("target", tooltip="The edit's prompt p_b (applied inside the mask)."),
                io.Conditioning.Input("source", tooltip="The input's prompt p_a (kept outside the mask)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt for both sides' CFG."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale of both sides."),
                io.Mask.Input("mask", tooltip="Where to edit (1) and where to keep (0): Likeness Edit Mask, or "
                              "drawn by hand."),
                io.Combo.Input("mode", options=["noise", "latent"], default="noise",
                               tooltip="noise: blend the two predictions (the paper's Eq. 3). latent: outside "
                                       "the mask the prediction is the source latent, so the latent there stays the "
                                       "source noised to each step and ends as the source exactly (the released "
                                       "code blends with a reconstruction run's latents instead)."),
                io.Latent.Input("source_latent", optional=True,
                                tooltip="The input image's latent; needed by the latent mode."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, target, source, negative, cfg: float, mask, mode: str,
                source_latent=None) -> io.NodeOutput:
        require_model_family(model)
        require_mask(mask)
        if mode == "latent" and source_latent is None:
            raise ValueError("mode='latent' needs source_latent: connect the input image's latent "
                             "(or use mode='noise')")
        guider = MaskGuidedCFGGuider(model)
        guider.set_conds(target, source, negative)
        guider.set_cfg(cfg)
        guider.set_edit(mask, mode, None if source_latent is None else source_latent["samples"])
        return io.NodeOutput(guider)


class LikenessPairGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessPairGuider",
            display_name="Likeness Pair Guider",
            category=CATEGORY,
            description="Pair generation (Eq. 2, Composable Diffusion on a double-width canvas): the left half "
                        "follows the source prompt, the right half the target prompt, both tied together by a "
                        "shared prompt; the weighted sum is over the terms' guided noise predictions, so the "
                        "weights need not sum to 1. Use an EmptyLatentImage twice as wide as tall.",
            inputs=[
                io.Model.Input("model", tooltip="The model (with this pack's identity patches, if any)."),
                io.Conditioning.Input("shared", tooltip="Prompt p for the whole canvas (what both share)."),
                io.Conditioning.Input("source", tooltip="Prompt p_a of the left image."),
                io.Conditioning.Input("target", tooltip="Prompt p_b of the right image."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for every term's CFG."),
                io.Float.Input("s_d", default=0.1, min=0.0, max=2.0, step=0.01, tooltip="Weight s'_d of the "
                               "shared prompt (paper 0.1)."),
                io.Float.Input("s_a", default=0.9, min=0.0, max=2.0, step=0.01, tooltip="Weight s'_a of the "
                               "source prompt on the left half (paper 0.9)."),
                io.Float.Input("s_b", default=0.9, min=0.0, max=2.0, step=0.01, tooltip="Weight s'_b of the "
                               "target prompt on the right half (paper 0.9)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG of each term (7.5)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, shared, source, target, negative, s_d: float, s_a: float, s_b: float,
                cfg: float) -> io.NodeOutput:
        require_model_family(model)
        guider = PairCFGGuider(model)
        guider.set_conds(shared, source, target, negative)
        guider.set_cfg(cfg)
        guider.set_scales(s_d, s_a, s_b)
        return io.NodeOutput(guider)


class LikenessSplitPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessSplitPair",
            display_name="Likeness Split Pair",
            category=CATEGORY,
            description="Splits double-width pair images into the left (source) and right (target) images.",
            inputs=[io.Image.Input("pair", tooltip="Images twice as wide as tall, from the Pair Guider.")],
            outputs=[io.Image.Output(display_name="source", tooltip="Left halves."),
                     io.Image.Output(display_name="target", tooltip="Right halves.")],
        )

    @classmethod
    def execute(cls, pair) -> io.NodeOutput:
        width = pair.shape[2]
        if width % 2:
            raise ValueError(f"pair is {width} pixels wide: expected an even width (two images side by side)")
        return io.NodeOutput(pair[:, :, : width // 2], pair[:, :, width // 2:])


class LikenessEditMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessEditMask",
            display_name="Likeness Edit Mask",
            category=CATEGORY,
            description="Where an edit changes the image (Sec. 3.4, DiffEdit-style): the input noised to a strength "
                        "with N seeds, one denoising step under the source and the target prompt, mean |difference| "
                        "over seeds and channels, normalised, blurred and thresholded.",
            inputs=[
                io.Model.Input("model", tooltip="An MCDM or any SD1.5 checkpoint."),
                io.Latent.Input("latent", tooltip="The input image's latent."),
                io.Conditioning.Input("source", tooltip="Prompt describing the input (p_a)."),
                io.Conditioning.Input("target", tooltip="Prompt describing the edit (p_b)."),
                io.Int.Input("seeds", default=10, min=1, max=64, tooltip="How many noises to average (10)."),
                io.Float.Input("strength", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Noise level as a fraction of the schedule (0.5)."),
                io.Int.Input("blur", default=5, min=1, max=31, step=2, tooltip="Gaussian kernel size, odd (5)."),
                io.Float.Input("threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="λ: 0.2 for costumes, 0.35 for cartoon (the paper)."),
                io.Combo.Input("normalisation", options=list(NORMALISATIONS), default="min-max",
                               tooltip="min-max (the paper) or clamp at 3× the mean (the released code)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="First of the seeds."),
                io.Image.Input("image", optional=True,
                               tooltip="The picture the latent was encoded from, for the overlay output."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="1 where to edit, at the image's size."),
                     io.Image.Output(display_name="overlay", tooltip="The mask in red over the image (over grey "
                                     "without one): check it before editing.")],
        )

    @classmethod
    def execute(cls, model, latent: dict, source, target, seeds: int, strength: float, blur: int, threshold: float,
                normalisation: str, seed: int, image=None) -> io.NodeOutput:
        from ..attention.portrait_editing.editing_math import edit_mask, noise_differences, to_image_mask
        from ..attention.shared.token_masks import mask_overlay

        require_model_family(model)
        differences, _ = noise_differences(model, latent["samples"], source, target, seeds=seeds, strength=strength,
                                           seed=seed)
        mask = to_image_mask(edit_mask(differences, normalisation=normalisation, blur=blur, threshold=threshold),
                             latent["samples"])
        return io.NodeOutput(mask, mask_overlay(mask, image))


SOURCE_SUFFIX = ".source"  # <name>.source.png beside the target <name>.png
# The supplement's prompts: [X] man/woman from the identity photo, [Y] the source domain, [Z] the target.
SHARED_TEMPLATE = "the same [X] on the left and right"
SOURCE_TEMPLATE = "a [X], [Y]"
TARGET_TEMPLATE = "a [X], [Z]"


def fill_template(template: str, gender: str, source_domain: str, target_domain: str) -> str:
    return template.replace("[X]", gender).replace("[Y]", source_domain).replace("[Z]", target_domain)


class LikenessPairPrompts(io.ComfyNode):
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


class LikenessSavePairs(io.ComfyNode):
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


NODES = [LikenessMaskGuidedGuider, LikenessPairGuider, LikenessSplitPair, LikenessEditMask, LikenessPairPrompts,
         LikenessSavePairs]
