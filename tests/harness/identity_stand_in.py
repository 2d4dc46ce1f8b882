"""Infinite-ID inputs of the right shapes without an adapter file, for tests of the patch itself."""

from __future__ import annotations

import torch


def stand_in_identity(layers, model, seed: int = 0, tokens: int = 4) -> tuple[list, dict, torch.Tensor]:
    """(attention keys, image K/V weights, identity tokens): the layers' own text projections as the
    image K/V (a loaded FaceID-PlusV2 file gives its own) and seeded random tokens. ``layers`` is
    the pack's attention.shared.layer_table module."""
    unet = layers.diffusion_model_of(model)
    keys = layers.attention_keys(unet)
    kv = {k: (layers.transformer_block(unet, k).attn2.to_k.weight.detach().clone(),
              layers.transformer_block(unet, k).attn2.to_v.weight.detach().clone()) for k in keys}
    context = kv[keys[0]][0].shape[1]
    return keys, kv, torch.randn(1, tokens, context, generator=torch.Generator().manual_seed(seed))
