"""Face Fusion ("Fusion is all you need", Eq. 1–7).

The reference face's latent goes through the same UNet as the image being
made. In every cross-attention, the face's hidden states h_f (the layer's
input after its norm) become keys and values K_f = Linear_kf(h_f),
V_f = Linear_vf(h_f) that are concatenated to the text's:

    K' = [K_text; K_f1; …; K_fn],  V' = [V_text; V_f1; …; V_fn]   (Eq. 3, 6)

Several people (Eq. 7): a face key of person i gets −inf from every query
inside another person's mask M_j (j ≠ i), also where M_i overlaps M_j, so
an overlap sees the text only; queries outside all masks see every face.

The reference faces go through the UNet at every step (face_pass.py: as
extra rows of the image's own model call where that applies, else as a call
of their own just before it). What the face rows receive is built by
:func:`face_input` alone, for sampling and for training alike: the face
noised to the step's sigma with a fixed noise per reference, or (``clean``)
the latent itself at the model's smallest timestep, under the positive
prompt in every call (also a call that holds only uncond rows).

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

from ..infinite_id.stream_calls import ACTIVE_IDENTITY, IDENTITY_STREAM, LORA_STATE, STREAM_ROWS, TEXT_STREAM
from ..shared.dispatch import ATTENTION_MASK, PASS, Pass, pass_of
from ..shared.layer_table import BlockKey, layer_key, transformer_block
from ..shared.rows import COND, UNCOND, row_mask
from ..shared.sigmas import SigmaRange
from ..shared.token_masks import mask_to_tokens

FACE_PASS = "likeness_face_pass"  # separate face call: dict the capture fills with h_f per layer
FACE_ROWS = "likeness_face_rows"  # image call that carries the face rows too (FaceRows)
FACE_STATES = "likeness_face_states"  # image call: the h_f of every active reference, per layer
UNET = "likeness_unet"
ORDER = 150  # after FFA-style self-attention changes; cross-attention keys are added late
WRAPPER_KEY = "likeness_face_fusion"
# Per-call state of the image's own streams (Infinite-ID's): the face pass is not one of them.
IMAGE_STREAM_KEYS = (TEXT_STREAM, IDENTITY_STREAM, ACTIVE_IDENTITY, LORA_STATE, STREAM_ROWS)


def reference_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fixed noise of one person's references: drawn once, reused at every step."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


@dataclass(frozen=True)
class Identity:
    """One person: references, strength, region, schedule and K/V projections."""

    latent: torch.Tensor  # (references, C, h, w), in the model's latent space
    noise: torch.Tensor  # fixed noise of the same shape: the face is noised to each step's sigma
    weight: float
    sigma_range: SigmaRange
    mask: torch.Tensor | None = None  # (H, W) region of this person in the image, any size
    kv: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] | None = None  # trained W_kf, W_vf per layer
    clean: bool = False  # the face latent as it is, at the model's smallest timestep
    uncond: bool = True  # uncond rows see the face too

    def active(self, sigma: float | None) -> bool:
        return self.weight > 0 and self.sigma_range.contains(sigma)


@dataclass
class FaceFusion:
    """Everything one patched model needs; a chained node makes a new one."""

    identities: list[Identity]
    layers: set[BlockKey]
    model_sampling: object = field(repr=False)
    reported: set = field(default_factory=set, repr=False, compare=False)  # face-pass paths logged this run

    def __deepcopy__(self, memo):
        return self  # shared between clones; never copy the latents

    def with_identity(self, identity: Identity) -> "FaceFusion":
        return replace(self, identities=[*self.identities, identity])


def face_input(model_sampling, latent: torch.Tensor, noise: torch.Tensor, sigma: float,
               clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, timesteps) the face pass gives the UNet for one person's references at the step of ``sigma``.

    The one rule for sampling and training: noised, the latent is noised to sigma with its fixed
    noise by the model's own rule and scaled as the UNet's input of that step, at the step's
    timestep (so Linear_kf/Linear_vf meet at inference the h_f they were trained on); clean, it is
    the latent itself at the model's smallest sigma's timestep (0 for SD), as a clean input is.
    Computed in float32 like the sampler's own input; the caller casts to the model's dtype.
    """
    latent, count = latent.float(), latent.shape[0]
    if clean:
        smallest = torch.as_tensor(model_sampling.sigma_min).float().reshape(1)
        return latent, model_sampling.timestep(smallest).float().to(latent.device).expand(count)
    sigmas = torch.full((count,), float(sigma), device=latent.device, dtype=torch.float32)
    noisy = model_sampling.noise_scaling(sigmas, noise.to(latent), latent)
    return model_sampling.calculate_input(sigmas, noisy), model_sampling.timestep(sigmas).float()


@dataclass(frozen=True)
class FaceRows:
    """In an image call that carries the face rows: rows [0, image_rows) are the image's, in
    ``image_chunks`` order, the rest the references'; ``captured`` gets their h_f per layer."""

    image_rows: int
    image_chunks: list
    captured: dict


