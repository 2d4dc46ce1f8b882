"""Face Fusion (training-free) on Flux.1 and SD3.5: the face pass's image-token K/V in every joint
attention, the weight and mask rules (Eq. 7) on the DiT's token grid."""

from __future__ import annotations

import math

import pytest
import torch

from tiny import tiny_dit


def build(name: str):
    if name == "flux":
        return tiny_dit.tiny_flux(), tiny_dit.flux_conditioning(guidance=3.5)
    return tiny_dit.tiny_sd3(), tiny_dit.sd3_conditioning()


def face_fusion(comfy, model, face, weight, mask=None, seed=0):
    inputs = {} if mask is None else {"mask": mask}
    kv = comfy.node_class("LikenessFaceFusion").define_schema().inputs[3].default
    return comfy.run_node("LikenessFaceFusion", model=model, face={"samples": face}, weight=weight, kv=kv,
                          start_percent=0.0, end_percent=1.0, face_noise="noised", noise_seed=seed, uncond=True,
                          **inputs)[0]


def sample(comfy, model, cond, size=(9, 13), cfg=1.0):
    latent = {"samples": torch.zeros(1, 16, *size)}
    (out,) = comfy.run_node("KSampler", model=model, seed=3, steps=3, cfg=cfg, sampler_name="euler",
                            scheduler="simple", positive=cond, negative=cond, latent_image=latent, denoise=1.0)
    return out["samples"]


