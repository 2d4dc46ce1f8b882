"""Identities in regions: Infinite-ID's MASK (and chained people) and FFA's MASK on the real host."""

from __future__ import annotations

import math

import pytest
import torch

from harness.identity_stand_in import stand_in_identity
from harness.sampling import encode, txt2img_latent
from harness.workflows import TINY_FACE_PACK
from tiny import tiny_faceid, tiny_insightface, tiny_models

WEIGHT = 0.7  # an in-between weight: 0 and 1 are short-circuit points


@pytest.fixture(scope="module")
def modules(comfy):
    paths = {"infinite_id": "infinite_id.identity_streams", "dispatch": "shared.dispatch",
             "unet_layers": "shared.layer_table", "training": "shared.training_loop"}
    return {name: comfy.pack(f"attention.{path}") for name, path in paths.items()}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def person(modules, model, seed, mask=None, weight=WEIGHT):
    keys, kv, tokens = stand_in_identity(modules["unet_layers"], model, seed)
    settings = modules["infinite_id"].InfiniteID(tokens=tokens, uncond_tokens=torch.zeros_like(tokens), kv=kv,
                                                 weight=weight, mask=mask)
    return settings, keys


def patched(modules, model, *people):
    """``model`` with one Infinite-ID node per (settings, keys), chained in order."""
    for settings, keys in people:
        model = modules["infinite_id"].apply_infinite_id(model, settings, keys)
    return model


def denoised(comfy, modules, model, patched_model, clip, latent_hw=(8, 8)):
    """One batched cond+uncond x0 prediction, as a sampler makes it."""
    positive, negative = encode(comfy, clip, "a portrait photo"), encode(comfy, clip, "blurry")
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([500.0]))
    noisy = torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(2)) * sigma
    with torch.no_grad():
        return torch.cat(modules["training"].denoised_predictions(model, patched_model, [positive, negative], noisy,
                                                                  sigma))


def halves(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    left = torch.zeros(height, width)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


@pytest.mark.parametrize("merge", [True, False])
def test_restricted_cross_attention_by_hand(modules, merge):
    """The merge with a region, against softmax written out: queries inside get the image attention
    (stacked references' log-weights included) plus the text's when merging; queries outside get the
    text cross-attention exactly (bit for bit: the image part is an exact 0 added to the same call)."""
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    generator = torch.Generator().manual_seed(5)
    q, k_img, v_img, k_t, v_t = (torch.randn(2, n, 16, generator=generator) for n in (12, 6, 6, 7, 7))
    bias = torch.tensor([0.3] * 3 + [0.7] * 3).log()
    region = torch.arange(12) % 4 < 2
    options, attend = {"n_heads": 2}, dispatch.default_attention
    out = infinite_id.merged_cross_attention(q, k_img, v_img, k_t, v_t, options, attend, merge=merge, align=False,
                                             image_bias=bias, region=region)

    def by_hand(k, v, extra=None):
        split = lambda t: t.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
        logits = split(q) @ split(k).transpose(-1, -2) / 8 ** 0.5
        logits = logits if extra is None else logits + extra
        return (logits.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)

    image, text = by_hand(k_img, v_img, bias), by_hand(k_t, v_t)
    expected_inside = image + text if merge else image
    torch.testing.assert_close(out[:, region], expected_inside[:, region], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, ~region], attend(q, k_t, v_t, options)[:, ~region])
    torch.testing.assert_close(out[:, ~region], text[:, ~region], rtol=1e-5, atol=1e-5)


def test_mask_of_ones_is_no_mask_and_zeros_the_unpatched_model(comfy, modules, family):
    """Bit for bit: a mask of ones is 1 on the latent and on every grid, where the patch takes the
    unmasked path by design; zeros leave every step's identity stream out."""
    _, model, clip = family
    plain = txt2img_latent(comfy, model, clip)
    unmasked = txt2img_latent(comfy, patched(modules, model, person(modules, model, 1)), clip)
    ones = txt2img_latent(comfy, patched(modules, model, person(modules, model, 1, torch.ones(37, 53))), clip)
    assert torch.equal(ones, unmasked)
    zeros = txt2img_latent(comfy, patched(modules, model, person(modules, model, 1, torch.zeros(37, 53))), clip)
    assert torch.equal(zeros, plain)
    left, _ = halves(64, 64)
    half = txt2img_latent(comfy, patched(modules, model, person(modules, model, 1, left)), clip)
    for other in (plain, unmasked):
        assert (half - other).abs().max() > 1e-2 * other.abs().max()


