"""Infinite-ID's identity-enhanced training (Sec. 3.2, Eq. 3).

The face mapper, the CLIP mapper (the adapter's projection) and the image
cross-attention K/V are trained with the UNet frozen and the *text*
cross-attention switched off: every cross-attention sees only the identity
tokens of an identity image while the model denoises a different image of
the same person, so identity cannot leak in through the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .schedule import model_sampling_of
from .training import (Batching, Resume, World, diffusion_loss, leave_inference_mode, normal_copy, optimise, shared,
                       unwrapped)
from .unet_layers import BlockKey, attention_keys, diffusion_model_of

ORDER = 120


@dataclass
class Pair:
    target: torch.Tensor  # model-space latent of the target image
    face_embed: torch.Tensor  # (1, 512) ArcFace of the identity image
    clip_hidden: torch.Tensor  # (1, T, clip) CLIP penultimate states of its aligned face
    cond: list  # an empty prompt: SDXL still needs its pooled/size vector


class IdentityOnlyCrossAttention:
    """attn2 during training: attention over the identity tokens only (text off)."""

    order = ORDER

    def __init__(self, current: dict) -> None:
        # {"tokens": (1, T, context), "kv": {BlockKey: (w_k, w_v)}}, set before each model call
        self.current = current

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options, attend):
        block = extra_options["block"]
        w_k, w_v = self.current["kv"][(block[0], block[1], extra_options.get("block_index", 0))]
        tokens = self.current["tokens"].to(q.dtype).expand(q.shape[0], -1, -1)
        return attend(q, F.linear(tokens, w_k.to(q.dtype)), F.linear(tokens, w_v.to(q.dtype)), extra_options)


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


def train_id_adapter(model, adapter, pairs: Sequence[Pair], *, steps: int, learning_rate: float, seed: int,
                     scale: float = 1.0, on_step: Callable[[int, float], None] | None = None,
                     batching: Batching = Batching(), world: World = World(), resume: Resume | None = None,
                     on_checkpoint=None, validation: int | None = None):
    """(trained adapter, validation loss before, after). The input adapter is left as it is.
    ``pairs``: a list, or a sequence that reads each pair when first asked (jobs/train.py's). Under
    torchrun (``world``) the mappers and K/V train as DistributedDataParallel; ``resume`` continues
    a checkpoint's optimiser (``adapter`` is then the checkpoint's); ``on_checkpoint(steps_done,
    adapter, optimizer)`` runs after every step with the weights trained so far."""
    import comfy.model_management

    from .dispatch import patched_clone

    comfy.model_management.load_model_gpu(model)
    device = model.load_device
    keys = attention_keys(diffusion_model_of(model))
    with torch.inference_mode(False), torch.enable_grad():
        leave_inference_mode(diffusion_model_of(model))
        trained = adapter.to(device, torch.float32)
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
        current: dict = {}
        patched = patched_clone(model, [("attn2", key, IdentityOnlyCrossAttention(current)) for key in keys])

        def loss_of(pair: Pair, sigma, noise, generator=None) -> torch.Tensor:  # draws nothing of its own
            current["tokens"], current["kv"] = shared_mappers(normal_copy(pair.face_embed).to(device),
                                                              normal_copy(pair.clip_hidden).to(device))
            return diffusion_loss(model, patched, normal_copy(pair.target), normal_copy(pair.cond),
                                  sigma.to(device), noise.to(device))

        checkpoint = None
        if on_checkpoint is not None:
            def checkpoint(done: int, optimizer) -> None:
                on_checkpoint(done, trained, optimizer)

        before, after = optimise(pairs, loss_of, parameters, model_sampling=model_sampling_of(model), steps=steps,
                                 learning_rate=learning_rate, seed=seed, on_step=on_step,
                                 synced=[shared_mappers] if shared_mappers is not unwrapped(shared_mappers) else [],
                                 batching=batching, world=world, device=device, resume=resume,
                                 on_checkpoint=checkpoint, validation=validation)
        trained.kv_weights = {k: (w_k.detach(), w_v.detach()) for k, (w_k, w_v) in trained.kv_weights.items()}
        for parameter in parameters:
            parameter.requires_grad_(False)
    return trained, before, after
