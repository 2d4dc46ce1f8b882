"""What the node families share: custom types, model folders, input checks."""

from __future__ import annotations

import os
import re
from pathlib import Path

from comfy_api.latest import io

# Cached MagicStyle features (LikenessSaveFeatures / LikenessLoadFeatures).
Features = io.Custom("LIKENESS_FEATURES")

FEATURES_FOLDER = "likeness_features"
LIKENESS_FOLDER = "likeness"
OPEN_CLIP_FOLDER = "open_clip"


def register_model_folders() -> None:
    """Tell ComfyUI about Likeness' model folders (also honoured by extra_model_paths.yaml)."""
    import folder_paths

    for name, extensions in ((FEATURES_FOLDER, {".safetensors"}),
                             (LIKENESS_FOLDER, {".safetensors", ".pth", ".bin"}),
                             (OPEN_CLIP_FOLDER, {".safetensors", ".bin", ".pt", ".pth", ".json"})):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = (
                [os.path.join(folder_paths.models_dir, name)], extensions)


def files_fingerprint(*paths) -> tuple:
    """What ComfyUI's cache compares (fingerprint_inputs) for nodes that read files: each file's
    name, size and modification time, every file of a folder included, so adding an image to a
    training folder or replacing a model file runs the node again. A missing path is part of it."""
    entries = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in found:
            try:
                stat = file.stat()
                entries.append((str(file), stat.st_size, stat.st_mtime_ns))
            except OSError:
                entries.append((str(file), "missing"))
    return tuple(entries)


def model_file_fingerprint(folder_name: str, *names: str) -> tuple:
    """files_fingerprint of files chosen from a models folder ("none" and unknown names skipped)."""
    import folder_paths

    return files_fingerprint(*(folder_paths.get_full_path(folder_name, name) for name in names if name))


SUPPORTED_MODELS = ("an SD1.5- or SDXL-family model that predicts noise (eps): an SD1.5 or SDXL checkpoint, or one "
                    "fine-tuned from them")
SUPPORTED_WITH_DIT = ("an SD1.5- or SDXL-family model that predicts noise (eps), or a Flux.1 (dev or schnell) or "
                      "SD3.5 (MMDiT, flow) model: an SD1.5, SDXL, Flux.1 or SD3.5 file, or one fine-tuned from them")


def describe_model(model) -> str:
    """The model's family and prediction as ComfyUI loaded it, e.g. "SD3 (flow)"."""
    sampling = model.get_model_object("model_sampling")
    prediction = next((cls.__name__ for cls in type(sampling).__mro__
                       if cls.__module__ == "comfy.model_sampling" and cls.__name__.isupper()), type(sampling).__name__)
    prediction = {"EPS": "noise prediction", "V_PREDICTION": "v-prediction", "CONST": "flow",
                  "EDM": "EDM v-prediction", "X0": "x0 prediction"}.get(prediction, prediction.lower())
    config = getattr(model.model, "model_config", None)
    return f"{type(config).__name__ if config is not None else type(model.model).__name__} ({prediction})"


def require_model_family(model, input_name: str = "model", *, image_channels: int | None = None,
                         dit: bool = False) -> str:
    """Refuse, by name and before any sampling, a model Likeness' methods are not defined for:
    another architecture, another prediction (v-prediction; flow outside Flux.1/SD3.5), or an
    MCDM-only input given a plain model (``image_channels``: the UNet's input channels the node
    needs). ``dit``: the node also runs Flux.1 and SD3.5 (MagicStyle, training-free Face Fusion).
    Returns the family (layer_table.FAMILIES)."""
    import comfy.model_sampling

    from ..attention.shared.layer_table import DIT_FAMILIES, family_of

    family = family_of(model)
    sampling = model.get_model_object("model_sampling")
    if dit and family in DIT_FAMILIES:
        flow = isinstance(sampling, comfy.model_sampling.CONST)
        require(flow, input_name, describe_model(model), SUPPORTED_WITH_DIT)
        return family
    eps = isinstance(sampling, comfy.model_sampling.EPS) and not isinstance(
        sampling, (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.IMG_TO_IMG, comfy.model_sampling.CONST))
    require(family in ("sd15", "sdxl") and eps, input_name, describe_model(model),
            SUPPORTED_WITH_DIT if dit else SUPPORTED_MODELS)
    if image_channels is not None:
        channels = model.model.diffusion_model.input_blocks[0][0].in_channels
        require(channels == image_channels, input_name, f"a UNet taking {channels} input channels",
                f"a UNet taking {image_channels} (an MCDM from Likeness MCDM Loader: noisy latent + input latent)")
    return family


def require_mask(mask, input_name: str = "mask", purpose: str = "where to edit") -> None:
    """A MASK that marks something: (H, W) or (B, H, W), not all zeros."""
    require(mask.dim() in (2, 3), input_name, f"a tensor of shape {tuple(mask.shape)}", "a MASK, (H, W) or (B, H, W)")
    require(bool((mask > 0).any()), input_name, "a mask of all 0", f"a mask with 1 {purpose}")


def require(condition, name: str, value, accepted: str) -> None:
    """A ValueError that names the input, its value and what would be accepted."""
    if not condition:
        raise ValueError(f"{name}={value!r} cannot be used: expected {accepted}")