def test_prediction_is_the_mask_blend_of_identity_and_text_streams(comfy, modules, tiny_checkpoints):
    """ε = ε_text + w·M·(ε_id − ε_text), M the mask on the latent grid, from separate runs of the
    unpatched model (ε_text) and of the unmasked patch at weight 1 (ε_id). The mask's values are all
    above 0.5, so no layer restricts its cross-attention and ε_id is the same stream."""
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    latent = torch.rand(8, 8, generator=torch.Generator().manual_seed(3)) * 0.45 + 0.55
    mask = latent.repeat_interleave(8, 0).repeat_interleave(8, 1)  # 8x8 pixel blocks: the latent is its mean
    text = denoised(comfy, modules, model, model, clip)
    identity = denoised(comfy, modules, model, patched(modules, model, person(modules, model, 1, weight=1.0)), clip)
    blended = denoised(comfy, modules, model, patched(modules, model, person(modules, model, 1, mask)), clip)
    expected = text + WEIGHT * latent * (identity - text)
    torch.testing.assert_close(blended, expected, rtol=1e-5, atol=1e-4)
    assert (blended - (text + WEIGHT * (identity - text))).abs().max() > 1e-2 * text.abs().max()


def test_chained_people_keep_both_identities(comfy, modules, family):
    """Two chained nodes = one text stream and each person's own stream: their prediction is
    single_A + single_B − text (neither overwrites the other), with complementary masks and without."""
    _, model, clip = family
    text = denoised(comfy, modules, model, model, clip, (9, 13))
    for masks in (halves(72, 104), (None, None)):
        a, b = person(modules, model, 1, masks[0]), person(modules, model, 2, masks[1], weight=0.4)
        single_a = denoised(comfy, modules, model, patched(modules, model, a), clip, (9, 13))
        single_b = denoised(comfy, modules, model, patched(modules, model, b), clip, (9, 13))
        both = denoised(comfy, modules, model, patched(modules, model, a, b), clip, (9, 13))
        torch.testing.assert_close(both, single_a + single_b - text, rtol=1e-5, atol=1e-4)
        for single in (single_a, single_b):
            assert (both - single).abs().max() > 1e-2 * single.abs().max()


def expected_grids(height: int, width: int, count: int) -> list[tuple[int, int]]:
    """The latent halved by stride-2 convolutions (odd sizes round up), by hand."""
    grids = [(height, width)]
    for _ in range(count - 1):
        grids.append((math.ceil(grids[-1][0] / 2), math.ceil(grids[-1][1] / 2)))
    return grids


def pure_columns(grid_width: int, pixels: int) -> tuple[set[int], set[int]]:
    """Grid columns whose pixels (area-averaged) lie wholly in the left half, and wholly in the right."""
    left, right = set(), set()
    for column in range(grid_width):
        start, end = math.floor(column * pixels / grid_width), math.ceil((column + 1) * pixels / grid_width)
        if end <= pixels // 2:
            left.add(column)
        if start >= pixels // 2:
            right.add(column)
    return left, right


