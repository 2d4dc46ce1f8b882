"""Infinite-ID's attention (Eq. 5–8) and two-stream patch on the real host."""

from __future__ import annotations

import pytest
import torch

from harness.identity_stand_in import stand_in_identity
from harness.sampling import encode, txt2img_latent


@pytest.fixture(scope="module")
def modules(comfy):
    paths = {"infinite_id": "infinite_id.identity_streams", "dispatch": "shared.dispatch",
             "unet_layers": "shared.layer_table", "adain": "shared.adain", "tokens": "infinite_id.identity_tokens"}
    return {name: comfy.pack(f"attention.{path}") for name, path in paths.items()}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def stand_in_adapter(modules, model, seed=0, tokens=4):
    return stand_in_identity(modules["unet_layers"], model, seed, tokens)


def patched(modules, model, tokens, kv, keys, **settings):
    infinite_id = modules["infinite_id"]
    config = infinite_id.InfiniteID(tokens=tokens, uncond_tokens=torch.zeros_like(tokens), kv=kv, **settings)
    return infinite_id.apply_infinite_id(model, config, keys)


def test_mixed_attention_with_identical_streams_is_plain_self_attention(modules):
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 32) for _ in range(3))
    options = {"n_heads": 4}
    plain = dispatch.default_attention(q, k, v, options)
    mixed = infinite_id.mixed_attention(q, k, v, k, v, options, dispatch.default_attention, mixed=True, align=False)
    assert torch.allclose(mixed, plain, atol=1e-5)
    aligned = infinite_id.mixed_attention(q, k, v, k, v, options, dispatch.default_attention, mixed=True, align=True)
    assert torch.allclose(aligned, plain, atol=1e-5)


def test_adain_mean_moves_the_token_mean_only(modules):
    adain = modules["adain"]
    torch.manual_seed(1)
    x, y = torch.randn(2, 50, 8) * 3 + 1, torch.randn(2, 30, 8) - 4
    out = adain.adain_mean(x, y)
    assert torch.allclose(out.mean(1), y.mean(1), atol=1e-5)
    assert torch.allclose(out - out.mean(1, keepdim=True), x - x.mean(1, keepdim=True), atol=1e-5)


def test_cross_attention_merge_adds_the_text_attention(modules):
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    torch.manual_seed(2)
    q, k_img, v_img, k_t, v_t = (torch.randn(1, n, 16) for n in (9, 4, 4, 7, 7))
    options = {"n_heads": 2}
    attend = dispatch.default_attention
    merged = infinite_id.merged_cross_attention(q, k_img, v_img, k_t, v_t, options, attend, merge=True, align=False)
    assert torch.allclose(merged, attend(q, k_img, v_img, options) + attend(q, k_t, v_t, options), atol=1e-6)
    alone = infinite_id.merged_cross_attention(q, k_img, v_img, k_t, v_t, options, attend, merge=False, align=False)
    assert torch.allclose(alone, attend(q, k_img, v_img, options))


def test_weight_zero_is_the_text_only_model(comfy, modules, family):
    _, model, clip = family
    keys, kv, tokens = stand_in_adapter(modules, model)
    plain = txt2img_latent(comfy, model, clip)
    assert torch.equal(txt2img_latent(comfy, patched(modules, model, tokens, kv, keys, weight=0.0), clip), plain)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_identity_stream_changes_the_image_and_leaves_the_model_alone(comfy, modules, family, cfg):
    _, model, clip = family
    keys, kv, tokens = stand_in_adapter(modules, model)
    plain = txt2img_latent(comfy, model, clip, cfg=cfg)
    for settings in ({}, {"adain_mean": True}, {"mixed_attention": False, "cross_attention_merge": False}):
        out = txt2img_latent(comfy, patched(modules, model, tokens, kv, keys, **settings), clip, cfg=cfg)
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-2 * plain.abs().max(), settings
    assert torch.equal(txt2img_latent(comfy, model, clip, cfg=cfg), plain)


