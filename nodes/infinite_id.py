"""Infinite-ID nodes (Wu et al., ECCV 2024): identity-preserved generation from face photos, and
LikenessTrainIDAdapter, its identity-enhanced training.

The identity stream's weights come in the IP-Adapter FaceID-PlusV2 layout
(``models/ipadapter/``), so the files users already have load as they are.
"""

from __future__ import annotations

import os

from comfy_api.latest import io

from ..attention.shared import recipes
from .common import (chosen_recipe, dataset_folder, files_fingerprint, image_file_tensor, model_file_fingerprint,
                     model_path, numbered_path, optimiser_inputs, require, require_mask, require_model_family,
                     trainer_outputs, training_progress)
from .face_analysis import FaceAnalysisType
from .model_files import join_problems, missing_file

CATEGORY = "likeness/infinite_id"
IPADAPTER_FOLDER = "ipadapter"
LORAS_FOLDER = "loras"
ADAPTER_EXTENSIONS = {".safetensors", ".bin"}
LORA_FROM_ADAPTER = "from the adapter file"
NO_LORA = "none"
IDENTITY_SUFFIX = ".id"  # <name>.id.png (identity image) beside <name>.png

IDAdapterType = io.Custom("LIKENESS_ID_ADAPTER")

# Identity mixing, named for what each computes (Infinite-ID A.7); the values are what the attention
# code calls them. Workflows saved before the rename hold "stack" / "mean": still accepted.
MIXING_LABELS = {"stack: weights as attention log-bias": "stack", "mean: weighted mean of tokens": "mean"}
ACCEPTED_MIXING = {**MIXING_LABELS, "stack": "stack", "mean": "mean"}
DEFAULT_MIXING = next(iter(MIXING_LABELS))


def require_recognition_model(id_adapter, analysis) -> None:
    """The analysis embeds faces with the recognition network the adapter was trained on, or a
    ValueError naming both and where to put the one the adapter needs."""
    from ..attention.faces.insightface_backend import PACK_URL

    wanted = id_adapter.face_recognition
    if analysis.recognition_model == wanted.model:
        return
    if wanted.pack:
        remedy = (f"Choose model_name '{wanted.pack}' in Likeness Face Analysis: unzip "
                  f"{PACK_URL.format(name=wanted.pack)} so its .onnx files sit directly in "
                  f"models/insightface/models/{wanted.pack}/")
    else:
        remedy = f"Load the insightface pack whose recognition model is {wanted.model}.onnx in Likeness Face Analysis"
    raise ValueError(
        f"analysis={analysis.name!r} cannot be used with id_adapter={id_adapter.source!r}: the analysis embeds faces "
        f"with {analysis.recognition_model} (insightface {analysis.name}), the adapter was trained on {wanted} "
        f"embeddings, another network's 512-d space its face mapper never saw. {remedy}.")


def register_ipadapter_folder() -> None:
    """models/ipadapter/, shared with ComfyUI_IPAdapter_plus: keep its paths, add our extensions."""
    import folder_paths

    registered = folder_paths.folder_names_and_paths.get(IPADAPTER_FOLDER)
    if registered is None:
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = (
            [os.path.join(folder_paths.models_dir, IPADAPTER_FOLDER)], set(ADAPTER_EXTENSIONS))
    elif not ADAPTER_EXTENSIONS <= set(registered[1]):
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = (registered[0],
                                                                 set(registered[1]) | ADAPTER_EXTENSIONS)


def adapter_files() -> list[str]:
    import folder_paths

    register_ipadapter_folder()
    return sorted(name for name in folder_paths.get_filename_list(IPADAPTER_FOLDER)
                  if os.path.splitext(name)[1].lower() in ADAPTER_EXTENSIONS)


def lora_files() -> list[str]:
    import folder_paths

    return sorted(folder_paths.get_filename_list(LORAS_FOLDER))


def companion_lora(adapter_name: str) -> str | None:
    """``<adapter>_lora.safetensors`` in models/loras/, as h94/IP-Adapter-FaceID names the LoRA it
    releases beside each adapter, if the user has it."""
    wanted = os.path.splitext(os.path.basename(adapter_name))[0] + "_lora.safetensors"
    return next((name for name in lora_files() if os.path.basename(name) == wanted), None)