@pytest.mark.parametrize("latent_hw", [(8, 8), (9, 13)])
def test_two_people_in_two_halves_see_only_their_own_tokens(comfy, modules, family, monkeypatch, latent_hw):
    """A spy computes every identity stream's image attention weights by hand (softmax of q·kᵀ/√d
    plus the patch's mask): in each person's stream a query in the other person's half gives its
    image tokens exactly 0 (and person B's tokens never enter A's stream); a query in its own half
    gives them all its attention. Every layer is seen, at the grid the latent's halvings give."""
    kind, model, clip = family
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    pixels_h, pixels_w = latent_hw[0] * 8, latent_hw[1] * 8
    left, right = halves(pixels_h, pixels_w)
    a, keys = person(modules, model, 1, left)
    b, _ = person(modules, model, 2, right)
    tokens = a.tokens.shape[1]
    seen = []
    original = dispatch.default_attention

    def spy(q, k, v, extra_options, mask=None):
        owner = extra_options.get(infinite_id.ACTIVE_IDENTITY)
        if owner is not None and mask is not None and k.shape[1] == tokens + 1:
            heads = extra_options["n_heads"]
            split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
            logits = split(q).float() @ split(k).float().transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
            weights = (logits + mask.float().unsqueeze(1)).softmax(-1)  # (rows, heads, queries, keys)
            block = extra_options["block"]
            seen.append((owner, (block[0], block[1], extra_options.get("block_index", 0)), weights, k[:, :tokens]))
        return original(q, k, v, extra_options, mask)

    monkeypatch.setattr(dispatch, "default_attention", spy)
    both = patched(modules, model, (a, keys), (b, keys))
    denoised(comfy, modules, model, both, clip, latent_hw)
    assert {id(owner) for owner, *_ in seen} == {id(a), id(b)}
    grids = expected_grids(*latent_hw, 4)
    for settings, own_tokens, own_side in ((a, a.tokens, 0), (b, b.tokens, 1)):
        calls = [(key, w, k) for owner, key, w, k in seen if owner is settings]
        # a half mask restricts every layer (a 1x1 grid averages 0.5: outside both halves)
        assert {key for key, *_ in calls} == set(keys), kind
        for key, weights, k_img in calls:
            queries = weights.shape[2]
            grid = next(g for g in grids if g[0] * g[1] == queries)
            # the stream's image keys are its own person's tokens, never the other's
            own_k = own_tokens @ settings.kv[key][0].T
            # (cond rows: this person's tokens; uncond rows: the "no face" tokens, zeros here)
            own_rows = [torch.allclose(row, own_k[0].to(row), rtol=1e-4, atol=1e-4) for row in k_img]
            assert any(own_rows) and all(own or not row.any() for own, row in zip(own_rows, k_img))
            sides = pure_columns(grid[1], pixels_w)
            columns = torch.arange(queries) % grid[1]
            inside = torch.tensor([int(c) in sides[own_side] for c in columns])
            outside = torch.tensor([int(c) in sides[1 - own_side] for c in columns])
            image, null = weights[..., :tokens], weights[..., tokens]
            assert outside.any() or grid[1] == 1, (key, grid)
            assert torch.equal(image[:, :, outside], torch.zeros_like(image[:, :, outside])), (key, grid)
            assert torch.equal(null[:, :, outside], torch.ones_like(null[:, :, outside]))
            assert torch.equal(null[:, :, inside], torch.zeros_like(null[:, :, inside]))
            torch.testing.assert_close(image[:, :, inside].sum(-1), torch.ones_like(null[:, :, inside]))
    assert len({key for _, key, *_ in seen}) == len(keys)


# ---- FFA's mask -------------------------------------------------------------------------------------------

FFA_STEPS = 10


def invert(comfy, model, cond, samples, precision="fp16"):
    return comfy.run_node("LikenessInvert", model=model, conditioning=cond, latent={"samples": samples},
                          steps=FFA_STEPS, capture="qkv", layers="all", cache_on="auto", precision=precision)


def ffa(comfy, model, content, style, mask=None, alpha=0.8, beta=0.2, temperature=1.0):
    extra = {} if mask is None else {"mask": mask}
    return comfy.run_node("LikenessFeatureFusionAttention", model=model, content=content, style=style,
                          alpha=alpha, beta=beta, temperature=temperature, layers="all", style_index=1,
                          start_percent=0.0, end_percent=1.0, **extra)[0]


def regenerate(comfy, model, z_t, cond):
    (out,) = comfy.run_node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=FFA_STEPS,
                            cfg=1.0, sampler_name="euler", scheduler="ddim_uniform", positive=cond, negative=cond,
                            latent_image={"samples": z_t}, start_at_step=0, end_at_step=10000,
                            return_with_leftover_noise="disable")
    return out["samples"]


@pytest.fixture(scope="module")
def inverted(comfy, family, tiny_checkpoints):
    """Content (image 0) and style (image 1) inverted together on the calm model (as test_magicstyle),
    a model loaded for these tests: the calm weights stay patched into the module it loads."""
    from harness.calm import calm

    name = family[0]
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[name])
    model, empty = calm(model, 1e-3), encode(comfy, clip, "")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z_t, features = invert(comfy, model, empty, latents)
    return name, model, empty, z_t["samples"][:1], features


