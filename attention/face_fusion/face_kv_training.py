"""Training Linear_kf / Linear_vf (Face Fusion's only trainable layers).

The objective is the diffusion model's own: predict the noise added to a
target image while its face crop goes through the fused cross-attention.
The UNet stays frozen; gradients reach only the per-layer projections,
which start from the layers' self-attention to_k / to_v (the training-free
default), so step 0 is exactly the untrained behaviour.

The face pass is the one sampling runs (attention/face_fusion/face_kv_attention.py's
``face_input``): each example's face is noised to the step's sigma with its
own fixed noise, drawn from ``face_noise_seed(seed, index)``, so the trained
projections see the h_f they will see at inference and a run reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..shared import recipes
from ..shared.layer_table import BlockKey, attention_keys, diffusion_model_of, transformer_block
from ..shared.recipes import Recipe
from ..shared.sigmas import SigmaRange, model_sampling_of
from ..shared.training_loop import (Batching, Resume, World, diffusion_loss, leave_inference_mode, normal_copy,
                                    optimise, shared, unwrapped)
from .face_kv_attention import Identity, apply_face_fusion, reference_noise

FACE_SUFFIX = ".face"  # <stem>.face.png beside <stem>.png


def initial_projections(model, layers: list[BlockKey]) -> dict[BlockKey, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    unet = diffusion_model_of(model)
    weights = {}
    for key in layers:
        attn1 = transformer_block(unet, key).attn1
        weights[key] = (torch.nn.Parameter(attn1.to_k.weight.detach().float().clone()),
                        torch.nn.Parameter(attn1.to_v.weight.detach().float().clone()))
    return weights


@dataclass
class Batch:
    target: torch.Tensor  # model-space latent of the target image
    face: torch.Tensor  # model-space latent of its face crop
    cond: list  # ComfyUI CONDITIONING of the caption
    face_noise: torch.Tensor | None = None  # the face's fixed noise (set by train_face_kv)


def face_noise_seed(seed: int, index: int) -> int:
    """The seed of example ``index``'s face noise in a run seeded ``seed`` (the Face Fusion node's
    noise_seed of the same value draws the same noise)."""
    return (int(seed) + 1 + index) % 2 ** 64


def _copied(batch: Batch) -> Batch:
    return normal_copy(batch)


def _loss(model, weights, batch: Batch, sigma: torch.Tensor, noise: torch.Tensor, layers) -> torch.Tensor:
    device = model.load_device
    identity = Identity(latent=batch.face.to(device), noise=batch.face_noise.to(device), weight=1.0,
                        sigma_range=SigmaRange.always(), kv=weights, clean=False)
    return diffusion_loss(model, apply_face_fusion(model, identity, layers), batch.target, batch.cond, sigma, noise)


class Projections(torch.nn.Module):
    """The trained Linear_kf / Linear_vf as one module, so DistributedDataParallel can average their
    gradients: its forward hands the weights to the face patch (called once per example)."""

    def __init__(self, weights: dict[BlockKey, tuple[torch.nn.Parameter, torch.nn.Parameter]]):
        super().__init__()
        self.keys = list(weights)
        self.pairs = torch.nn.ParameterList([w for key in self.keys for w in weights[key]])

    def forward(self) -> dict[BlockKey, tuple[torch.Tensor, torch.Tensor]]:
        return {key: (self.pairs[2 * i], self.pairs[2 * i + 1]) for i, key in enumerate(self.keys)}


class WithFaceNoise(Sequence):
    """``batches`` (a list, or a sequence that reads each example when first asked, as jobs/train.py's
    is) with each example's fixed face noise, made once when first drawn."""

    def __init__(self, batches: Sequence[Batch], seed: int):
        self.batches, self.seed, self.made = batches, seed, {}

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        if index not in self.made:
            batch = self.batches[index]
            self.made[index] = replace(batch, face_noise=reference_noise(batch.face.shape,
                                                                         face_noise_seed(self.seed, index)))
        return self.made[index]


def train_face_kv(model, batches: Sequence[Batch], *, steps: int, seed: int, recipe: Recipe = recipes.FACE_KV_TRAINING,
                  on_step: Callable[[int, float], None] | None = None, batching: Batching = Batching(),
                  world: World = World(), resume: Resume | None = None, initial: dict | None = None,
                  on_checkpoint=None, validation: int | None = None) -> tuple[dict, float, float]:
    """(weights, validation loss before, after). ``on_step`` may raise to interrupt. ``initial``:
    weights to continue from (a checkpoint's); under torchrun (``world``) the projections train as
    DistributedDataParallel; ``on_checkpoint(steps_done, weights, optimizer)`` runs after every step."""
    import comfy.model_management

    comfy.model_management.load_model_gpu(model)
    device = model.load_device
    layers = attention_keys(diffusion_model_of(model))
    batches = WithFaceNoise(batches, seed)
    with torch.inference_mode(False), torch.enable_grad():
        leave_inference_mode(diffusion_model_of(model))
        start = initial if initial is not None else initial_projections(model, layers)
        weights = {k: (torch.nn.Parameter(w_k.detach().float().clone().to(device)),
                       torch.nn.Parameter(w_v.detach().float().clone().to(device)))
                   for k, (w_k, w_v) in start.items()}
        projections = shared(Projections(weights), world)

        def loss_of(batch: Batch, sigma, noise, generator=None) -> torch.Tensor:  # draws nothing of its own
            return _loss(model, projections(), _copied(batch), sigma.to(device), noise.to(device), layers)

        checkpoint = None
        if on_checkpoint is not None:
            def checkpoint(done: int, optimizer) -> None:
                on_checkpoint(done, weights, optimizer)

        before, after = optimise(batches, loss_of, [p for pair in weights.values() for p in pair],
                                 model_sampling=model_sampling_of(model), steps=steps, recipe=recipe, seed=seed,
                                 on_step=on_step,
                                 synced=[projections] if projections is not unwrapped(projections) else [],
                                 batching=batching, world=world, device=device, resume=resume,
                                 on_checkpoint=checkpoint, validation=validation)
    return {k: (w_k.detach().cpu(), w_v.detach().cpu()) for k, (w_k, w_v) in weights.items()}, before, after