def test_mixing_weights_one_zero_give_the_single_identity(comfy, modules, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    keys, kv, first = stand_in_adapter(modules, model, seed=1)
    _, _, second = stand_in_adapter(modules, model, seed=2)
    mix = modules["tokens"].mix_identities
    single = txt2img_latent(comfy, patched(modules, model, first, kv, keys), clip)
    mixed = txt2img_latent(comfy, patched(modules, model, mix([first, second], [1.0, 0.0]), kv, keys), clip)
    assert torch.equal(mixed, single)
    halfway = txt2img_latent(comfy, patched(modules, model, mix([first, second], [0.5, 0.5]), kv, keys), clip)
    assert (halfway - single).abs().max() > 1e-2 * single.abs().max()
    with pytest.raises(ValueError, match="mixing weights"):
        mix([first, second], [0.0, 0.0])


def hand_attention(q, k, v, heads, bias=None):
    """softmax(q·kᵀ/√d + bias)·v per head, written out: the expected value of the tests below."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)


def hand_adain_mean(x, y):
    return x - x.mean(1, keepdim=True) + y.mean(1, keepdim=True)


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("align", [False, True])
def test_mixed_attention_on_unequal_streams_by_hand(modules, mixed, align):
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    generator = torch.Generator().manual_seed(3)
    q, k_id, v_id = (torch.randn(2, 12, 16, generator=generator) for _ in range(3))
    k_t, v_t = (torch.randn(2, 12, 16, generator=generator) * 2 + 1 for _ in range(2))
    got = infinite_id.mixed_attention(q, k_id, v_id, k_t, v_t, {"n_heads": 2}, dispatch.default_attention,
                                      mixed=mixed, align=align)
    if align:
        k_id, v_id = hand_adain_mean(k_id, k_t), hand_adain_mean(v_id, v_t)
    keys, values = (torch.cat([k_id, k_t], 1), torch.cat([v_id, v_t], 1)) if mixed else (k_id, v_id)
    torch.testing.assert_close(got, hand_attention(q, keys, values, 2), rtol=1e-5, atol=1e-5)
    alone = hand_attention(q, k_id, v_id, 2)
    if mixed:  # the text stream's keys really take part
        assert (got - alone).abs().max() > 1e-2 * alone.abs().max()


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("align", [False, True])
def test_cross_attention_merge_on_unequal_streams_by_hand(modules, merge, align):
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 9, 16, generator=generator)
    k_img, v_img = (torch.randn(1, 4, 16, generator=generator) - 1 for _ in range(2))
    k_t, v_t = (torch.randn(1, 7, 16, generator=generator) * 3 for _ in range(2))
    got = infinite_id.merged_cross_attention(q, k_img, v_img, k_t, v_t, {"n_heads": 2}, dispatch.default_attention,
                                             merge=merge, align=align)
    if align:
        k_img, v_img = hand_adain_mean(k_img, k_t), hand_adain_mean(v_img, v_t)
    expected = hand_attention(q, k_img, v_img, 2) + (hand_attention(q, k_t, v_t, 2) if merge else 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_stacked_identities_are_attention_over_all_their_tokens(modules):
    """A.7: two people's 4 tokens each, stacked: attention over the 8 tokens, each person's share
    following its weight; not the same as attending to their averaged tokens."""
    infinite_id, dispatch = modules["infinite_id"], modules["dispatch"]
    generator = torch.Generator().manual_seed(5)
    first, second = (torch.randn(1, 4, 16, generator=generator) for _ in range(2))
    q = torch.randn(1, 10, 16, generator=generator)
    w_k, w_v = (torch.randn(16, 16, generator=generator) / 4 for _ in range(2))
    options = {"n_heads": 2}

    def image_attention(tokens, bias):
        return infinite_id.merged_cross_attention(q, tokens @ w_k.T, tokens @ w_v.T, None, None, options,
                                                  dispatch.default_attention, merge=False, align=False,
                                                  image_bias=bias)

    tokens, bias = modules["tokens"].stack_identities([first, second], [1.0, 1.0])
    assert tokens.shape == (1, 8, 16) and bias is None
    both = torch.cat([first, second], 1)
    equal = image_attention(tokens, bias)
    torch.testing.assert_close(equal, hand_attention(q, both @ w_k.T, both @ w_v.T, 2), rtol=1e-5, atol=1e-5)

    tokens, bias = modules["tokens"].stack_identities([first, second], [0.7, 0.3])
    weighted = image_attention(tokens, bias)
    log_weights = torch.tensor([0.7] * 4 + [0.3] * 4).log()
    torch.testing.assert_close(weighted, hand_attention(q, both @ w_k.T, both @ w_v.T, 2, log_weights),
                               rtol=1e-5, atol=1e-5)
    mean = modules["tokens"].mix_identities([first, second], [0.7, 0.3])
    averaged = image_attention(mean, None)
    assert (weighted - averaged).abs().max() > 1e-2 * averaged.abs().max()
    assert (weighted - equal).abs().max() > 1e-2 * equal.abs().max()


def denoised(comfy, model, patched, clip, timestep=500.0):
    """One batched cond+uncond prediction of ``patched`` (x0 of each), as a sampler makes it."""
    training = comfy.pack("attention.shared.training_loop")
    positive, negative = encode(comfy, clip, "a portrait photo"), encode(comfy, clip, "blurry")
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([timestep]))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma
    with torch.no_grad():
        return training.denoised_predictions(model, patched, [positive, negative], noisy, sigma)


def test_weight_half_is_halfway_between_text_only_and_the_identity_stream(comfy, modules, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    keys, kv, tokens = stand_in_adapter(modules, model)
    text_only = denoised(comfy, model, model, clip)
    full = denoised(comfy, model, patched(modules, model, tokens, kv, keys, weight=1.0), clip)
    half = denoised(comfy, model, patched(modules, model, tokens, kv, keys, weight=0.5), clip)
    for t, f, h in zip(text_only, full, half):
        torch.testing.assert_close(h, 0.5 * t + 0.5 * f, rtol=1e-5, atol=1e-4)
    # (the uncond rows read "no face": zero tokens here, which leave them at the text stream's value)
    assert (full[0] - text_only[0]).abs().max() > 1e-2 * text_only[0].abs().max()


def test_uncond_rows_read_the_no_face_tokens_and_never_the_identitys(comfy, modules, tiny_checkpoints, monkeypatch):
    infinite_id = modules["infinite_id"]
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    keys, kv, tokens = stand_in_adapter(modules, model)
    no_face = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(8))
    settings = infinite_id.InfiniteID(tokens=tokens, uncond_tokens=no_face, kv=kv)
    seen = []
    original = infinite_id.merged_cross_attention

    def spy(q, k_img, v_img, k_t, v_t, extra_options, attend, **kwargs):
        seen.append((list(extra_options["cond_or_uncond"]), k_img.clone(), extra_options["block"],
                     extra_options.get("block_index", 0)))
        return original(q, k_img, v_img, k_t, v_t, extra_options, attend, **kwargs)

    monkeypatch.setattr(infinite_id, "merged_cross_attention", spy)
    monkeypatch.setattr(model.model, "memory_required", lambda *a, **k: float("inf"))  # cond, uncond: separate calls
    denoised(comfy, model, infinite_id.apply_infinite_id(model, settings, keys), clip)
    layouts = {tuple(c) for c, *_ in seen}
    assert layouts == {(0,), (1,)}, layouts
    for cond_or_uncond, k_img, block, index in seen:
        w_k = kv[(block[0], block[1], index)][0]
        expected = (no_face if cond_or_uncond == [1] else tokens) @ w_k.T
        other = (tokens if cond_or_uncond == [1] else no_face) @ w_k.T
        torch.testing.assert_close(k_img, expected.expand_as(k_img), rtol=1e-5, atol=1e-5)
        assert (k_img - other).abs().max() > 1e-2 * other.abs().max()


def test_the_identity_stream_acts_only_inside_its_window(comfy, modules, tiny_checkpoints, monkeypatch):
    infinite_id = modules["infinite_id"]
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    keys, kv, tokens = stand_in_adapter(modules, model)
    sampling = model.get_model_object("model_sampling")
    schedule = comfy.pack("attention.shared.sigmas")
    streams = []
    original = infinite_id.InfiniteIDWrapper.__call__

    def spy(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        def counting(*args, **kw):
            # A call holding every stream's rows (the default) counts as the streams it holds.
            rows = args[5].get("likeness_infinite_id_stream_rows")
            held = 1 if rows is None else 1 + len(rows.identities)
            streams.extend([float(transformer_options["sigmas"][0])] * held)
            return executor(*args, **kw)
        counting.class_obj = getattr(executor, "class_obj", None)
        return original(self, counting, x, timesteps, context, y, control, transformer_options, **kwargs)

    monkeypatch.setattr(infinite_id.InfiniteIDWrapper, "__call__", spy)
    plain = txt2img_latent(comfy, model, clip, steps=4)
    window = schedule.SigmaRange.from_percent(sampling, 0.0, 0.6)
    streams.clear()
    out = txt2img_latent(comfy, patched(modules, model, tokens, kv, keys, sigma_range=window), clip, steps=4)
    calls = {}
    for sigma in streams:
        calls[sigma] = calls.get(sigma, 0) + 1
    assert calls and all(window.contains(s) == (n == 2) for s, n in calls.items()), calls
    assert any(n == 1 for n in calls.values()) and any(n == 2 for n in calls.values()), calls
    assert (out - plain).abs().max() > 1e-2 * plain.abs().max()
    # A window no step falls in: the unpatched model exactly.
    empty = schedule.SigmaRange(sigma_start=1e-6, sigma_end=1e-7)
    assert torch.equal(txt2img_latent(comfy, patched(modules, model, tokens, kv, keys, sigma_range=empty), clip,
                                      steps=4), plain)