def test_ffa_mask_of_ones_is_no_mask_and_zeros_the_unpatched_model(comfy, inverted):
    """Bit for bit: ones cover every grid, where FFA takes its unmasked path by design; zeros leave
    every layer as it is (the patch built directly: the node refuses a mask of all 0)."""
    name, model, empty, z_t, features = inverted
    ffa_module, schedule = comfy.pack("attention.magicstyle.ffa"), comfy.pack("attention.shared.sigmas")
    content = features.select(0, 1)
    plain = regenerate(comfy, model, z_t, empty)
    unmasked = regenerate(comfy, ffa(comfy, model, content, features), z_t, empty)
    ones = regenerate(comfy, ffa(comfy, model, content, features, torch.ones(1, 29, 41)), z_t, empty)
    assert torch.equal(ones, unmasked)
    fusion = ffa_module.FeatureFusion(content, features, style_index=1, alpha=0.8, beta=0.2, temperature=1.0,
                                      layers=list(content.layers), sigma_range=schedule.SigmaRange.always(),
                                      model_sampling=schedule.model_sampling_of(model), mask=torch.zeros(29, 41))
    assert torch.equal(regenerate(comfy, ffa_module.apply_ffa(model, fusion), z_t, empty), plain)
    left, _ = halves(64, 64)
    half = regenerate(comfy, ffa(comfy, model, content, features, left[None]), z_t, empty)
    for other in (plain, unmasked):
        assert (half - other).abs().max() > 1e-2 * (unmasked - plain).abs().max(), name
    with pytest.raises(ValueError, match="mask"):
        ffa(comfy, model, content, features, torch.zeros(1, 8, 8))


@pytest.mark.parametrize("alpha, beta, temperature", [(0.7, 0.45, 1.3)])
def test_ffa_mask_outside_attends_as_without_ffa_and_inside_as_with_it(comfy, inverted, monkeypatch,
                                                                       alpha, beta, temperature):
    """At one layer inside a real model call, against a hand computation from the layer's own
    to_q/to_k/to_v/to_out and the cached states: queries in the left half (the mask) give FFA's
    output (Algorithm 1 / Eq. 5), queries in the right half plain self-attention of the current
    hidden states."""
    name, model, empty, _, features = inverted
    layers, training = comfy.pack("attention.shared.layer_table"), comfy.pack("attention.shared.training_loop")
    unet = layers.diffusion_model_of(model)
    key = {"sd15": ("output", 4, 0), "sdxl": ("input", 8, 3)}[name]
    block = layers.transformer_block(unet, key)
    left, _ = halves(64, 64)
    patched_model = ffa(comfy, model, features.select(0, 1), features, left[None], alpha, beta, temperature)
    recorded = {}
    keep = lambda name: lambda m, a, out: recorded.setdefault(name, out.detach().clone())  # noqa: E731
    hooks = [block.norm1.register_forward_hook(keep("n")), block.attn1.to_out.register_forward_hook(keep("out"))]
    sigma = torch.tensor([features.sigmas[3]])
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21)) * sigma
    try:
        with torch.no_grad():
            training.denoised_predictions(model, patched_model, [empty], noisy, sigma)
    finally:
        for hook in hooks:
            hook.remove()

    stored = features.get(model.get_model_object("model_sampling").timestep(sigma), key)
    scale = (lambda i: 1.0) if stored.scale is None else (lambda i: stored.scale[i])  # fp16: none; fp8: per image
    h_c, h_s = stored.values[0:1].float() * scale(0), stored.values[1:2].float() * scale(1)
    n, attn = recorded["n"].float(), block.attn1
    w_q, w_k, w_v = (getattr(attn, p).weight.float() for p in ("to_q", "to_k", "to_v"))
    heads, dim = attn.heads, attn.dim_head
    split = lambda t: t.unflatten(-1, (heads, dim)).transpose(1, 2)  # noqa: E731

    def attention(q, k, v, scale=1.0):
        weights = (split(q) @ split(k).transpose(-1, -2) * scale / dim ** 0.5).softmax(-1)
        return attn.to_out[0]((weights @ split(v)).transpose(1, 2).flatten(2))

    v_c, v_s = h_c @ w_v.T, h_s @ w_v.T
    c_mean, s_mean = v_c.mean(1, keepdim=True), v_s.mean(1, keepdim=True)
    c_std = ((v_c - c_mean) ** 2).mean(1, keepdim=True).sqrt()
    s_std = ((v_s - s_mean) ** 2).mean(1, keepdim=True).sqrt()
    fused_v = torch.cat([(v_c - c_mean) / (c_std + 1e-5) * s_std + s_mean, v_s], 1)
    with_ffa = attention(alpha * (h_c @ w_q.T) + beta * (n @ w_q.T), torch.cat([h_c @ w_k.T, h_s @ w_k.T], 1),
                         fused_v, temperature)
    without = attention(n @ w_q.T, n @ w_k.T, n @ w_v.T)
    width = round(n.shape[1] ** 0.5)  # an 8x8 latent: square grids
    inside = torch.arange(n.shape[1]) % width < width // 2
    out = recorded["out"].float()
    torch.testing.assert_close(out[:, inside], with_ffa[:, inside], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out[:, ~inside], without[:, ~inside], rtol=2e-4, atol=2e-4)
    assert (with_ffa - without)[:, ~inside].abs().max() > 1e-2 * without.abs().max()
    assert (with_ffa - without)[:, inside].abs().max() > 1e-2 * without.abs().max()


