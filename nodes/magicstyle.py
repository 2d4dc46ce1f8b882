"""MagicStyle nodes: portrait stylisation after a reference style image.

CSDI: ``LikenessInvert`` the content (capture qkv) and the style (capture kv).
FFF: ``LikenessAdaINLatent`` of the two z_T, then a core KSamplerAdvanced
(euler, ddim_uniform, same steps, add_noise disabled) on the model patched
by ``LikenessFeatureFusionAttention``.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.magicstyle.ddim_inversion import (AUTO_PRECISION, CAPTURES, MODES, PRECISION_CHOICES, invert,
                                                   inversion_steps)
from ..attention.magicstyle.feature_bank import FeatureBank, merge_banks, model_fingerprint
from ..attention.magicstyle.ffa import PLACEMENTS, FeatureFusion, apply_ffa
from ..attention.shared.adain import adain_latent
from ..attention.shared.layer_table import (DIT_FAMILIES, DIT_LAYER_SETS, LAYER_SETS, attention_keys, attention_levels,
                                            diffusion_model_of, parse_blocks, select_keys)
from ..attention.shared.sigmas import SigmaRange, model_sampling_of
from .common import (FEATURES_FOLDER, Features, features_files, features_path, model_file_fingerprint, require,
                     require_mask, require_model_family)

CATEGORY = "likeness/magicstyle"
CACHED_LAYER_SETS = ("all", "decoder", "decoder_high_res", "double", "single")
LAYERS_TOOLTIP = ("all = every self-attention layer (MagicStyle; SD1.5 16, SDXL 70; on Flux.1 every joint "
                  "block, 19 double + 38 single; on SD3.5 every joint block); decoder = every "
                  "output block's (SD1.5 9, SDXL 36); decoder_high_res = the output blocks' at the latent's "
                  "full and half resolution, StyleID's set (SD1.5 output blocks 6-11; SDXL, which has no "
                  "attention at full resolution, output blocks 3-5); double / single = Flux's double- or "
                  "single-stream blocks (SD3.5's joint blocks are 'double'). No paper backs a DiT set: 'all' "
                  "is MagicStyle's own choice carried over (README, MagicStyle on Flux and SD3.5).")
BLOCKS_TOOLTIP = ("DiT only: a list of blocks instead of 'layers', e.g. 'd0, d5, s12' (d = double / SD3.5 "
                  "joint block, s = Flux single block). Empty = 'layers'.")


def chosen_keys(model, family: str, layers: str, blocks: str, among: list) -> list:
    """The layer keys a node acts on: a named set of ``among``, or (DiT) a block list."""
    if family in DIT_FAMILIES:
        require(layers in DIT_LAYER_SETS, "layers", layers, f"one of {', '.join(DIT_LAYER_SETS)} on a DiT")
        if blocks.strip():
            return [k for k in parse_blocks(blocks, attention_keys(diffusion_model_of(model))) if k in set(among)]
        return select_keys(list(among), layers)
    require(not blocks.strip(), "blocks", blocks, "an empty list on SD1.5/SDXL (use layers)")
    require(layers in LAYER_SETS, "layers", layers, f"one of {', '.join(LAYER_SETS)} on SD1.5/SDXL")
    return select_keys(list(among), layers, attention_levels(model))


class LikenessInvert(io.ComfyNode):
    """CSDI: deterministic DDIM inversion that keeps self-attention features."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessInvert",
            display_name="Likeness Invert (DDIM)",
            category=CATEGORY,
            description="DDIM-inverts latents through ComfyUI's own sampler (euler over flipped ddim_uniform "
                        "sigmas, cfg 1) and keeps the self-attention inputs of every step for Feature Fusion "
                        "Attention. Content and style may go through in one batch.",
            inputs=[
                io.Model.Input("model", tooltip="The model the stylised image will be sampled with."),
                io.Conditioning.Input("conditioning", tooltip="Prompt for the inversion; MagicStyle uses an "
                                      "empty prompt."),
                io.Latent.Input("latent", tooltip="VAE-encoded image(s) to invert: content, style, or both "
                                "in one batch."),
                io.Int.Input("steps", default=30, min=1, max=1000, tooltip="DDIM steps (MagicStyle: 30). Sample "
                             "with the same number of ddim_uniform steps."),
                io.Combo.Input("capture", options=list(CAPTURES), default="qkv",
                               tooltip="qkv for a content image, kv for a style image (the cache stores the "
                                       "layer inputs either way), none to only invert."),
                io.Combo.Input("layers", options=list(CACHED_LAYER_SETS), default="all",
                               tooltip=f"Self-attention layers to keep: {LAYERS_TOOLTIP} A subset can still be "
                                       "chosen when applying."),
                io.Combo.Input("cache_on", options=list(PLACEMENTS), default="auto",
                               tooltip="Where the features are while a sampler uses them (between prompts they "
                                       "rest in system memory): auto = on the GPU when they fit beside the loaded "
                                       "model, else streamed layer by layer; device = always on the GPU for the "
                                       "run; cpu = always streamed."),
                io.Combo.Input("precision", options=list(PRECISION_CHOICES), default=AUTO_PRECISION, optional=True,
                               tooltip="How the features are stored. MagicStyle caches full precision: fp16 keeps "
                                       "it (to fp16 rounding) and stores 40% of what fp16 Q, K, V would take; fp8 "
                                       "(e4m3, one scale per image and tensor) stores 20% and moves FFA's effect by "
                                       "2-3.5% (README, Memory). auto = fp16 where the fp16 cache of this inversion "
                                       "and one image beside it fits half of what ComfyUI has free for the run "
                                       "(cache_on=auto's rule), fp8 otherwise; the choice is logged."),
                io.String.Input("blocks", default="", optional=True, tooltip=BLOCKS_TOOLTIP),
                io.Combo.Input("mode", options=list(MODES), default="cache", optional=True,
                               tooltip="cache = keep the features of every chosen layer and step (the paper); "
                                       "recompute = keep only the inverted latents (a few MB) and "
                                       "recompute the features beside the image, in the same batch, at each step: "
                                       "for sizes whose cache would not fit (README, Memory)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="z_T: feed a sampler with add_noise disabled."),
                Features.Output(display_name="features"),
            ],
        )

    @classmethod
    def execute(cls, model, conditioning, latent: dict, steps: int, capture: str, layers: str,
                cache_on: str, precision: str = AUTO_PRECISION, blocks: str = "", mode: str = "cache") -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import latent_preview

        family = require_model_family(model, dit=True)
        keys = chosen_keys(model, family, layers, blocks, attention_keys(diffusion_model_of(model)))
        progress = latent_preview.prepare_callback(model, inversion_steps(model, steps))
        samples, bank = invert(model, conditioning, latent["samples"], steps, capture=capture, layers=keys,
                               storage_device=comfy.model_management.unet_offload_device(), precision=precision,
                               callback=progress, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, mode=mode)
        if bank is not None:
            bank.placement = cache_on
        out = {key: value for key, value in latent.items() if key not in ("samples", "noise_mask")}
        out["samples"] = samples
        return io.NodeOutput(out, bank)


