"""Face Fusion's face pass: the reference faces through the same UNet at every step.

The image rows need the face rows' hidden states h_f only at the same layer,
and the face rows need nothing the image rows compute, so two ways give the
same h_f and the same picture:

* batched (the default where it applies): the face rows ride in the image's
  own model call, beside the cond/uncond rows ComfyUI built, each with its own
  timestep, the positive prompt and SDXL ``y``; at each fused cross-attention
  the face rows attend as the plain model and the image rows read K_f/V_f from
  the face rows of that layer (face_kv_attention.FaceFusionProcessor); the face
  rows' output is dropped. One more row per reference instead of a second call.
* separate: a UNet call of the faces just before the image's call, which then
  reads what it captured. Taken where batching does not apply: references of
  another size than the image, several sizes, another Likeness patch acting in
  the same call (FFA, Infinite-ID: they are designed for whole calls), a
  prompt of another token count, per-row extra inputs, face rows that do not
  fill whole cond/uncond chunks, or a batch that would not fit in free memory.

ComfyUI decides how many cond/uncond chunks one call holds from the model's
``memory_required``; Face Fusion counts its face rows there (an object patch
for the steps, a PREPARE_SAMPLING wrapper for the estimate made before the
model is loaded), so ComfyUI splits cond and uncond where the larger batch
would not fit.
"""

from __future__ import annotations

import logging

import torch

from ..shared.dispatch import PASS, Pass, other_likeness_processors, pass_of
from ..shared.extra_rows import control_for_rows, count_rows_in_estimate, fits, per_row_inputs, rows_counted
from ..shared.rows import COND, rows_of
from ..shared.sigmas import current_sigma
from .face_kv_attention import (FACE_PASS, FACE_ROWS, FACE_STATES, IMAGE_STREAM_KEYS, UNET, FaceFusion,
                                FaceFusionProcessor, FaceRows, Identity, face_input)

POSITIVE = "likeness_face_positive"  # the positive prompt's model conds (c_crossattn, y), for the face rows
FACE_MEMORY = "likeness_face_memory"  # this step's ExtraRowsMemory: whether the face rows fit in a call
OWNER = "face_fusion"  # whose rows the model's memory estimate counts
# Tests set this False to run the separate face call everywhere and compare the two paths.
BATCH_FACE_ROWS = True

log = logging.getLogger("likeness")


def positive_prompt(positive: list[dict] | None, sigma: torch.Tensor) -> dict | None:
    """The model conds (c_crossattn and, for SDXL, y) of the first positive conditioning that acts
    at ``sigma``, as the sampler processed them; None when there is none."""
    step = sigma.detach().flatten()[0]
    for entry in positive or []:
        # The same rule as comfy.samplers.get_area_and_mult (the bounds are sigmas).
        if ("timestep_start" in entry and step > entry["timestep_start"]
                or "timestep_end" in entry and step < entry["timestep_end"]):
            continue
        model_conds = entry.get("model_conds", {})
        if "c_crossattn" in model_conds:
            found = {"c_crossattn": model_conds["c_crossattn"].cond}
            if "y" in model_conds:
                found["y"] = model_conds["y"].cond
            return found
    return None


def _face_rows(fusion: FaceFusion):
    """Rows every model call gains: one per active reference, whatever the call holds."""
    return lambda rows: sum(i.latent.shape[0] for i in fusion.identities if i.weight > 0)


def per_step(fusion: FaceFusion):
    """CALC_COND_BATCH wrapper: every model call of this step carries the positive prompt, and
    ComfyUI's choice of how many cond/uncond chunks go into one call counts the face rows."""
    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        options = dict(model_options.get("transformer_options", {}))
        found = positive_prompt(conds[0] if conds else None, timestep)
        if found is not None:
            options[POSITIVE] = found
        with rows_counted(model, OWNER, _face_rows(fusion)) as memory:
            options[FACE_MEMORY] = memory
            return executor(model, conds, x_in, timestep, {**model_options, "transformer_options": options})
    return calc_cond_batch


def count_face_rows_in_estimate(fusion: FaceFusion):
    """PREPARE_SAMPLING wrapper: the memory ComfyUI frees before loading the model counts them too."""
    return count_rows_in_estimate(OWNER, lambda model: _face_rows(fusion))


