"""Face Fusion, training-free, on Flux.1 and SD3.5 (joint text + image attention).

The same method as face_kv_attention.py, where a DiT has it: the reference face's latent goes
through the model at the step's sigma (face_input's rule, the positive prompt), and in each joint
attention the face's image-token K/V (the block's own projections, after modulation, QK-norm and
RoPE: training-free) are concatenated to the call's keys and values:

    K' = [K_text; K_image; K_f1; …; K_fn],  V' = [V_text; V_image; V_f1; …; V_fn]   (Eq. 3, 6)

with the same weight (log(weight) on that person's face logits; 0 = no face) and multi-reference /
mask rules (Eq. 7: a query inside another person's mask never sees this face) on the DiT's token
grid, through fusion_bias. Text queries lie in no mask: they see every face. The trained
projections (Linear_kf/Linear_vf files) stay SD1.5/SDXL only.

The face pass is a model call of its own (an APPLY_MODEL wrapper; SD3.5's MMDiT calls no
DIFFUSION_MODEL wrapper), marked Pass.FACE_REFERENCE, so other Likeness patches leave it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..shared.dispatch import PASS, Pass, pass_of
from ..shared.joint_attention import JOINT_TOKENS, joint_tokens, patched_joint_clone, router_of
from ..shared.rows import COND, UNCOND, row_mask, rows_of
from ..shared.token_masks import mask_to_tokens
from .face_kv_attention import IMAGE_STREAM_KEYS, Identity, _needs_bias, face_input, fusion_bias
from .face_pass import POSITIVE, positive_prompt

FACE_KV = "likeness_joint_face_kv"  # face pass: dict the capture fills with (K_f, V_f) per block
FACE_STATES = "likeness_joint_face_states"  # image pass: [(identity, captured, first row)]
WRAPPER_KEY = "likeness_joint_face_fusion"
ORDER = 150  # after FFA (50): the face keys join the keys FFA leaves


@dataclass
class JointFaceFusion:
    identities: list[Identity]
    layers: set
    model_sampling: object = field(repr=False)

    def __deepcopy__(self, memo):
        return self

    def with_identity(self, identity: Identity) -> "JointFaceFusion":
        return replace(self, identities=[*self.identities, identity])


class JointFaceWrapper:
    """APPLY_MODEL wrapper: one face pass per group of references, then the image's call."""

    def __init__(self, fusion: JointFaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        sigma = float(t.flatten()[0])
        active = [i for i in self.fusion.identities if i.active(sigma)]
        if not active or c_crossattn is None or pass_of(transformer_options) is not Pass.IMAGE:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        row = (rows_of(COND, transformer_options.get("cond_or_uncond", [COND]), x.shape[0]) or [0])[0]
        positive = transformer_options.get(POSITIVE) or {}
        context = positive.get("c_crossattn", c_crossattn[row:row + 1])[:1].to(c_crossattn)
        per_row = {name: value[row:row + 1] for name, value in kwargs.items()
                   if torch.is_tensor(value) and value.shape[:1] == x.shape[:1]}
        if "y" in per_row and "y" in positive:
            per_row["y"] = positive["y"][:1].to(per_row["y"])
        net = executor.class_obj.diffusion_model
        options = {k: v for k, v in transformer_options.items() if k not in IMAGE_STREAM_KEYS}
        states, sampling = [], self.fusion.model_sampling
        for identity in active:
            # face_input's rule; at this level the model takes sigmas (its calculate_input is the identity for flow)
            faces, _ = face_input(sampling, identity.latent.to(x.device), identity.noise.to(x.device), sigma,
                                  identity.clean)
            count = faces.shape[0]
            face_sigma = float(sampling.sigma_min) if identity.clean else sigma
            captured: dict = {}
            executor(faces.to(x.dtype), t.new_full((count,), face_sigma), None, context.expand(count, -1, -1), None,
                     {**options, "cond_or_uncond": [COND], PASS: Pass.FACE_REFERENCE, FACE_KV: captured,
                      JOINT_TOKENS: joint_tokens(net, faces, context)},
                     **{**kwargs, **{name: value.expand(count, *value.shape[1:]) for name, value in per_row.items()}})
            states.append((identity, captured))
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, FACE_STATES: states}, **kwargs)


