"""Portrait-editing nodes that need no MCDM: editing masks (DiffEdit-style),
mask-guided noise blending, pair generation on a double-width canvas."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.editing import NORMALISATIONS
from ..attention.guiders import MaskGuidedCFGGuider, PairCFGGuider
from .common import require_mask, require_model_family

CATEGORY = "likeness/editing"


class MaskGuidedGuider(io.ComfyNode):
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


class PairGuider(io.ComfyNode):
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


class SplitPair(io.ComfyNode):
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


class EditMask(io.ComfyNode):
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
        from ..attention.editing import edit_mask, noise_differences, to_image_mask
        from ..attention.masks import mask_overlay

        require_model_family(model)
        differences, _ = noise_differences(model, latent["samples"], source, target, seeds=seeds, strength=strength,
                                           seed=seed)
        mask = to_image_mask(edit_mask(differences, normalisation=normalisation, blur=blur, threshold=threshold),
                             latent["samples"])
        return io.NodeOutput(mask, mask_overlay(mask, image))


NODES = [MaskGuidedGuider, PairGuider, SplitPair, EditMask]
