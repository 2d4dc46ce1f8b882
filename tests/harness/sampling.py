"""Small graphs built from core nodes, run in-process."""

from __future__ import annotations

import torch


def encode(comfy, clip, text: str):
    return comfy.run_node("CLIPTextEncode", clip=clip, text=text)[0]


def txt2img_latent(comfy, model, clip, *, cfg: float = 5.0, steps: int = 2, seed: int = 7,
                   size: int = 64, batch: int = 1, positive: str = "a portrait photo",
                   negative: str = "blurry", sampler: str = "euler") -> torch.Tensor:
    """KSampler output samples for a fixed seed."""
    (latent,) = comfy.run_node("EmptyLatentImage", width=size, height=size, batch_size=batch)
    (out,) = comfy.run_node("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                            scheduler="normal", positive=encode(comfy, clip, positive),
                            negative=encode(comfy, clip, negative), latent_image=latent, denoise=1.0)
    return out["samples"]
