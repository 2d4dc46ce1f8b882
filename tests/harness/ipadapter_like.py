"""Patches of ComfyUI_IPAdapter_plus' shapes, written here for the tests (the real pack is not a
registry package): its callback container on the attention replace keys, its way of placing it
(2-part keys on SD1.5, 3-part on SDXL; ``.add(callback, **kwargs)`` on an object it finds on a key,
without copying it), and an image-prompt callback that adds weight·Attn(q, K_ip, V_ip), with the
uncond chunks' own K/V."""

from __future__ import annotations

import torch


def _attention(q, k, v, heads):
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, heads)


class CallbackContainer:
    """Base attention, then each callback's addition within its sigma range."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = _attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"].flatten()[0]) if "sigmas" in extra_options else 1e9
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def image_prompt(out, q, k, v, extra_options, seed=0, weight=1.0, tokens=4, **_):
    """What an image prompt adds: weight·Attn(q, K_ip, V_ip), K/V of fixed random image tokens, and
    other ones (the "no image" embeds) on the uncond rows, found as IPAdapter_plus finds them: the
    batch split into equal chunks by ``cond_or_uncond``."""
    generator = torch.Generator().manual_seed(seed)
    cond_k, cond_v, uncond_k, uncond_v = (torch.randn(1, tokens, q.shape[-1], generator=generator).to(q) * 2
                                          for _ in range(4))
    chunks = extra_options["cond_or_uncond"]
    per_chunk = q.shape[0] // len(chunks)
    ip_k = torch.cat([(uncond_k if chunk == 1 else cond_k).expand(per_chunk, -1, -1) for chunk in chunks])
    ip_v = torch.cat([(uncond_v if chunk == 1 else cond_v).expand(per_chunk, -1, -1) for chunk in chunks])
    return weight * _attention(q, ip_k, ip_v, extra_options["n_heads"])


def apply(model, keys, *, two_part: bool, weight: float = 1.0):
    """A clone of ``model`` with an image prompt on every attn2 key, placed as IPAdapter_plus places it."""
    patched = model.clone()
    for number, key in enumerate(keys):
        place = tuple(key[:2]) if two_part else tuple(key)
        kwargs = {"seed": 100 + number, "weight": weight, "sigma_start": float("inf"), "sigma_end": 0.0}
        options = patched.model_options["transformer_options"].copy()
        replace = options.get("patches_replace", {}).copy()
        attn2 = replace.get("attn2", {}).copy()
        if place in attn2:
            attn2[place].add(image_prompt, **kwargs)
        else:
            attn2[place] = CallbackContainer(image_prompt, **kwargs)
        replace["attn2"] = attn2
        options["patches_replace"] = replace
        patched.model_options["transformer_options"] = options
    return patched