class FaceCapture:
    """attn2_patch: keeps each layer's normed face hidden states (the face call's, or the face rows')."""

    passes = frozenset({Pass.FACE_REFERENCE, Pass.IMAGE})

    def __init__(self, fusion: FaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        key = layer_key(extra_options)
        if key not in self.fusion.layers:
            return n, context, value
        captured, rows = extra_options.get(FACE_PASS), extra_options.get(FACE_ROWS)
        if captured is not None and pass_of(extra_options) is Pass.FACE_REFERENCE:
            captured[key] = n
        elif rows is not None and pass_of(extra_options) is Pass.IMAGE:
            rows.captured[key] = n[rows.image_rows:]
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
        # Eq. 7: a query inside any other person's region M_j (j != i) never sees this face,
        # also where it lies in this person's own region too (an overlap sees the text only).
        others = [m for j, m in enumerate(query_masks) if j != index and m is not None]
        if others:
            bias[:, torch.stack(others).any(0), columns] = float("-inf")
        if not identity.uncond:
            bias[uncond_rows, :, columns] = float("-inf")
    return bias


def _needs_bias(active: list[Identity]) -> bool:
    masked = len(active) > 1 and any(i.mask is not None for i in active)
    return masked or any(i.weight != 1.0 or not i.uncond for i in active)


def _widened(mask: torch.Tensor, face_columns: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Another processor's mask over the text keys, with zeros on the face keys, plus our bias."""
    widened = F.pad(mask.float(), (0, face_columns))
    if bias is None:
        return widened
    if widened.dim() == 4:  # (rows, heads, queries, keys)
        bias = bias.unsqueeze(1)
    return widened + bias


class FaceFusionProcessor:
    """Dispatcher processor on attn2: text keys plus every active person's face keys."""

    order = ORDER
    passes = frozenset({Pass.IMAGE})

    def __init__(self, fusion: FaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def cleanup(self) -> None:
        self.fusion.reported.clear()  # each run logs its face-pass path once

    def __call__(self, q, k, v, extra_options, attend):
        rows = extra_options.get(FACE_ROWS)
        if rows is None:
            return self._fused(q, k, v, extra_options, attend)
        # The face rows attend as the plain model, under the options a separate face call has;
        # the image rows, under their own chunks, read the face rows' K_f/V_f of this layer.
        images = rows.image_rows
        image_options = {**extra_options, "cond_or_uncond": rows.image_chunks}
        face_options = {key: value for key, value in extra_options.items() if key not in (FACE_ROWS, FACE_STATES)}
        face_options.update({"cond_or_uncond": [COND], PASS: Pass.FACE_REFERENCE})
        image = self._fused(q[:images], k[:images], v[:images], image_options, attend)
        faces = attend(q[images:], k[images:], v[images:], face_options)
        return torch.cat([image, faces])

    def _fused(self, q, k, v, extra_options, attend):
        states = extra_options.get(FACE_STATES)
        key = layer_key(extra_options)
        if not states or key is None:
            return attend(q, k, v, extra_options)
        if any(key not in captured for _, captured, _ in states):
            return attend(q, k, v, extra_options)
        text_tokens = k.shape[1]
        keys, values, face_tokens = [k], [v], []
        for identity, captured, start in states:
            h_f = captured[key][start:start + identity.latent.shape[0]]
            k_f, v_f = face_keys_values(identity, h_f, key, extra_options[UNET])
            keys.append(k_f.expand(q.shape[0], -1, -1).to(k.dtype))
            values.append(v_f.expand(q.shape[0], -1, -1).to(v.dtype))
            face_tokens.append(k_f.shape[1])
        k, v = torch.cat(keys, 1), torch.cat(values, 1)
        active = [identity for identity, _, _ in states]
        bias = None
        if _needs_bias(active):
            # The layer's own grid (odd sizes round up at each stride-2 step, down to 1x1).
            grid = extra_options.get("activations_shape", extra_options["original_shape"])
            query_masks = [None if i.mask is None else
                           mask_to_tokens(i.mask, grid, q.shape[1], device=q.device)[0] > 0.5 for i in active]
            uncond = row_mask(UNCOND, extra_options["cond_or_uncond"], q.shape[0], device=q.device)
            bias = fusion_bias(active, face_tokens, text_tokens, q.shape[1], query_masks, uncond)
        incoming = extra_options.get(ATTENTION_MASK)
        if incoming is not None:
            bias = _widened(incoming.to(q.device), sum(face_tokens), bias)
        if bias is None:
            # Nothing to mask: keep ComfyUI's unmasked (flash/memory-efficient) attention.
            return attend(q, k, v, extra_options)
        return attend(q, k, v, extra_options, mask=bias.to(q.dtype))


def apply_face_fusion(model, identity: Identity, layers: list[BlockKey]):
    """A clone of ``model`` that fuses ``identity``; chained calls add people to one patch."""
    import comfy.patcher_extension

    from ..shared.dispatch import dispatchers, patched_clone
    from ..shared.sigmas import model_sampling_of
    from .face_pass import FaceFusionWrapper, count_face_rows_in_estimate, per_step

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
    # Each wrapper holds the fusion it serves: a chained person replaces them all.
    kinds = comfy.patcher_extension.WrappersMP
    for kind, wrapper in ((kinds.CALC_COND_BATCH, per_step(fusion)),
                          (kinds.PREPARE_SAMPLING, count_face_rows_in_estimate(fusion)),
                          (wrapper_type, FaceFusionWrapper(fusion))):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return patched