def faces(count=1, seed=1, size=(6, 6)):
    return torch.randn(count, 16, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_weight_0_is_the_unpatched_model_bit_for_bit_and_the_input_model_is_kept(comfy, name):
    model, cond = build(name)
    plain = sample(comfy, model, cond, cfg=2.0)
    zero = sample(comfy, face_fusion(comfy, model, faces(), 0.0), cond, cfg=2.0)
    one = sample(comfy, face_fusion(comfy, model, faces(), 1.0), cond, cfg=2.0)
    assert torch.equal(zero, plain)
    assert (one - plain).abs().max() > 1e-3, "the face changed nothing"
    assert torch.equal(sample(comfy, model, cond, cfg=2.0), plain), "the input MODEL changed"


def test_every_joint_block_sees_the_face_keys(comfy):
    """The face pass's K/V reach every block of the tiny Flux (2 double, 2 single), references in a row."""
    joint = comfy.pack("attention.shared.joint_attention")
    model, cond = build("flux")
    patched = face_fusion(comfy, model, faces(2), 1.0)
    router = joint.router_of(patched)
    seen = []
    processor = next(p for p in router.processors if type(p).__name__ == "JointFaceFusionProcessor")
    original = processor.__call__.__func__

    class Spy(type(processor)):
        def __call__(self, q, k, v, call, attend):
            seen.append((call.key, k.shape[2], sum(c[call.key][0].shape[0] * c[call.key][0].shape[2]
                                                   for _, c in call.options["likeness_joint_face_states"])))
            return original(self, q, k, v, call, attend)

    processor.__class__ = Spy
    try:
        sample(comfy, patched, cond)
    finally:
        processor.__class__ = Spy.__mro__[1]
    keys = {key for key, _, _ in seen}
    assert keys == {("double", 0, 0), ("double", 1, 0), ("single", 0, 0), ("single", 1, 0)}
    # 2 references of a 6×6 latent: 2 · 3·3 face tokens per block
    assert {face for _, _, face in seen} == {18}


def hand_attention(q, k, v, bias):
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def test_weights_and_masks_against_a_hand_biased_softmax_on_one_joint_attention(comfy):
    """Two people, weights 0.5 and 2, masks on an odd 3×5 token grid: one joint attention call through
    the router (as ComfyUI's Flux calls it) against softmax(QKᵀ/√d + B)V with B written here: log w on
    each face's columns, −inf where a query lies in the other person's mask, text queries in no mask."""
    import comfy.ldm.modules.attention as comfy_attention

    joint = comfy.pack("attention.shared.joint_attention")
    module = comfy.pack("attention.face_fusion.joint_face_attention")
    face_kv = comfy.pack("attention.face_fusion.face_kv_attention")
    sigmas = comfy.pack("attention.shared.sigmas")
    torch.manual_seed(0)
    text, grid, heads, dim, rows = 4, (3, 5), 2, 8, 2
    queries = text + grid[0] * grid[1]
    q, k, v = (torch.randn(rows, heads, queries, dim) for _ in range(3))
    left = torch.zeros(24, 40)
    left[:, :16] = 1.0  # image columns 0-1 of 5 (40 px → 5 tokens of 8 px)
    left[:, 16:19] = 1.0  # and 3 of column 2's 8 px: 0.375 of it, under the 0.5 a token needs to count as inside
    right = torch.zeros(24, 40)
    right[8:, 24:] = 1.0  # rows 1-2, columns 3-4
    people = [face_kv.Identity(latent=torch.zeros(1), noise=torch.zeros(1), weight=w, sigma_range=sigmas.SigmaRange.always(),
                               mask=m) for w, m in ((0.5, left), (2.0, right))]
    refs = (1, 2)
    faces_kv = [(torch.randn(r, heads, 6, dim), torch.randn(r, heads, 6, dim)) for r in refs]
    key = ("double", 0, 0)
    states = [(person, {key: kv}) for person, kv in zip(people, faces_kv)]
    fusion = module.JointFaceFusion(people, {key}, None)
    router = joint.JointAttentionRouter()
    router.add(module.JointFaceFusionProcessor(fusion))
    options = {"optimized_attention_override": router, joint.JOINT_TOKENS: joint.JointTokens(text, grid),
               "block_type": "double", "block_index": 0, "cond_or_uncond": [1, 0], module.FACE_STATES: states}
    got = comfy_attention.optimized_attention(q, k, v, heads, skip_reshape=True, transformer_options=options)

    flat = lambda t: t.transpose(0, 1).reshape(1, heads, -1, dim).expand(rows, -1, -1, -1)  # noqa: E731
    keys = torch.cat([k] + [flat(kf) for kf, _ in faces_kv], 2)
    values = torch.cat([v] + [flat(vf) for _, vf in faces_kv], 2)
    bias = torch.zeros(queries, keys.shape[2])
    in_left = [text + r * 5 + c for r in range(3) for c in range(2)]
    in_right = [text + r * 5 + c for r in range(1, 3) for c in range(3, 5)]
    first = slice(queries, queries + 6)
    second = slice(queries + 6, queries + 18)
    bias[:, first] += math.log(0.5)
    bias[:, second] += math.log(2.0)
    bias[in_right, first] = float("-inf")
    bias[in_left, second] = float("-inf")
    expected = hand_attention(q, keys, values, bias)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # a query in the left mask puts no weight on the second face: its output is that of the keys without it
    no_second = torch.cat([keys[:, :, :queries + 6]], 2), values[:, :, :queries + 6]
    left_only = hand_attention(q, *no_second, bias[:, :queries + 6])
    assert torch.allclose(got[:, in_left], left_only[:, in_left], atol=1e-5)


def test_two_people_with_masks_on_an_odd_latent_sample(comfy):
    """Through the nodes, chained: two identities with masks on a 9×13 latent (5×7 tokens) run and differ
    from one identity alone."""
    model, cond = build("flux")
    left, right = torch.zeros(72, 104), torch.zeros(72, 104)
    left[:, :40] = 1.0
    right[:, 64:] = 1.0
    one = face_fusion(comfy, model, faces(seed=1), 1.0, left)
    two = face_fusion(comfy, one, faces(seed=2), 2.0, right, seed=1)
    a, b = sample(comfy, one, cond), sample(comfy, two, cond)
    assert torch.isfinite(b).all()
    # 0.35% measured; fp32 rounding of a different batch is ~1e-6 relative
    assert (a - b).abs().max() > 1e-3 * a.abs().max(), "the second person must change the result"
