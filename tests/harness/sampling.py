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


class GivenNoise:
    """A NOISE input that gives one fixed tensor (SamplerCustomAdvanced's interface)."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise, self.seed = noise, 0

    def generate_noise(self, latent: dict) -> torch.Tensor:
        return self.noise.clone()


def controlled_sampler(comfy, clip, controlnet_folder, *, steps: int):
    """A KSampler run (64x64, seed 7, cfg 5) under prompts that carry the tiny ControlNet with a
    fixed hint: ``sample(model)`` gives the sampled latent."""
    from tiny import tiny_controlnet

    path = tiny_controlnet.write(controlnet_folder)
    (control,) = comfy.run_node("ControlNetLoader", control_net_name=path.name)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = comfy.run_node("ControlNetApplyAdvanced", positive=encode(comfy, clip, "a portrait photo"),
                                        negative=encode(comfy, clip, "blurry"), control_net=control, image=hint,
                                        strength=1.0, start_percent=0.0, end_percent=1.0)
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)

    def sample(model):
        (out,) = comfy.run_node("KSampler", model=model, seed=7, steps=steps, cfg=5.0, sampler_name="euler",
                                scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                                denoise=1.0)
        return out["samples"]
    return sample


def first_model_call(comfy, model, positive, latent: dict, sigma: float, noise: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x0) of the first model call a sampler makes at cfg 1 (CFGGuider, SamplerCustomAdvanced,
    ComfyUI's calc_cond_batch and apply_model): x is the LATENT, in model space, noised by ComfyUI's
    own rule with ``noise`` at ``sigma``, and x0 the prediction the sampler gets for ``positive``."""
    from comfy.samplers import KSAMPLER  # (the module by name would hide the ``comfy`` harness)

    seen = {}

    def first_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["x"] = x.clone()
        seen["x0"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return seen["x0"]

    (guider,) = comfy.run_node("CFGGuider", model=model, positive=positive, negative=positive, cfg=1.0)
    comfy.run_node("SamplerCustomAdvanced", noise=GivenNoise(noise), guider=guider,
                   sampler=KSAMPLER(first_call), sigmas=torch.tensor([float(sigma), 0.0]),
                   latent_image=latent)
    return seen["x"], seen["x0"]


def sampled_loss(comfy, model, positive, latent: dict, sigma: float, noise: torch.Tensor) -> float:
    """‖ε − ε_θ‖² of the sampler's first model call: ε_θ = (x − x0)/σ, as an eps model's sampler reads it."""
    x, x0 = first_model_call(comfy, model, positive, latent, sigma, noise)
    predicted = (x - x0) / sigma
    return float(torch.nn.functional.mse_loss(predicted.float(), noise.to(predicted).float()))