class LikenessAdaINLatent(io.ComfyNode):
    """z_T^CS = AdaIN(z_T^C, z_T^S): the starting latent of MagicStyle's FFF."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessAdaINLatent",
            display_name="Likeness AdaIN Latent",
            category=CATEGORY,
            description="Gives each content latent the per-channel mean and standard deviation "
                        "(over height and width) of the style latent (MagicStyle Eq. 4).",
            inputs=[
                io.Latent.Input("content", tooltip="Inverted content latent(s), z_T^C."),
                io.Latent.Input("style", tooltip="Inverted style latent, z_T^S: one image, "
                                "or one per content image."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where to stylise: give it the mask Feature Fusion Attention gets. Inside "
                                      "(1) AdaIN(content, style); outside (0) the content's own z_T, bit for bit, "
                                      "so the start there is as without FFA; values in between blend. Any size, "
                                      "stretched onto the latent; one mask, or one per content image. Empty = "
                                      "the whole latent."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="AdaIN(content, style).")],
        )

    @classmethod
    def execute(cls, content: dict, style: dict, mask=None) -> io.NodeOutput:
        if mask is not None:
            require_mask(mask, purpose="where to stylise")
        samples = adain_latent(content["samples"], style["samples"], mask)
        out = {key: value for key, value in content.items() if key != "noise_mask"}
        out["samples"] = samples
        return io.NodeOutput(out)


class LikenessFeatureFusionAttention(io.ComfyNode):
    """FFA (Algorithm 1): Q = α·Q_c + β·Q_cur, K = [K_c; K_s], V = [AdaIN(V_c, V_s); V_s]."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFeatureFusionAttention",
            display_name="Likeness Feature Fusion Attention",
            category=CATEGORY,
            description="Patches the model's self-attention with MagicStyle's Feature Fusion Attention, "
                        "using the features cached while inverting the content and the style image.",
            inputs=[
                io.Model.Input("model", tooltip="The model the features were inverted with."),
                Features.Input("content", tooltip="Features of the content image(s) (capture qkv): one per "
                               "image in the batch you sample, or one for all."),
                Features.Input("style", tooltip="Features of the style image (capture kv)."),
                io.Float.Input("alpha", default=0.8, min=0.0, max=2.0, step=0.01,
                               tooltip="Weight of the content query Q_c (MagicStyle: 0.8; on Flux/SD3.5 the same "
                                       "default, carried over: no paper backs a DiT value)."),
                io.Float.Input("beta", default=0.2, min=0.0, max=2.0, step=0.01,
                               tooltip="Weight of the current query (MagicStyle: 0.2; DiT: carried over). Higher "
                                       "stylises more and keeps less of the content's detail."),
                io.Float.Input("temperature", default=1.0, min=0.1, max=5.0, step=0.05,
                               tooltip="Scales the attention logits (StyleID's temperature); 1 is the paper."),
                io.Combo.Input("layers", options=list(dict.fromkeys(LAYER_SETS + DIT_LAYER_SETS)), default="all",
                               tooltip=f"Layers to fuse, among those cached: {LAYERS_TOOLTIP} encoder: the "
                                       "input blocks'; middle: the middle block's."),
                io.Int.Input("style_index", default=0, min=0, max=4095,
                             tooltip="Which image of the style features to use."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fusion starts at this point of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fusion ends at this point of the schedule (1 = last step)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where to stylise (any size; stretched onto the latent). On each layer's "
                                      "grid, queries where the mask is above 0.5 get FFA; the others attend "
                                      "as without FFA. Empty = the whole image. SD1.5/SDXL only for now."),
                io.String.Input("blocks", default="", optional=True, tooltip=BLOCKS_TOOLTIP),
                io.Boolean.Input("keep_text_share", default=True, optional=True,
                                 tooltip="DiT only: count the text keys twice as FFA doubles the image keys, so the "
                                         "prompt keeps its share of joint attention (alpha 1, beta 0, style = content "
                                         "is then exactly the plain model). Off: K = [K_txt; K_c; K_s] as written."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, content: FeatureBank, style: FeatureBank, alpha: float, beta: float,
                temperature: float, layers: str, style_index: int, start_percent: float,
                end_percent: float, mask=None, blocks: str = "", keep_text_share: bool = True) -> io.NodeOutput:
        family = require_model_family(model, dit=True)
        require(mask is None or family not in DIT_FAMILIES, "mask", "a mask on a DiT",
                "no mask on Flux/SD3.5 (where-to-stylise masks are SD1.5/SDXL only for now)")
        if mask is not None:
            require_mask(mask, purpose="where to stylise")
            require(mask.dim() == 2 or mask.shape[0] == 1, "mask", f"a batch of {mask.shape[0]} masks",
                    "one mask, (H, W) or (1, H, W)")
            mask = mask.reshape(mask.shape[-2:]).float().clamp(0, 1)
        fingerprint = model_fingerprint(model)
        content.check_compatible(fingerprint=fingerprint, what="content features")
        style.check_compatible(fingerprint=fingerprint, latent_hw=tuple(content.latent_shape[-2:]),
                               sigmas=content.sigmas, what="style features")
        keys = [k for k in chosen_keys(model, family, layers, blocks, content.layers) if k in set(style.layers)]
        require(keys, "layers", layers, f"a set the features were cached for ({len(content.layers)} "
                f"content and {len(style.layers)} style layers)")
        sampling = model_sampling_of(model)
        sigma_range = SigmaRange.from_percent(sampling, start_percent, end_percent)
        if content.trajectory is not None or style.trajectory is not None:
            require(content.trajectory is not None and style.trajectory is not None, "style", "one side recompute",
                    "content and style both inverted with mode recompute, or both with cache")
            from ..attention.magicstyle.recompute import apply_recompute

            require(style_index < style.images, "style_index", style_index, f"below {style.images}")
            require(mask is None, "mask", "a mask", "no mask with features inverted in recompute mode (cache mode)")
            return io.NodeOutput(apply_recompute(
                model, content, style, style_index=style_index, layers=keys, alpha=alpha,
                beta=beta, temperature=temperature, sigma_range=sigma_range, keep_text_share=keep_text_share,
                dit=family in DIT_FAMILIES))
        fusion = FeatureFusion(content, style, style_index=style_index, alpha=alpha, beta=beta,
                               temperature=temperature, layers=keys,
                               sigma_range=SigmaRange.from_percent(sampling, start_percent, end_percent),
                               model_sampling=sampling, placement=content.placement, mask=mask)
        if family in DIT_FAMILIES:
            from ..attention.magicstyle.joint_ffa import apply_joint_ffa

            return io.NodeOutput(apply_joint_ffa(model, fusion, keep_text_share))
        return io.NodeOutput(apply_ffa(model, fusion))


class LikenessFeaturesFromBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessFeaturesFromBatch",
            display_name="Likeness Features From Batch",
            category=CATEGORY,
            description="Picks some images' features out of a batch inverted together (like the core "
                        "Latent From Batch), e.g. the content and the style of one batched inversion.",
            inputs=[
                Features.Input("features", tooltip="Features of a batch of images."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="First image to take."),
                io.Int.Input("length", default=1, min=1, max=4096, tooltip="How many images to take."),
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, features: FeatureBank, batch_index: int, length: int) -> io.NodeOutput:
        return io.NodeOutput(features.select(batch_index, length))


class LikenessMergeFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessMergeFeatures",
            display_name="Likeness Merge Features",
            category=CATEGORY,
            description="Joins the features of two inversions into one batch (same model, size and steps).",
            inputs=[Features.Input("first", tooltip="Features of the first image(s)."),
                    Features.Input("second", tooltip="Features appended after them.")],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, first: FeatureBank, second: FeatureBank) -> io.NodeOutput:
        return io.NodeOutput(merge_banks([first, second]))


class LikenessSaveFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessSaveFeatures",
            display_name="Likeness Save Features",
            category=CATEGORY,
            description=f"Saves inverted features as safetensors in models/{FEATURES_FOLDER}/ with the model "
                        "fingerprint, steps, sigmas, size and layers, to reuse a style without inverting again.",
            inputs=[
                Features.Input("features", tooltip="Features from Likeness Invert."),
                io.String.Input("filename_prefix", default="style",
                                tooltip=f"File name in models/{FEATURES_FOLDER}/; a counter is added."),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="The file written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, features: FeatureBank, filename_prefix: str) -> io.NodeOutput:
        from ..attention.magicstyle.feature_files import save_bank

        path = features_path(filename_prefix)
        save_bank(features, path)
        return io.NodeOutput(path.name, ui={"text": [path.name]})


class LikenessLoadFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessLoadFeatures",
            display_name="Likeness Load Features",
            category=CATEGORY,
            description=f"Loads features saved by Likeness Save Features from models/{FEATURES_FOLDER}/. "
                        "Feature Fusion Attention refuses them if they do not fit the model, size or steps.",
            inputs=[io.Combo.Input("file", options=features_files(),
                                   tooltip=f"A .safetensors file in models/{FEATURES_FOLDER}/ (not read while "
                                           "saved_file is connected)."),
                    io.String.Input("saved_file", optional=True, force_input=True,
                                    tooltip="Connect Likeness Save Features' file here to load what it saved in "
                                            "the same Run (it runs first): one Run inverts a style, saves it and "
                                            "applies it. Unconnected (or its node bypassed), 'file' is loaded.")],
            outputs=[Features.Output(display_name="features"),
                     io.Latent.Output(display_name="latent", tooltip="The inverted latent z_T saved with them "
                                      "(the style side of Likeness AdaIN Latent).")],
        )

    @classmethod
    def validate_inputs(cls, file: str, input_types: dict | None = None) -> bool | str:
        # input_types lists the linked inputs: with saved_file linked, 'file' is not read. Taking it
        # also hands the link's type check to this node.
        from .model_files import missing_file

        linked = (input_types or {}).get("saved_file")
        if linked is not None:
            return True if linked == "STRING" else f"saved_file: a {linked} is linked; expected a STRING (the file " \
                                                   "output of Likeness Save Features)"
        return missing_file(FEATURES_FOLDER, "file", file, features_files())

    @classmethod
    def fingerprint_inputs(cls, file: str, saved_file: str | None = None) -> tuple:
        return model_file_fingerprint(FEATURES_FOLDER, saved_file or file)

    @classmethod
    def execute(cls, file: str, saved_file: str | None = None) -> io.NodeOutput:
        import comfy.model_management

        from ..attention.magicstyle.feature_files import load_bank

        chosen = saved_file or file
        bank = load_bank(features_path(chosen, existing=True), device=comfy.model_management.unet_offload_device())
        require(bank.latent is not None, "saved_file" if saved_file else "file", chosen,
                "features saved with their latent (save them again)")
        return io.NodeOutput(bank, {"samples": bank.latent})


NODES = [LikenessInvert, LikenessAdaINLatent, LikenessFeatureFusionAttention, LikenessFeaturesFromBatch,
         LikenessMergeFeatures, LikenessSaveFeatures, LikenessLoadFeatures]