def _rows_like(tensor: torch.Tensor | None, row: int, count: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor[row:row + 1].expand(count, *tensor.shape[1:])


def _face_groups(active: list[Identity]) -> list[list[Identity]]:
    """People whose references have one latent shape share a face call."""
    groups: dict[tuple[int, ...], list[Identity]] = {}
    for identity in active:
        groups.setdefault(tuple(identity.latent.shape[1:]), []).append(identity)
    return list(groups.values())


def _with_source_channels(faces: torch.Tensor, group: list[Identity], channels: int) -> torch.Tensor:
    """An editing model (MCDM, InstructPix2Pix) reads a source latent beside the noisy one: the face
    pass gives each reference its own latent there, as the model reads an unedited portrait."""
    extra = channels - faces.shape[1]
    if extra == 0:
        return faces
    sources = torch.cat([identity.latent for identity in group]).to(faces)
    if extra != sources.shape[1]:
        raise ValueError(f"the model takes {channels} input channels and the face latent has {faces.shape[1]}: "
                         f"expected a model of {faces.shape[1]} channels, or an editing model of "
                         f"{2 * faces.shape[1]} (noisy latent + source latent)")
    return torch.cat([faces, sources], 1)


class FaceFusionWrapper:
    """DIFFUSION_MODEL wrapper: the face rows in the image's call, or a face call before it."""

    def __init__(self, fusion: FaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigma = current_sigma(transformer_options)
        active = [i for i in self.fusion.identities if i.active(sigma)]
        # The faces fuse into the image only (Infinite-ID's identity stream reads them through the
        # text stream's K/V, Eq. 5): no face rows for any other pass.
        if not active or sigma is None or pass_of(transformer_options) is not Pass.IMAGE:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        context_f, y_f = self._prompt(context, y, transformer_options, x.shape[0])
        groups = []
        for group in _face_groups(active):
            inputs = [face_input(self.fusion.model_sampling, i.latent.to(x.device), i.noise.to(x.device), sigma,
                                 i.clean) for i in group]
            faces = _with_source_channels(torch.cat([face for face, _ in inputs]).to(x.dtype), group, x.shape[1])
            groups.append((group, faces, torch.cat([t for _, t in inputs]).to(timesteps)))
        reason = self._separate_because(groups, x, context, context_f, transformer_options, kwargs)
        self._report(reason)
        if reason is None:
            return self._batched(executor, x, timesteps, context, y, control, transformer_options, groups[0],
                                 context_f, y_f, **kwargs)
        return self._separate(executor, x, timesteps, context, y, control, transformer_options, groups,
                              context_f, y_f, **kwargs)

    def _separate(self, executor, x, timesteps, context, y, control, transformer_options, groups, context_f, y_f,
                  **kwargs):
        face_options = {key: value for key, value in transformer_options.items() if key not in IMAGE_STREAM_KEYS}
        face_options.update({"cond_or_uncond": [COND], UNET: executor.class_obj, PASS: Pass.FACE_REFERENCE})
        states = []
        for group, faces, face_timesteps in groups:
            count, captured = faces.shape[0], {}
            executor(faces, face_timesteps, _rows_like(context_f, 0, count), _rows_like(y_f, 0, count), None,
                     {**face_options, FACE_PASS: captured}, **kwargs)
            states += _states_of(group, captured)
        main_options = {**transformer_options, FACE_STATES: states, UNET: executor.class_obj}
        return executor(x, timesteps, context, y, control, main_options, **kwargs)

    def _batched(self, executor, x, timesteps, context, y, control, transformer_options, group_inputs, context_f,
                 y_f, **kwargs):
        group, faces, face_timesteps = group_inputs
        images, count, captured = x.shape[0], faces.shape[0], {}
        chunks = list(transformer_options["cond_or_uncond"])
        per_chunk = images // len(chunks)
        options = {**transformer_options, FACE_STATES: _states_of(group, captured), UNET: executor.class_obj,
                   FACE_ROWS: FaceRows(images, chunks, captured),
                   # Whole chunks of positive rows, so other packs that split the batch by chunk still can.
                   "cond_or_uncond": chunks + [COND] * (count // per_chunk)}
        out = executor(torch.cat([x, faces]), torch.cat([timesteps, face_timesteps]),
                       torch.cat([context, _rows_like(context_f, 0, count)]),
                       None if y is None else torch.cat([y, _rows_like(y_f, 0, count)]),
                       # Zeros for the face rows: a separate face call gets no control.
                       control_for_rows(control, lambda c: torch.cat([c, c.new_zeros((count, *c.shape[1:]))])),
                       options, **kwargs)
        return out[:images]

    def _separate_because(self, groups, x, context, context_f, transformer_options, kwargs) -> str | None:
        """Why this call's faces need a call of their own; None: they ride in the image's call."""
        if not BATCH_FACE_ROWS:
            return "batching turned off"
        if len(groups) > 1 or tuple(groups[0][1].shape[1:]) != tuple(x.shape[1:]):
            return "references of another size than the image"
        others = other_likeness_processors(transformer_options, lambda p: isinstance(p, FaceFusionProcessor))
        if others:
            return f"another Likeness patch acts in the same call ({', '.join(sorted(others))})"
        if context_f is None or tuple(context_f.shape[1:]) != tuple(context.shape[1:]):
            return "the positive prompt has another token count than this call's"
        if per_row_inputs(kwargs, x.shape[0]):
            return "the model call has per-row inputs of its own"
        chunks = transformer_options.get("cond_or_uncond") or []
        count = groups[0][1].shape[0]
        if not chunks or x.shape[0] % len(chunks) or count % (x.shape[0] // len(chunks)):
            return "the face rows do not fill whole cond/uncond chunks"
        if not fits(transformer_options.get(FACE_MEMORY), x, count):
            return "the larger batch would not fit in free memory"
        return None

    def _report(self, reason: str | None) -> None:
        if reason in self.fusion.reported:
            return
        self.fusion.reported.add(reason)
        if reason is None:
            log.info("Likeness Face Fusion: the face rows ride in the image's model call (one call per step)")
        else:
            log.info("Likeness Face Fusion: a separate face call each step (%s)", reason)

    @staticmethod
    def _prompt(context, y, transformer_options: dict, batch: int):
        """The face is read under the positive prompt (as in training), whichever rows this call holds."""
        positive = transformer_options.get(POSITIVE)
        if positive is not None:
            context_f = positive["c_crossattn"][:1].to(context)
            y_f = positive["y"][:1].to(y) if y is not None and "y" in positive else _rows_like(y, 0, 1)
            return context_f, y_f
        # Called outside a sampler's calc_cond_batch: a cond row of this call, if it has one.
        cond = rows_of(COND, transformer_options.get("cond_or_uncond", [COND]), batch)
        row = cond[0] if cond else 0
        return _rows_like(context, row, 1), _rows_like(y, row, 1)


def _states_of(group: list[Identity], captured: dict) -> list[tuple[Identity, dict, int]]:
    """(identity, the layers' captured h_f, its first reference's row among them) for each person."""
    states, start = [], 0
    for identity in group:
        states.append((identity, captured, start))
        start += identity.latent.shape[0]
    return states
