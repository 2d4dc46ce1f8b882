"""A well-behaved denoiser for invariant tests.

A random UNet predicts wildly different noise at neighbouring sigmas, so a
DDIM inversion of it does not round-trip. Scaling its output convolution
down (through ComfyUI's own weight patches, as a LoRA would) keeps every
attention layer live but makes the predicted noise smooth.
"""

from __future__ import annotations

import torch

OUTPUT_LAYER = ("diffusion_model.out.2.weight", "diffusion_model.out.2.bias")


def calm(model, scale: float = 0.01):
    """A clone of ``model`` whose UNet output is scaled by ``scale``."""
    patched = model.clone()
    state = patched.model_state_dict()
    # A "diff" patch of zeros with strength_model=scale: weight·scale + 0.
    patched.add_patches({key: (torch.zeros_like(state[key]),) for key in OUTPUT_LAYER},
                        strength_patch=1.0, strength_model=scale)
    return patched
