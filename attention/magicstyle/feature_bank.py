"""The MagicStyle feature cache: self-attention inputs kept during inversion.

MagicStyle needs Q_c, K_c, V_c of the content image and K_s, V_s of the
style image at every step and self-attention layer. All five are linear
projections of the layer's normed hidden states, so the bank keeps only
those (one tensor per image, layer and step) and lets the layer's own
projections recompute Q/K/V when they are used, with whatever weight
patches (LoRA) the model carries then. Stored as fp8 (e4m3, one scale per
image and tensor) that is 20% of fp16 Q_c, K_c, V_c, K_s, V_s; as fp16, 40%.

The bank rests in system memory (pinned where there is a GPU, so it moves
fast); a sampling run moves it to the GPU when it fits beside the loaded
model, or streams it layer by layer, and lets go of it when the run ends
(ffa.FeatureFusion), so nothing stays on the GPU outside what ComfyUI's
memory manager sees between prompts.

Entries are keyed by timestep, not by call order: a sampler that calls the
model several times per step, or cond and uncond in separate calls, still
finds the right features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..shared.layer_table import BlockKey, attention_geometry, layer_key, tokens_at
from ..shared.rows import COND, rows_of
from ..shared.sigmas import current_sigma

FORMAT_VERSION = 2  # 2: fp8 with scales, or fp16; 1: fp16 only (still read)
PRECISIONS = {"fp8": torch.float8_e4m3fn, "fp16": torch.float16}
FP8_MAX = 448.0  # the largest float8_e4m3fn


@dataclass
class StoredStates:
    """Hidden states (images, tokens, channels) as kept: fp16, or fp8 with one scale per image."""

    values: torch.Tensor
    scale: torch.Tensor | None = None  # (images,) float32: states = values · scale

    @classmethod
    def store(cls, states: torch.Tensor, precision: str, device) -> "StoredStates":
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        states = states.detach()
        if precision == "fp16":
            return cls(states.to(device, torch.float16, copy=True))
        # e4m3 is a float format: one scale per image only keeps the largest value in range.
        scale = (states.float().abs().amax(dim=(1, 2)) / FP8_MAX).clamp_min(1e-12)
        values = (states.float() / scale.view(-1, 1, 1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(values.to(device), scale.to(device))

    @property
    def images(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.values.numel() * self.values.element_size() + scale

    def __getitem__(self, index) -> "StoredStates":
        return StoredStates(self.values[index], None if self.scale is None else self.scale[index])

    def to(self, device, non_blocking: bool = False) -> "StoredStates":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return StoredStates(move(self.values), move(self.scale))

    def pinned(self) -> "StoredStates":
        return StoredStates(self.values.pin_memory(), None if self.scale is None else self.scale.pin_memory())

    def states(self, device, dtype) -> torch.Tensor:
        """The hidden states on ``device`` in ``dtype`` (computing in ``dtype``: no fp32 copy)."""
        values = self.values.to(device, non_blocking=True)
        if self.scale is None:
            return values.to(dtype)
        return values.to(dtype) * self.scale.to(device, non_blocking=True).to(dtype).view(-1, 1, 1)

    @staticmethod
    def cat(parts: list["StoredStates"]) -> "StoredStates":
        if len({p.scale is None for p in parts}) != 1:
            # precision auto may store two inversions differently: fp8 parts widen to fp16 (to its rounding)
            parts = [p if p.scale is None else StoredStates(p.states(p.values.device, torch.float16)) for p in parts]
        scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts])
        return StoredStates(torch.cat([p.values for p in parts]), scale)


def timestep_key(timestep: float | torch.Tensor) -> float:
    """Timesteps of discrete models are whole numbers; others are rounded so
    that the same sigma always gives the same key."""
    return round(float(timestep), 3)


class TimestepOf:
    """sigma → timestep key through the model's model_sampling, remembered:
    every patched layer asks for the same few sigmas many times a run."""

    def __init__(self, model_sampling) -> None:
        self.model_sampling = model_sampling
        self._known: dict[float, float] = {}

    def __call__(self, sigma: float) -> float:
        if sigma not in self._known:
            self._known[sigma] = timestep_key(self.model_sampling.timestep(torch.tensor(sigma)))
        return self._known[sigma]


def model_fingerprint(model) -> str:
    """A short hash of a ModelPatcher's UNet: its layout and a sample of its
    checkpoint weights. Weight patches (LoRA) are left out on purpose, and
    weights a loaded patch changed in place are read from ComfyUI's backup,
    so the answer does not depend on which clone happens to be loaded."""
    unet = model.get_model_object("diffusion_model")
    backup = getattr(model, "backup", {})
    params = list(unet.state_dict().items())
    digest = hashlib.sha256()
    digest.update(json.dumps([(name, list(t.shape)) for name, t in params]).encode())
    for name, tensor in params[:4] + params[-4:]:
        saved = backup.get(f"diffusion_model.{name}")
        weight = saved.weight if saved is not None else tensor
        sample = weight.detach().flatten()[:256].float().cpu().contiguous()
        digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class FeatureBank:
    """Normed self-attention inputs per (timestep, layer), shape (images, tokens, channels)."""

    layers: list[BlockKey]
    timesteps: list[float]  # in the order the forward pass visits them (noisiest first)
    sigmas: list[float]  # the forward schedule the bank was made for, ending in 0
    latent_shape: list[int]  # (images, channels, height, width)
    model_fingerprint: str
    steps: int
    capture: str  # "qkv" (content) or "kv" (style): what the features will be used for
    dtype: str = "fp8"  # how the states are stored: "fp8" (scaled float8_e4m3fn) or "fp16"
    features: dict[tuple[float, BlockKey], StoredStates] = field(default_factory=dict, repr=False)
    # z_T of the same images: a saved style needs it for AdaIN(z_T^C, z_T^S).
    latent: torch.Tensor | None = field(default=None, repr=False)
    # Where a sampling run keeps it: "auto", "device" or "cpu" (see ffa.FeatureFusion).
    placement: str = "auto"
    # recompute mode: the inverted latents instead of the features (recompute.Trajectory)
    trajectory: object = field(default=None, repr=False)

    @property
    def images(self) -> int:
        return self.latent_shape[0]

    def nbytes(self) -> int:
        kept = 0 if self.trajectory is None else self.trajectory.nbytes()
        return kept + sum(stored.nbytes for stored in self.features.values())

    def get(self, timestep: float, layer: BlockKey) -> StoredStates | None:
        return self.features.get((timestep_key(timestep), tuple(layer)))

    def select(self, start: int, length: int) -> "FeatureBank":
        """The features of images start … start+length-1 (a content/style batch split)."""
        if start < 0 or length < 1 or start + length > self.images:
            raise ValueError(f"batch_index={start}, length={length}: the features hold {self.images} image(s)")
        part = FeatureBank(self.layers, self.timesteps, self.sigmas, [length, *self.latent_shape[1:]],
                           self.model_fingerprint, self.steps, self.capture, self.dtype)
        part.features = {key: value[start:start + length] for key, value in self.features.items()}
        part.placement = self.placement
        part.latent = None if self.latent is None else self.latent[start:start + length]
        part.trajectory = None if self.trajectory is None else self.trajectory.select(start, length)
        return part

    def metadata(self) -> dict:
        return {"format": FORMAT_VERSION, "layers": [list(k) for k in self.layers], "timesteps": self.timesteps,
                "sigmas": self.sigmas, "latent_shape": self.latent_shape, "model_fingerprint": self.model_fingerprint,
                "steps": self.steps, "capture": self.capture, "dtype": self.dtype}

    def check_compatible(self, *, fingerprint: str | None = None, latent_hw: tuple[int, int] | None = None,
                         sigmas: list[float] | None = None, what: str = "features") -> None:
        """Raise a ValueError that names every difference."""
        problems = []
        if fingerprint is not None and fingerprint != self.model_fingerprint:
            problems.append(f"model: made with a model whose fingerprint is {self.model_fingerprint}, "
                            f"this model's is {fingerprint} (invert with the same checkpoint)")
        if latent_hw is not None and tuple(latent_hw) != tuple(self.latent_shape[-2:]):
            problems.append(f"size: made for a {self.latent_shape[-1] * 8}x{self.latent_shape[-2] * 8} image, "
                            f"this latent is {latent_hw[1] * 8}x{latent_hw[0] * 8}")
        if sigmas is not None:
            missing = [s for s in sigmas if s > 0 and not self.has_sigma(s)]
            if missing:
                problems.append(f"steps: made for {self.steps} ddim_uniform steps; this sampler visits "
                                f"{len([s for s in sigmas if s > 0])} sigmas, {len(missing)} of them not in the "
                                f"cache (first {missing[0]:.4f}); use the same steps and the ddim_uniform scheduler")
        if problems:
            raise ValueError(f"these {what} do not fit: " + "; ".join(problems))

    def has_sigma(self, sigma: float) -> bool:
        return any(abs(sigma - s) <= 1e-4 * max(1.0, abs(s)) for s in self.sigmas if s > 0)


def merge_banks(banks: list[FeatureBank]) -> FeatureBank:
    """One bank over the images of several (same model, size, schedule)."""
    first = banks[0]
    if any(b.trajectory is not None for b in banks):
        raise ValueError("features kept for recompute (the inverted latents) cannot be merged: invert the images "
                         "in one batch")
    for other in banks[1:]:
        other.check_compatible(fingerprint=first.model_fingerprint, latent_hw=tuple(first.latent_shape[-2:]),
                               sigmas=first.sigmas)
    merged = FeatureBank(first.layers, first.timesteps, first.sigmas,
                         [sum(b.images for b in banks), *first.latent_shape[1:]],
                         first.model_fingerprint, first.steps, first.capture,
                         first.dtype if len({b.dtype for b in banks}) == 1 else "fp16")
    merged.features = {key: StoredStates.cat([b.features[key] for b in banks]) for key in first.features}
    if all(b.latent is not None for b in banks):
        merged.latent = torch.cat([b.latent for b in banks])
    return merged


class FeatureCapture:
    """An attn1_patch that records the normed input of chosen self-attention
    layers during an inversion run (cond rows only: inversion runs at cfg 1).

    It never changes what the layer computes. ``finish()`` hands the entries
    over; until then nothing is visible, so an interrupted inversion leaves
    no partial cache.
    """

    def __init__(self, layers: list[BlockKey], model_sampling, storage_device, *, wanted: list,
                 precision: str | Callable[[], str] = "fp8") -> None:
        self.layers = {tuple(k) for k in layers}
        # Only the timesteps a forward pass will look up (not σ_0 of the inversion).
        self.wanted = {timestep_key(t) for t in wanted}
        self.timestep_of = TimestepOf(model_sampling)
        self.storage_device = storage_device
        # A callable chooses the precision at the first capture, when the run has loaded the model.
        self._choose = precision if callable(precision) else None
        self.precision = None if callable(precision) else precision
        self._entries: dict[tuple[float, BlockKey], StoredStates] = {}

    def __call__(self, n, context, value, extra_options):
        key = layer_key(extra_options)
        if key is None:
            return n, context, value
        sigma = current_sigma(extra_options)
        if key in self.layers and sigma is not None:
            timestep = self.timestep_of(sigma)
            if timestep not in self.wanted:
                return n, context, value
            cond = rows_of(COND, extra_options["cond_or_uncond"], n.shape[0])
            if self.precision is None:
                self.precision = self._choose()
            self._entries[(timestep, key)] = StoredStates.store(n[cond], self.precision, self.storage_device)
        return n, context, value

    def __deepcopy__(self, memo):
        # Lives in a clone's model_options for one run; never copy its tensors.
        return self

    def finish(self) -> dict[tuple[float, BlockKey], StoredStates]:
        entries, self._entries = self._entries, {}
        return entries

    def discard(self) -> None:
        self._entries = {}


def cache_bytes(unet_config: dict, layers: list[BlockKey], latent_hw: tuple[int, int], timesteps: int, images: int,
                precision: str) -> int:
    """Exactly what a bank of ``images`` images holds, from the UNet's config alone: one tensor of
    tokens × channels per image, layer and timestep (+ its fp32 scale at fp8)."""
    geometry = attention_geometry(unet_config)
    values = sum(tokens_at(geometry[tuple(k)][0], latent_hw) * geometry[tuple(k)][1] for k in layers)
    per_image_step = values * PRECISIONS[precision].itemsize + (4 * len(layers) if precision == "fp8" else 0)
    return timesteps * images * per_image_step