def model_path(folder_name: str, input_name: str, name: str, accepted: str) -> str:
    """The full path of a file chosen from a models folder, or an error naming the input."""
    import folder_paths

    path = folder_paths.get_full_path(folder_name, name)
    require(path is not None, input_name, name, accepted)
    return path


def features_files() -> list[str]:
    import folder_paths

    return sorted(folder_paths.get_filename_list(FEATURES_FOLDER))


def features_path(name: str, existing: bool = False) -> Path:
    """The file to load (``existing``) or a new numbered file for a prefix."""
    if existing:
        return Path(model_path(FEATURES_FOLDER, "file", name, f"a .safetensors file in models/{FEATURES_FOLDER}/ "
                               f"(found: {', '.join(features_files()) or 'none'})"))
    return numbered_path(FEATURES_FOLDER, name)


def numbered_path(folder_name: str, prefix: str) -> Path:
    """``<prefix>_00001.safetensors`` (the next free number) in a models folder."""
    import folder_paths

    require(re.fullmatch(r"[\w\- .]+", prefix or "") and ".." not in prefix, "filename_prefix", prefix,
            "letters, digits, spaces, '-', '_' or '.' (no folders)")
    folder = Path(folder_paths.get_folder_paths(folder_name)[0])
    counter = 1
    while (folder / f"{prefix}_{counter:05d}.safetensors").exists():
        counter += 1
    return folder / f"{prefix}_{counter:05d}.safetensors"


def optimiser_inputs(examples: str, recipe) -> list:
    """steps, learning_rate, seed and (optional, for prompts saved before them) weight_decay,
    max_grad_norm, batch_size: every Likeness trainer's optimiser inputs, each defaulting to the
    trainer's recipe (attention/shared/recipes.py; README, Training recipes)."""
    return [
        io.Int.Input("steps", default=500, min=1, max=100000,
                     tooltip=f"Optimiser steps, each over batch_size {examples}."),
        io.Float.Input("learning_rate", default=recipe.learning_rate, min=1e-8, max=1e-1, step=1e-6,
                       tooltip="AdamW learning rate (default: the paper's or its closest reference's)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seeds the order, timesteps and noise."),
        io.Float.Input("weight_decay", default=recipe.weight_decay, min=0.0, max=1.0, step=1e-3, optional=True,
                       tooltip="AdamW's decoupled weight decay (default: the recipe's)."),
        io.Float.Input("max_grad_norm", default=recipe.max_grad_norm, min=0.0, max=1000.0, step=0.1, optional=True,
                       tooltip="The step's gradient is clipped to this global norm before AdamW; 0 = never "
                               "(default: the recipe's)."),
        io.Int.Input("batch_size", default=recipe.batch, min=1, max=1024, optional=True,
                     tooltip="Examples per optimiser step (default: the paper's per-GPU batch). They run one "
                             "at a time and their gradients add up, so memory is one example's."),
    ]


def chosen_recipe(recipe, learning_rate: float, weight_decay: float, max_grad_norm: float, batch_size: int):
    """The trainer's recipe with the node's inputs in it; a value outside its range is refused by name."""
    import dataclasses

    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay),
                        ("max_grad_norm", max_grad_norm)):
        require(value >= 0 and value == value, name, value, "a number of 0 or more")
    require(batch_size >= 1, "batch_size", batch_size, "1 or more examples per step")
    return dataclasses.replace(recipe, learning_rate=learning_rate, weight_decay=weight_decay,
                               max_grad_norm=max_grad_norm, batch=batch_size)


def trainer_outputs(what: str) -> list:
    return [io.String.Output(display_name="file", tooltip=f"The {what} file written."),
            io.Float.Output(display_name="loss_before", tooltip="Validation loss before training."),
            io.Float.Output(display_name="loss_after", tooltip="Validation loss after training."),
            io.Image.Output(display_name="loss_curve", tooltip="The training loss of every step, and the "
                            "validation loss before and after, as a plot.")]


class TrainingProgress:
    """on_step for the trainers: ComfyUI's progress bar, its interrupt between steps, and each
    step's loss for the loss curve."""

    def __init__(self, steps: int) -> None:
        import comfy.utils

        self.steps = steps
        self.losses: list[float] = []
        self._bar = comfy.utils.ProgressBar(steps)

    def __call__(self, step: int, loss: float) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.losses.append(float(loss))
        self._bar.update_absolute(step + 1, self.steps)

    def curve(self, before: float, after: float, title: str):
        from ..attention.measuring.plots import loss_curve

        return loss_curve(self.losses, before, after, title)


def training_progress(steps: int) -> TrainingProgress:
    return TrainingProgress(steps)


def image_file_tensor(path: Path):
    """A ComfyUI IMAGE (1, H, W, 3) in 0..1, cropped to multiples of 8 for the VAE."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = image.size
        image = image.crop((0, 0, width - width % 8, height - height % 8))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def dataset_folder(folder: str) -> Path:
    """A training folder: absolute, or inside ComfyUI's input folder."""
    import folder_paths

    path = Path(folder).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path
