"""Face Fusion ("Fusion is all you need", Eq. 1–7).

The reference face's latent goes through the same UNet as the image being
made. In every cross-attention, the face's hidden states h_f (the layer's
input after its norm) become keys and values K_f = Linear_kf(h_f),
V_f = Linear_vf(h_f) that are concatenated to the text's:

    K' = [K_text; K_f1; …; K_fn],  V' = [V_text; V_f1; …; V_fn]   (Eq. 3, 6)

Several people: a query inside person j's mask gets −inf on every other
person's face keys (Eq. 7); queries outside all masks see every face.

The face rows run as a separate UNet call just before each model call
rather than as extra rows of the same batch, so that other packs' patches
still see the batch ComfyUI built (rows = chunks of ``cond_or_uncond``).
Linear_kf / Linear_vf are the layer's own self-attention to_k / to_v by
default (training-free: same input width), or trained weights from a file.
The weight enters as log(weight) added to that person's face logits: 1 is
the paper, 0 removes the face exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .masks import mask_to_tokens
from .rows import COND, UNCOND, row_mask, rows_of
from .schedule import SigmaRange, current_sigma
from .unet_layers import BlockKey, transformer_block

FACE_PASS = "likeness_face_pass"  # face call: dict the capture fills with h_f per layer
FACE_STATES = "likeness_face_states"  # main call: the h_f of every active reference, per layer
UNET = "likeness_unet"
ORDER = 150  # after FFA-style self-attention changes; cross-attention keys are added late
WRAPPER_KEY = "likeness_face_fusion"


@dataclass(frozen=True)
class Identity:
    """One person: references, strength, region, schedule and K/V projections."""

    latent: torch.Tensor  # (references, C, h, w), in the model's latent space
    noise: torch.Tensor  # fixed noise of the same shape: the face is noised to each step's sigma
    weight: float
    sigma_range: SigmaRange
    mask: torch.Tensor | None = None  # (H, W) region of this person in the image, any size
    kv: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] | None = None  # trained W_kf, W_vf per layer
    clean: bool = False  # pass the face latent un-noised at every step
    uncond: bool = True  # uncond rows see the face too

    def active(self, sigma: float | None) -> bool:
        return self.weight > 0 and self.sigma_range.contains(sigma)


@dataclass
class FaceFusion:
    """Everything one patched model needs; a chained node makes a new one."""

    identities: list[Identity]
    layers: set[BlockKey]
    model_sampling: object = field(repr=False)

    def __deepcopy__(self, memo):
        return self  # shared between clones; never copy the latents

    def with_identity(self, identity: Identity) -> "FaceFusion":
        return replace(self, identities=[*self.identities, identity])


def _face_batch(fusion: FaceFusion, active: list[Identity], sigma: float, like: torch.Tensor) -> torch.Tensor:
    """The references of the active people, noised to ``sigma`` and scaled as the UNet's input."""
    noisy = []
    for identity in active:
        latent = identity.latent.to(like)
        noisy.append(latent if identity.clean else latent + identity.noise.to(like) * sigma)
    sigma_tensor = torch.full((1,), sigma, device=like.device, dtype=like.dtype)
    return fusion.model_sampling.calculate_input(sigma_tensor, torch.cat(noisy))