# ---- the LikenessInfiniteID node's mask, with the adapter's LoRA -------------------------------------------

@pytest.fixture(scope="module")
def face_parts(comfy, base_directory):
    tiny_insightface.write_pack(base_directory / "models" / "insightface", TINY_FACE_PACK)
    (analysis,) = comfy.run_node("LikenessFaceAnalysis", model_name=TINY_FACE_PACK, provider="CPU")
    path = tiny_models.write_clip_vision(base_directory / "models" / "clip_vision")
    (clip_vision,) = comfy.run_node("CLIPVisionLoader", clip_name=path.name)
    import skimage.data

    photo = torch.from_numpy(skimage.data.astronaut()).float()[None] / 255
    return analysis, clip_vision, torch.cat([photo, photo.flip(2)])


def node(comfy, model, adapter, face_parts, image, **overrides):
    analysis, clip_vision, _ = face_parts
    settings = dict(weight=WEIGHT, mixed_attention=True, cross_attention_merge=True, adain_mean=False,
                    mix_weights="", shortcut_scale=1.0, start_percent=0.0, end_percent=1.0)
    settings.update(overrides)
    return comfy.run_node("LikenessInfiniteID", model=model, id_adapter=adapter, analysis=analysis,
                          clip_vision=clip_vision, image=image, **settings)[0]


def test_two_chained_nodes_with_masks_keep_each_persons_stream_and_lora(comfy, modules, family, base_directory,
                                                                      face_parts):
    """Through the node, with the adapter's FaceID LoRA on each identity stream: two chained people
    in complementary halves predict single_A + single_B − text (each stream with its own LoRA and
    tokens only); a mask of all 0 or a batch of masks is refused by name."""
    kind, model, clip = family
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / f"tiny_faceid_{kind}.safetensors", kind)
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    assert adapter.lora
    images = face_parts[2]
    left, right = halves(72, 104)
    text = denoised(comfy, modules, model, model, clip, (9, 13))
    single_a = denoised(comfy, modules, model, node(comfy, model, adapter, face_parts, images[:1], mask=left[None]),
                        clip, (9, 13))
    # B's LoRA at another scale: a stream running the other person's LoRA would show
    single_b = denoised(comfy, modules, model, node(comfy, model, adapter, face_parts, images[1:], mask=right,
                                                    weight=1.2, lora_scale=0.5), clip, (9, 13))
    chained = node(comfy, node(comfy, model, adapter, face_parts, images[:1], mask=left[None]), adapter, face_parts,
                   images[1:], mask=right, weight=1.2, lora_scale=0.5)
    both = denoised(comfy, modules, model, chained, clip, (9, 13))
    torch.testing.assert_close(both, single_a + single_b - text, rtol=1e-5, atol=1e-4)
    for single in (single_a, single_b):
        assert (both - single).abs().max() > 1e-2 * single.abs().max()
    with pytest.raises(ValueError, match="mask"):
        node(comfy, model, adapter, face_parts, images[:1], mask=torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="mask"):
        node(comfy, model, adapter, face_parts, images[:1], mask=torch.ones(2, 16, 16))
