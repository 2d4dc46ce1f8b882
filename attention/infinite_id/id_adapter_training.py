"""Infinite-ID's identity-enhanced training (Sec. 3.2, Eq. 3).

The face mapper, the CLIP mapper (the adapter's projection) and the image
cross-attention K/V are trained with the UNet frozen and the *text*
cross-attention switched off: every cross-attention sees only the identity
tokens of an identity image while the model denoises a different image of
the same person, so identity cannot leak in through the prompt.

The forward is sampling's own (rule 8): the identity stream of
attention/infinite_id/identity_streams.py with mixed attention, the merge and AdaIN-mean off
(what text off means there), FaceID's LoRA applied as Likeness Infinite-ID
applies it (frozen: Infinite-ID trains the mappers and the image
cross-attention only), and the file written carries that LoRA at the
loader's default scale. On a share of the steps (IP-Adapter's image dropout)
the identity is dropped for the "no face" input sampling gives every uncond
row: a zero ArcFace embedding and CLIP of a zero normalised image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..shared import recipes
from ..shared.dispatch import PASS, Pass
from ..shared.layer_table import BlockKey, attention_keys, diffusion_model_of
from ..shared.recipes import Recipe
from ..shared.sigmas import model_sampling_of
from ..shared.training_loop import (Batching, Resume, World, diffusion_loss, leave_inference_mode, normal_copy,
                                    optimise, shared, unwrapped)
from .identity_streams import WRAPPER_KEY, InfiniteID, apply_infinite_id
from .stream_calls import ACTIVE_IDENTITY, IDENTITY_STREAM


@dataclass
class IdentityPair:
    target: torch.Tensor  # model-space latent of the target image
    face_embed: torch.Tensor  # (1, 512) ArcFace of the identity image
    clip_hidden: torch.Tensor  # (1, T, clip) CLIP penultimate states of its aligned face
    cond: list  # an empty prompt: SDXL still needs its pooled/size vector


class IdentityStreamOnly:
    """DIFFUSION_MODEL wrapper for training: the identity stream's call alone. With mixed attention,
    the merge and AdaIN-mean off it reads nothing of the text stream, and at weight 1 Infinite-ID's
    prediction ε_text + 1·(ε_id − ε_text) is ε_id, so the text stream's call is skipped."""

    def __init__(self, settings: InfiniteID) -> None:
        self.settings = settings

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        return executor(x, timesteps, context, y, control,
                        {**transformer_options, IDENTITY_STREAM: {}, ACTIVE_IDENTITY: self.settings,
                         PASS: Pass.IDENTITY_STREAM}, **kwargs)


def identity_stream(model, settings: InfiniteID, keys: list[BlockKey]):
    """A clone of ``model`` that runs only ``settings``' identity stream, through sampling's processors."""
    import comfy.patcher_extension

    kinds = comfy.patcher_extension.WrappersMP
    wrapper_type = kinds.DIFFUSION_MODEL
    patched = apply_infinite_id(model, settings, keys)
    # One stream, no extra rows: ComfyUI's memory estimate is the model's own.
    for kind in (kinds.CALC_COND_BATCH, kinds.PREPARE_SAMPLING, wrapper_type):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, IdentityStreamOnly(settings))
    return patched


class TrainedMappers(torch.nn.Module):
    """What identity-enhanced training changes, as one module DistributedDataParallel can average:
    the projection (face mapper, CLIP mapper) and every layer's image K/V. Its forward gives one
    example's identity tokens and hands out the K/V weights (called once per example)."""

    def __init__(self, projection: torch.nn.Module, kv: dict[BlockKey, tuple[torch.nn.Parameter, torch.nn.Parameter]],
                 scale: float):
        super().__init__()
        self.projection, self.scale, self.keys = projection, scale, list(kv)
        self.kv = torch.nn.ParameterList([w for key in self.keys for w in kv[key]])

    def forward(self, face_embed: torch.Tensor, clip_hidden: torch.Tensor):
        kv = {key: (self.kv[2 * i], self.kv[2 * i + 1]) for i, key in enumerate(self.keys)}
        return self.projection(face_embed, clip_hidden, self.scale), kv


def with_sampling_lora(adapter, model, lora_scale: float):
    """A copy of ``adapter`` (already the trainer's own copy) whose file LoRA is the one Likeness
    Infinite-ID would apply with ``adapter`` at ``lora_scale``, written at scale 1: the file it saves
    is read back as trained, and the trainer applies it through the same reader."""
    from . import faceid_lora
    from .id_adapter import FILE_LAYOUTS

    lora = adapter.faceid_lora(model, lora_scale) if lora_scale > 0 else None
    entries = ({} if lora is None else
               faceid_lora.adapter_file_entries(lora, FILE_LAYOUTS[adapter.kind], diffusion_model_of(model)))
    twin = adapter.with_lora(None, "")
    twin.lora, twin.use_file_lora = entries, True
    return twin