def _rows_like(tensor: torch.Tensor | None, row: int, count: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor[row:row + 1].expand(count, *tensor.shape[1:])


class FaceFusionWrapper:
    """DIFFUSION_MODEL wrapper: the face call, then the model call that uses it."""

    def __init__(self, fusion: FaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigma = current_sigma(transformer_options)
        active = [i for i in self.fusion.identities if i.active(sigma)]
        if not active or sigma is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        faces = _face_batch(self.fusion, active, sigma, x)
        count = faces.shape[0]
        cond_or_uncond = transformer_options.get("cond_or_uncond", [COND])
        cond = rows_of(COND, cond_or_uncond, x.shape[0])
        text_row = cond[0] if cond else 0  # the face is read under the prompt, as in training
        captured: dict = {}
        face_options = {**transformer_options, FACE_PASS: captured, "cond_or_uncond": [COND],
                        UNET: executor.class_obj}
        executor(faces, _rows_like(timesteps, 0, count), _rows_like(context, text_row, count),
                 _rows_like(y, text_row, count), None, face_options, **kwargs)
        main_options = {**transformer_options, FACE_STATES: (active, captured), UNET: executor.class_obj}
        return executor(x, timesteps, context, y, control, main_options, **kwargs)


class FaceCapture:
    """attn2_patch: keeps each layer's normed face hidden states during the face call."""

    def __init__(self, fusion: FaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        captured = extra_options.get(FACE_PASS)
        block = extra_options.get("block")
        if captured is not None and block is not None:
            key = (block[0], block[1], extra_options.get("block_index", 0))
            if key in self.fusion.layers:
                captured[key] = n
        return n, context, value


def face_keys_values(identity: Identity, h_f: torch.Tensor, key: BlockKey, unet) -> tuple[torch.Tensor, torch.Tensor]:
    """K_f, V_f (Eq. 2) of one person's references, flattened to one sequence."""
    if identity.kv is not None and key in identity.kv:
        w_k, w_v = identity.kv[key]
        k_f, v_f = F.linear(h_f, w_k.to(h_f)), F.linear(h_f, w_v.to(h_f))
    else:
        attn1 = transformer_block(unet, key).attn1
        k_f, v_f = attn1.to_k(h_f), attn1.to_v(h_f)
    # References of one person line up one after another (Eq. 6).
    return k_f.reshape(1, -1, k_f.shape[-1]), v_f.reshape(1, -1, v_f.shape[-1])


def fusion_bias(identities: list[Identity], face_tokens: list[int], text_tokens: int, queries: int,
                query_masks: list[torch.Tensor | None], uncond_rows: torch.Tensor) -> torch.Tensor:
    """The additive attention bias (rows, queries, keys): Eq. 4's M with Eq. 7.

    ``query_masks[i]`` is person i's region on this layer's grid, (queries,)
    booleans, or None for a person without a mask.
    """
    rows = uncond_rows.shape[0]
    total = text_tokens + sum(face_tokens)
    bias = torch.zeros(rows, queries, total, device=uncond_rows.device)
    start = text_tokens
    for index, (identity, tokens) in enumerate(zip(identities, face_tokens)):
        columns = slice(start, start + tokens)
        start += tokens
        if identity.weight != 1.0:
            bias[:, :, columns] += math.log(identity.weight)
        # Eq. 7: inside another person's region this person's face keys are off.
        others = [m for j, m in enumerate(query_masks) if j != index and m is not None]
        if others:
            inside_other = torch.stack(others).any(0)
            if query_masks[index] is not None:
                inside_other = inside_other & ~query_masks[index]
            bias[:, inside_other, columns] = float("-inf")
        if not identity.uncond:
            bias[uncond_rows, :, columns] = float("-inf")
    return bias


class FaceFusionProcessor:
    """Dispatcher processor on attn2: text keys plus every active person's face keys."""

    order = ORDER

    def __init__(self, fusion: FaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options, attend):
        state = extra_options.get(FACE_STATES)
        block = extra_options.get("block")
        if state is None or block is None:
            return attend(q, k, v, extra_options)
        key = (block[0], block[1], extra_options.get("block_index", 0))
        active, captured = state
        if key not in captured:
            return attend(q, k, v, extra_options)
        h_all = captured[key]
        text_tokens = k.shape[1]
        keys, values, face_tokens, start = [k], [v], [], 0
        for identity in active:
            count = identity.latent.shape[0]
            k_f, v_f = face_keys_values(identity, h_all[start:start + count], key, extra_options[UNET])
            start += count
            keys.append(k_f.expand(q.shape[0], -1, -1).to(k.dtype))
            values.append(v_f.expand(q.shape[0], -1, -1).to(v.dtype))
            face_tokens.append(k_f.shape[1])
        k, v = torch.cat(keys, 1), torch.cat(values, 1)
        if all(i.weight == 1.0 and i.uncond for i in active) and (len(active) == 1 or
                                                               all(i.mask is None for i in active)):
            # Nothing to mask: keep ComfyUI's unmasked (flash/memory-efficient) attention.
            return attend(q, k, v, extra_options)
        query_masks = [None if i.mask is None else
                       mask_to_tokens(i.mask, extra_options["original_shape"], q.shape[1], device=q.device)[0] > 0.5
                       for i in active]
        uncond = row_mask(UNCOND, extra_options["cond_or_uncond"], q.shape[0], device=q.device)
        bias = fusion_bias(active, face_tokens, text_tokens, q.shape[1], query_masks, uncond).to(q.dtype)
        return attend(q, k, v, extra_options, mask=bias)


def apply_face_fusion(model, identity: Identity, layers: list[BlockKey]):
    """A clone of ``model`` that fuses ``identity``; chained calls add people to one patch."""
    import comfy.patcher_extension

    from .dispatch import dispatchers, patched_clone
    from .schedule import model_sampling_of

    wrapper_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    existing = model.get_wrappers(wrapper_type, WRAPPER_KEY)
    if existing:
        fusion = existing[0].fusion.with_identity(identity)
    else:
        fusion = FaceFusion([identity], {tuple(k) for k in layers}, model_sampling_of(model))
    if existing:
        patched = model.clone()
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        for dispatcher in dispatchers(patched):
            dispatcher.processors = [FaceFusionProcessor(fusion) if isinstance(p, FaceFusionProcessor) else p
                                     for p in dispatcher.processors]
        patches = patched.model_options["transformer_options"].get("patches", {})
        patches["attn2_patch"] = [FaceCapture(fusion) if isinstance(p, FaceCapture) else p
                                  for p in patches.get("attn2_patch", [])]
    else:
        patched = patched_clone(model, [("attn2", key, FaceFusionProcessor(fusion)) for key in sorted(fusion.layers)])
        patched.set_model_attn2_patch(FaceCapture(fusion))
    patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, FaceFusionWrapper(fusion))
    return patched