class LikenessIDAdapterLoader(io.ComfyNode):
    """The identity stream's weights: FaceID-PlusV2's projection and image K/V per layer."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessIDAdapterLoader",
            display_name="Likeness ID Adapter Loader",
            category=CATEGORY,
            description="Loads the identity adapter of Infinite-ID: an IP-Adapter FaceID-PlusV2 file for SD1.5 "
                        "or SDXL (ArcFace + CLIP ViT-H projection and image key/value projections), or one "
                        "saved by Likeness in the same layout. The file is checked key by key.",
            inputs=[
                io.Combo.Input("adapter_name", options=adapter_files(),
                               tooltip="A FaceID-PlusV2 .bin or .safetensors in models/ipadapter/ "
                                       "(ip-adapter-faceid-plusv2_sd15 or _sdxl from h94/IP-Adapter-FaceID); "
                                       "use the one made for your checkpoint's family."),
                io.Combo.Input("lora", options=[LORA_FROM_ADAPTER, NO_LORA, *lora_files()],
                               default=LORA_FROM_ADAPTER, optional=True,
                               tooltip="FaceID's LoRA, applied to the identity stream only (the text stream "
                                       "stays the original model): the one the adapter .bin carries; where it "
                                       "has none, <adapter>_lora.safetensors from models/loras/ if present. "
                                       "Or a LoRA file chosen here, or none. Do not also load it with a LoRA "
                                       "loader: that would change the text stream too."),
            ],
            outputs=[IDAdapterType.Output(display_name="id_adapter",
                                          tooltip="The identity adapter, for the Infinite-ID nodes.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str, lora: str = LORA_FROM_ADAPTER) -> bool | str:
        register_ipadapter_folder()
        return join_problems(missing_file(IPADAPTER_FOLDER, "adapter_name", adapter_name, adapter_files()),
                             missing_file(LORAS_FOLDER, "lora", lora, lora_files(), (LORA_FROM_ADAPTER, NO_LORA)))

    @classmethod
    def fingerprint_inputs(cls, adapter_name: str, lora: str = LORA_FROM_ADAPTER) -> tuple:
        register_ipadapter_folder()
        loras = [lora] if lora not in (LORA_FROM_ADAPTER, NO_LORA) else [companion_lora(adapter_name)]
        return (model_file_fingerprint(IPADAPTER_FOLDER, adapter_name), model_file_fingerprint(LORAS_FOLDER, *loras))

    @classmethod
    def execute(cls, adapter_name: str, lora: str = LORA_FROM_ADAPTER) -> io.NodeOutput:
        from ..attention.infinite_id.id_adapter import load_id_adapter

        register_ipadapter_folder()
        path = model_path(IPADAPTER_FOLDER, "adapter_name", adapter_name,
                          f"a .safetensors or .bin file in models/{IPADAPTER_FOLDER}/ "
                          f"(found: {', '.join(adapter_files()) or 'none'})")
        try:
            adapter = load_id_adapter(path)
        except ValueError as error:
            raise ValueError(f"adapter_name={adapter_name!r} cannot be used: {error}") from error
        if lora == NO_LORA:
            return io.NodeOutput(adapter.with_lora(None, ""))
        if lora == LORA_FROM_ADAPTER:
            lora = None if adapter.lora else companion_lora(adapter_name)
            if lora is None:
                return io.NodeOutput(adapter)
        return io.NodeOutput(adapter.with_lora(load_lora_file(lora), lora))


def load_lora_file(name: str) -> dict:
    import comfy.utils

    path = model_path(LORAS_FOLDER, "lora", name, f"'{LORA_FROM_ADAPTER}', '{NO_LORA}' or a file in "
                      f"models/{LORAS_FOLDER}/ (found: {', '.join(lora_files()) or 'none'})")
    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as error:  # safetensors and torch raise their own types for damaged files
        raise ValueError(f"lora={name!r} cannot be read ({error}); the file may be truncated") from error


class LikenessInfiniteID(io.ComfyNode):
    """Identity stream + text stream: mixed attention, cross-attention merge, AdaIN-mean."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessInfiniteID",
            display_name="Likeness Infinite-ID",
            category=CATEGORY,
            description="Runs Infinite-ID's identity stream (image cross-attention on ArcFace + CLIP identity "
                        "tokens) beside the text stream on the same latent, with mixed self-attention (Eq. 5), "
                        "cross-attention merge (Eq. 6) and, for style prompts, AdaIN-mean (Eq. 7–8).",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; it is cloned, never changed."),
                IDAdapterType.Input("id_adapter", tooltip="From Likeness ID Adapter Loader (same family as "
                                    "the model: SD1.5 or SDXL)."),
                FaceAnalysisType.Input("analysis", tooltip="From Likeness Face Analysis: finds, aligns and "
                                       "embeds the reference faces."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H/14 image encoder (the one FaceID-PlusV2 "
                                    "was trained with)."),
                io.Image.Input("image", tooltip="Reference photo(s). Several images are several identities (or "
                               "views of one), mixed by mix_weights (paper A.7)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="0 = the text-only model exactly, 1 = the identity stream (the paper); "
                                       "the prediction is ε_text + weight·(ε_id − ε_text)."),
                io.Boolean.Input("mixed_attention", default=True,
                                 tooltip="Identity self-attention also attends to the text stream's keys and "
                                         "values (Eq. 5)."),
                io.Boolean.Input("cross_attention_merge", default=True,
                                 tooltip="Add the text cross-attention to the image cross-attention of the "
                                         "identity stream (Eq. 6)."),
                io.Boolean.Input("adain_mean", default=False,
                                 tooltip="Align identity keys/values to the text ones (Eq. 7–8): on for style "
                                         "prompts such as line art."),
                io.String.Input("mix_weights", default="",
                                tooltip="One weight per reference image, e.g. '0.7, 0.3'; empty = equal weights. "
                                        "What a weight does depends on mixing: a log-bias on that person's "
                                        "attention (stack) or the share of their tokens (mean)."),
                io.Combo.Input("mixing", options=list(MIXING_LABELS), default=DEFAULT_MIXING, optional=True,
                               tooltip="Several reference images. stack: the identity stream attends to all their "
                                       "tokens side by side (paper A.7, Fig. 13, with equal weights), reference "
                                       "r's attention logits shifted by log(w_r/Σw), so its share of the "
                                       "attention follows its weight and a weight of 0 removes it. mean: one set "
                                       "of tokens, Σ w_r·tokens_r / Σw, the linear interpolation between "
                                       "identities of Fig. 14."),
                io.Float.Input("lora_scale", default=1.0, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="Scale of FaceID's LoRA on the identity stream (1 as IP-Adapter FaceID "
                                       "runs it; 0 = no LoRA). The text stream never gets it."),
                io.Float.Input("shortcut_scale", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="FaceID-PlusV2's s_scale: weight of the CLIP (structure) path."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The identity stream acts from this point of the schedule."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The identity stream acts until this point of the schedule."),
                io.Mask.Input("mask", optional=True,
                              tooltip="This person's region (any size; stretched onto the latent). The "
                                      "prediction is the identity stream inside it and the text stream "
                                      "outside (blended by the mask), and only queries inside it attend to "
                                      "this person's tokens. Chain one node per person with separate masks "
                                      "to place several people. Empty = the whole image."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model.")],
        )

    @classmethod
    def validate_inputs(cls, mixing: str = DEFAULT_MIXING) -> bool | str:
        # Replaces ComfyUI's own list check for mixing, so that saved workflows' old values load.
        if mixing in ACCEPTED_MIXING:
            return True
        return f"mixing={mixing!r}: expected one of {', '.join(repr(m) for m in MIXING_LABELS)}"

    @classmethod
    def execute(cls, model, id_adapter, analysis, clip_vision, image, weight: float, mixed_attention: bool,
                cross_attention_merge: bool, adain_mean: bool, mix_weights: str, shortcut_scale: float,
                start_percent: float, end_percent: float, mixing: str = DEFAULT_MIXING,
                lora_scale: float = 1.0, mask=None) -> io.NodeOutput:
        from ..attention.infinite_id import identity_streams, identity_tokens
        from ..attention.shared.layer_table import attention_keys, diffusion_model_of
        from ..attention.shared.sigmas import SigmaRange, model_sampling_of
        from .face_analysis import faceid_inputs

        require_model_family(model)
        keys = attention_keys(diffusion_model_of(model))
        missing = [k for k in keys if k not in id_adapter.kv_weights]
        require(not missing and len(keys) == len(id_adapter.kv_weights), "id_adapter", id_adapter.kind,
                f"an adapter for this model's {len(keys)} cross-attention layers (it has "
                f"{len(id_adapter.kv_weights)}; SD1.5 adapters have 16, SDXL ones 70)")
        require_recognition_model(id_adapter, analysis)
        require(mixing in ACCEPTED_MIXING, "mixing", mixing, f"one of {', '.join(MIXING_LABELS)}")
        if mask is not None:
            require_mask(mask, purpose="where this person goes")
            require(mask.dim() == 2 or mask.shape[0] == 1, "mask", f"a batch of {mask.shape[0]} masks",
                    "one mask, (H, W) or (1, H, W): this person's region")
            mask = mask.reshape(mask.shape[-2:]).float().clamp(0, 1)
        weights = identity_tokens.parse_mix_weights(mix_weights, image.shape[0])
        faces, embeddings = faceid_inputs(analysis, image)
        hidden = clip_vision.encode_image(faces)["penultimate_hidden_states"]
        found = identity_tokens.identity_tokens(id_adapter, embeddings, hidden,
                                                identity_tokens.no_face_clip_hidden(clip_vision), weights,
                                                shortcut_scale, ACCEPTED_MIXING[mixing])
        try:
            lora = id_adapter.faceid_lora(model, lora_scale) if lora_scale > 0 else None
        except ValueError as error:
            raise ValueError(f"id_adapter={id_adapter.source!r} cannot be used with this model: {error}") from error
        sampling = model_sampling_of(model)
        settings = identity_streams.InfiniteID(
            tokens=found.tokens, uncond_tokens=found.uncond, token_bias=found.bias, lora=lora,
            kv=id_adapter.kv_weights, weight=weight,
            mixed_attention=mixed_attention, cross_attention_merge=cross_attention_merge, adain_mean=adain_mean,
            sigma_range=SigmaRange.from_percent(sampling, start_percent, end_percent), mask=mask)
        return io.NodeOutput(identity_streams.apply_infinite_id(model, settings, keys))


register_ipadapter_folder()



class LikenessTrainIDAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessTrainIDAdapter",
            display_name="Likeness Train ID Adapter",
            category=CATEGORY,
            description="Identity-enhanced training (Infinite-ID Sec. 3.2): trains the face mapper, the CLIP mapper "
                        "and the image cross-attention with the UNet frozen and the text cross-attention off, on "
                        "pairs <name>.id.png (identity image) + <name>.png (another image of the same person). "
                        "It runs Likeness Infinite-ID's identity stream, FaceID's LoRA included (frozen, as the "
                        "adapter's loader chose it), and writes the FaceID-PlusV2 layout to models/ipadapter/ "
                        "with that LoRA, so sampling reads back what was trained.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (frozen)."),
                io.Clip.Input("clip", tooltip="Encodes an empty prompt (SDXL still needs its pooled vector)."),
                io.Vae.Input("vae", tooltip="Encodes the target images."),
                IDAdapterType.Input("id_adapter", tooltip="The adapter to start from (FaceID-PlusV2 or a "
                                    "Likeness-trained one)."),
                FaceAnalysisType.Input("analysis", tooltip="Aligns and embeds the identity images: the pack whose "
                                       "recognition model the adapter was trained with (buffalo_l for the public "
                                       "FaceID files); the file written records it."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H/14 image encoder."),
                io.String.Input("folder", default="id_adapter_dataset",
                                tooltip="Training folder, absolute or inside ComfyUI's input folder."),
                *optimiser_inputs("pairs", recipes.ID_ADAPTER_TRAINING),
                io.Float.Input("shortcut_scale", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="FaceID-PlusV2's s_scale during training."),
                io.Float.Input("lora_scale", default=1.0, min=0.0, max=2.0, step=0.05, optional=True,
                               tooltip="Scale of FaceID's LoRA during training, as Likeness Infinite-ID's "
                                       "lora_scale (0 = no LoRA). The file written carries the LoRA at this "
                                       "scale, so sample it at lora_scale 1."),
                io.Float.Input("identity_dropout", default=recipes.ID_ADAPTER_IDENTITY_DROPOUT, min=0.0, max=1.0,
                               step=0.01, optional=True,
                               tooltip="Share of the examples trained with the identity dropped for the 'no face' "
                                       "input (IP-Adapter's 5%), which sampling gives every uncond row."),
                io.String.Input("filename_prefix", default="infinite_id",
                                tooltip="File name in models/ipadapter/; a counter is added."),
            ],
            outputs=trainer_outputs("adapter"),
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> tuple:
        return files_fingerprint(dataset_folder(folder))

    @classmethod
    def execute(cls, model, clip, vae, id_adapter, analysis, clip_vision, folder: str, steps: int,
                learning_rate: float, seed: int, shortcut_scale: float, filename_prefix: str,
                weight_decay: float = recipes.ID_ADAPTER_TRAINING.weight_decay,
                max_grad_norm: float = recipes.ID_ADAPTER_TRAINING.max_grad_norm, batch_size: int = recipes.ID_ADAPTER_TRAINING.batch,
                lora_scale: float = 1.0,
                identity_dropout: float = recipes.ID_ADAPTER_IDENTITY_DROPOUT) -> io.NodeOutput:
        from ..attention.infinite_id.id_adapter import save_id_adapter
        from ..attention.infinite_id.id_adapter_training import train_id_adapter
        from ..attention.shared.training_loop import Batching

        require_model_family(model)
        recipe = chosen_recipe(recipes.ID_ADAPTER_TRAINING, learning_rate, weight_decay, max_grad_norm, batch_size)
        require(0 <= identity_dropout <= 1, "identity_dropout", identity_dropout, "a share between 0 and 1")
        try:  # the LoRA the identity stream trains with, checked before any pair is read
            id_adapter.faceid_lora(model, lora_scale)
        except ValueError as error:
            raise ValueError(f"id_adapter={id_adapter.source!r} cannot be used with this model: {error}") from error
        require_recognition_model(id_adapter, analysis)
        reader = IDPairReader(dataset_folder(folder), model, clip, vae, analysis, clip_vision)
        pairs = [reader[index] for index in range(len(reader))]
        progress = training_progress(steps)
        trained, before, after = train_id_adapter(
            model, id_adapter, pairs, steps=steps, seed=seed, no_face_hidden=reader.no_face_hidden, recipe=recipe,
            scale=shortcut_scale, lora_scale=lora_scale, identity_dropout=identity_dropout, on_step=progress,
            batching=Batching(recipe.batch))
        register_ipadapter_folder()
        path = numbered_path(IPADAPTER_FOLDER, filename_prefix)
        save_id_adapter(trained, path)
        curve = progress.curve(before, after, f"ID adapter training: {path.name}")
        return io.NodeOutput(path.name, before, after, curve,
                             ui={"text": [f"{path.name}: loss {before:.4f} → {after:.4f}"]})