class JointFaceCapture:
    """In the face pass: keeps each chosen block's image-token K/V."""

    order = 0
    passes = frozenset({Pass.FACE_REFERENCE})

    def __init__(self, fusion: JointFaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def acts_on(self, key, options: dict) -> bool:
        return FACE_KV in options and key in self.fusion.layers

    def __call__(self, q, k, v, call, attend):
        image = call.tokens.image_slice()
        call.options[FACE_KV][call.key] = (k[:, :, image], v[:, :, image])
        return attend(q, k, v)


def face_bias(active: list[Identity], face_tokens: list[int], call, rows: int, keys: int, queries: int, device):
    """fusion_bias (Eq. 4 with Eq. 7) for a joint call: each person's mask on the image-token grid,
    placed among all queries (text queries lie in no mask)."""
    query_masks = []
    for identity in active:
        if identity.mask is None:
            query_masks.append(None)
            continue
        inside = torch.zeros(queries, dtype=torch.bool, device=device)
        grid = call.tokens.grid
        inside[call.tokens.image_slice()] = mask_to_tokens(identity.mask, grid, grid[0] * grid[1], device=device)[0] > 0.5
        query_masks.append(inside)
    uncond = row_mask(UNCOND, call.options["cond_or_uncond"], rows, device=device)
    return fusion_bias(active, face_tokens, keys, queries, query_masks, uncond)


class JointFaceFusionProcessor:
    """In the image pass: every active person's face K/V after the call's own keys."""

    order = ORDER
    passes = frozenset({Pass.IMAGE})

    def __init__(self, fusion: JointFaceFusion) -> None:
        self.fusion = fusion

    def __deepcopy__(self, memo):
        return self

    def acts_on(self, key, options: dict) -> bool:
        states = options.get(FACE_STATES)
        return bool(states) and all(key in captured for _, captured in states)

    def __call__(self, q, k, v, call, attend):
        rows = q.shape[0]
        keys, values, face_tokens = [k], [v], []
        for identity, captured in call.options[FACE_STATES]:
            k_f, v_f = captured[call.key]
            # References of one person line up one after another (Eq. 6).
            flat = lambda t: t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[-1]).expand(rows, -1, -1, -1)  # noqa: E731
            keys.append(flat(k_f).to(k.dtype))
            values.append(flat(v_f).to(v.dtype))
            face_tokens.append(k_f.shape[0] * k_f.shape[2])
        active = [identity for identity, _ in call.options[FACE_STATES]]
        k, v = torch.cat(keys, 2), torch.cat(values, 2)
        if not _needs_bias(active):
            return attend(q, k, v)
        bias = face_bias(active, face_tokens, call, rows, keys[0].shape[2], q.shape[2], q.device)
        return attend(q, k, v, bias.unsqueeze(1).to(q.dtype))


def hand_over_positive(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: every model call of this step carries the positive prompt, which the
    face pass reads (as on SD: face_pass.positive_prompt)."""
    found = positive_prompt(conds[0] if conds else None, timestep)
    if found is not None:
        model_options = {**model_options,
                         "transformer_options": {**model_options.get("transformer_options", {}), POSITIVE: found}}
    return executor(model, conds, x_in, timestep, model_options)


def apply_joint_face_fusion(model, identity: Identity, layers: list):
    """A clone of a DiT ``model`` that fuses ``identity``; chained calls add people to one patch."""
    import comfy.patcher_extension

    wrapper_type = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    existing = model.get_wrappers(wrapper_type, WRAPPER_KEY)
    if existing:
        fusion = existing[0].fusion.with_identity(identity)
        patched = model.clone()
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        router = router_of(patched)
        router.processors = [JointFaceFusionProcessor(fusion) if isinstance(p, JointFaceFusionProcessor) else
                             JointFaceCapture(fusion) if isinstance(p, JointFaceCapture) else p
                             for p in router.processors]
    else:
        fusion = JointFaceFusion([identity], {tuple(k) for k in layers}, model.get_model_object("model_sampling"))
        patched = patched_joint_clone(model, [JointFaceCapture(fusion), JointFaceFusionProcessor(fusion)])
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                     hand_over_positive)
    patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, JointFaceWrapper(fusion))
    return patched