def train_id_adapter(model, adapter, pairs: Sequence[IdentityPair], *, steps: int, seed: int,
                     no_face_hidden: torch.Tensor, recipe: Recipe = recipes.ID_ADAPTER_TRAINING, scale: float = 1.0,
                     lora_scale: float = 1.0, identity_dropout: float = recipes.ID_ADAPTER_IDENTITY_DROPOUT,
                     on_step: Callable[[int, float], None] | None = None, batching: Batching = Batching(),
                     world: World = World(), resume: Resume | None = None, on_checkpoint=None,
                     validation: int | None = None):
    """(trained adapter, validation loss before, after). The input adapter is left as it is.
    ``pairs``: a list, or a sequence that reads each pair when first asked (jobs/train.py's).
    ``no_face_hidden``: CLIP's hidden states of the "no face" image (identity_tokens.no_face_clip_hidden),
    what a dropped identity (probability ``identity_dropout``) is read from. ``scale`` is s_scale,
    ``lora_scale`` FaceID's LoRA scale as Likeness Infinite-ID takes them. Under torchrun (``world``)
    the mappers and K/V train as DistributedDataParallel; ``resume`` continues a checkpoint's
    optimiser (``adapter`` is then the checkpoint's); ``on_checkpoint(steps_done, adapter,
    optimizer)`` runs after every step with the weights trained so far."""
    import comfy.model_management

    comfy.model_management.load_model_gpu(model)
    device = model.load_device
    keys = attention_keys(diffusion_model_of(model))
    with torch.inference_mode(False), torch.enable_grad():
        leave_inference_mode(diffusion_model_of(model))
        trained = with_sampling_lora(adapter.to(device, torch.float32), model, lora_scale)
        leave_inference_mode(trained.projection)
        trained.kv_weights = {k: (torch.nn.Parameter(w_k.clone()), torch.nn.Parameter(w_v.clone()))
                              for k, (w_k, w_v) in trained.kv_weights.items()}
        mappers = TrainedMappers(trained.projection, trained.kv_weights, scale)
        if scale == 0 and world.distributed:
            # s_scale 0 never runs the resampler: DDP must not wait for gradients it will never get
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                mappers, [f"projection.perceiver_resampler.{name}"
                          for name, _ in trained.projection.perceiver_resampler.named_parameters()])
        parameters = [p for p in trained.projection.parameters()] + [p for kv in trained.kv_weights.values()
                                                                      for p in kv]
        for parameter in parameters:
            parameter.requires_grad_(True)
        shared_mappers = shared(mappers, world)
        # Likeness Infinite-ID's identity stream with text off; its tokens and K/V are set per example.
        settings = InfiniteID(tokens=torch.zeros(()), uncond_tokens=torch.zeros(()), kv={},
                              lora=trained.faceid_lora(model, 1.0), mixed_attention=False,
                              cross_attention_merge=False, adain_mean=False)
        patched = identity_stream(model, settings, keys)
        no_face = (torch.zeros(1, trained.projection.shape.id_dim), normal_copy(no_face_hidden))

        def loss_of(pair: IdentityPair, sigma, noise, generator=None) -> torch.Tensor:
            dropped = generator is not None and float(torch.rand(1, generator=generator)) < identity_dropout
            face_embed, clip_hidden = no_face if dropped else (pair.face_embed, pair.clip_hidden)
            tokens, settings.kv = shared_mappers(normal_copy(face_embed).to(device, torch.float32),
                                                 normal_copy(clip_hidden).to(device, torch.float32))
            settings.tokens = settings.uncond_tokens = tokens
            try:
                return diffusion_loss(model, patched, normal_copy(pair.target), normal_copy(pair.cond),
                                      sigma.to(device), noise.to(device))
            finally:
                settings.release()  # K/V moved for this example's graph: never reused by the next

        checkpoint = None
        if on_checkpoint is not None:
            def checkpoint(done: int, optimizer) -> None:
                on_checkpoint(done, trained, optimizer)

        before, after = optimise(pairs, loss_of, parameters, model_sampling=model_sampling_of(model), steps=steps,
                                 recipe=recipe, seed=seed, on_step=on_step,
                                 synced=[shared_mappers] if shared_mappers is not unwrapped(shared_mappers) else [],
                                 batching=batching, world=world, device=device, resume=resume,
                                 on_checkpoint=checkpoint, validation=validation)
        trained.kv_weights = {k: (w_k.detach(), w_v.detach()) for k, (w_k, w_v) in trained.kv_weights.items()}
        for parameter in parameters:
            parameter.requires_grad_(False)
    return trained, before, after