class IDPairReader:
    """An identity training folder as pairs, each read and encoded (target latent, ArcFace embedding
    and CLIP hidden states of the identity image's aligned face) when first asked: the node asks for
    all of them, jobs/train.py only for those its process draws."""

    def __init__(self, folder, model, clip, vae, analysis, clip_vision):
        import torch

        from ..attention.infinite_id.identity_tokens import no_face_clip_hidden
        from ..attention.shared.training_folders import find_examples

        self.model, self.vae, self.analysis, self.clip_vision = model, vae, analysis, clip_vision
        self.examples = find_examples(folder, IDENTITY_SUFFIX)
        with torch.no_grad():
            self.empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        self.no_face_hidden = no_face_clip_hidden(clip_vision)  # what a dropped identity is read from

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        import torch

        from ..attention.infinite_id.id_adapter_training import IdentityPair
        from .face_analysis import faceid_inputs

        example = self.examples[index]
        with torch.no_grad():  # jobs/train.py reads pairs inside the training loop: no graph through the encoders
            faces, embeddings = faceid_inputs(self.analysis, image_file_tensor(example.face))
            hidden = self.clip_vision.encode_image(faces)["penultimate_hidden_states"]
            target = self.model.model.process_latent_in(self.vae.encode(image_file_tensor(example.image)))
        return IdentityPair(target, embeddings, hidden, self.empty)


NODES = [LikenessIDAdapterLoader, LikenessInfiniteID, LikenessTrainIDAdapter]
