"""MagicStyle's ``recompute`` mode on SD1.5/SDXL: FFA from the content and style rows of the same call.

recompute.py's APPLY_MODEL wrapper appends the inverted content and style latents (at this step's
sigma, with their inversion's conditioning) to the batch. In each chosen self-attention the image
rows get FFA from the extra rows' normed hidden states, as ffa.py gets them from the cache:

    input   α·h_c + β·h_cur     context [h_c; h_s]     (V: AdaIN on the content half)

while the extra rows attend over their own keys only, as the plain model: they are the
inversion's own forward, so every layer's h_c, h_s are what the cache would have kept.
"""

from __future__ import annotations

import torch

from ..shared.dispatch import acts_in
from ..shared.layer_table import layer_key
from ..shared.rows import sample_index
from .ffa import ORDER, PASSES, fuse_values
from .recompute import RECOMPUTE_ROWS

FUSED = "likeness_ffa_recompute_fused"  # extra_options key: the attn1_patch mixed this layer's inputs


class RecomputeInputs:
    """attn1_patch: the image rows project α·h_c + β·h_cur against [h_c; h_s], the extra rows their own
    states (duplicated to the same context length; the processor attends them over one copy)."""

    passes = PASSES

    def __init__(self, layers, alpha: float, beta: float) -> None:
        self.layers, self.alpha, self.beta = {tuple(k) for k in layers}, alpha, beta

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        rows = extra_options.get(RECOMPUTE_ROWS)
        if rows is None or layer_key(extra_options) not in self.layers or not acts_in(self, extra_options):
            return n, context, value
        image = rows.image
        h_c, h_s, extra = n[image:rows.style], n[rows.style:rows.style + 1], n[image:]
        if rows.content > 1:
            h_c = h_c[sample_index(list(rows.chunks), image)]
        h_c, h_s = h_c.expand(image, -1, -1), h_s.expand(image, -1, -1)
        mixed = torch.cat([self.alpha * h_c + self.beta * n[:image], extra])
        kv = torch.cat([torch.cat([h_c, h_s], dim=1), torch.cat([extra, extra], dim=1)])
        extra_options[FUSED] = True
        return mixed, kv, kv


class RecomputeProcessor:
    """Dispatcher processor: AdaIN and temperature for the image rows; the extra rows plain."""

    order = ORDER
    passes = PASSES

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options, attend):
        rows = extra_options.get(RECOMPUTE_ROWS)
        if rows is None or not extra_options.pop(FUSED, False):
            return attend(q, k, v, extra_options)
        image, tokens = rows.image, q.shape[1]
        fused = attend(q[:image] * self.temperature if self.temperature != 1.0 else q[:image], k[:image],
                       fuse_values(v[:image], tokens), extra_options)
        plain = attend(q[image:], k[image:, :tokens], v[image:, :tokens], extra_options)
        return torch.cat([fused, plain])


def patched_unet_clone(model, layers, *, alpha: float, beta: float, temperature: float):
    from ..shared.dispatch import add_input_patch, patched_clone

    processor = RecomputeProcessor(temperature)
    patched = patched_clone(model, [("attn1", key, processor) for key in sorted(tuple(k) for k in layers)])
    add_input_patch(patched, "attn1_patch", RecomputeInputs(layers, alpha, beta))
    return patched
