"""MagicStyle on the real host: inversion, feature cache, FFA, save/load."""

from __future__ import annotations

import pytest
import torch

from harness import cache_measure
from harness.calm import calm
from harness.sampling import encode

STEPS = 10
CALM = 1e-3  # output scale of the well-behaved UNet (harness/calm.py)


def ksampler_advanced(comfy, model, latent, cond, steps=STEPS, cfg=1.0, sampler="euler", negative=None):
    """The forward pass MagicStyle uses: core KSamplerAdvanced, no added noise."""
    (out,) = comfy.run_node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=steps,
                            cfg=cfg, sampler_name=sampler, scheduler="ddim_uniform", positive=cond,
                            negative=negative or cond, latent_image=latent, start_at_step=0, end_at_step=10000,
                            return_with_leftover_noise="disable")
    return out["samples"]


def invert(comfy, model, cond, samples, capture="qkv", layers="all", steps=STEPS, cache_on="auto", precision="fp8"):
    return comfy.run_node("LikenessInvert", model=model, conditioning=cond, latent={"samples": samples},
                          steps=steps, capture=capture, layers=layers, cache_on=cache_on, precision=precision)


def ffa(comfy, model, content, style, alpha=0.8, beta=0.2, **overrides):
    settings = dict(temperature=1.0, layers="all", style_index=0, start_percent=0.0, end_percent=1.0)
    settings.update(overrides)
    return comfy.run_node("LikenessFeatureFusionAttention", model=model, content=content, style=style,
                          alpha=alpha, beta=beta, **settings)[0]


def random_latents(count, seed=0, size=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 4, size, size, generator=generator)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, encode(comfy, clip, ""), clip


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    return model, encode(comfy, clip, ""), clip


@pytest.fixture(scope="module")
def inverted(comfy, family):
    """Content (image 0) and style (image 1) inverted together on the calm model."""
    name, model, empty, _ = family
    calm_model = calm(model, CALM)
    latents = random_latents(2)
    # fp16: the exactness invariants below hold to rounding; fp8 moves the states by its step size
    z_t, features = invert(comfy, calm_model, empty, latents, precision="fp16")
    return name, calm_model, empty, latents, z_t["samples"], features


@pytest.mark.parametrize("steps", [STEPS, 30])  # 30: ddim_uniform gives 31 sigmas
def test_inversion_plumbing_round_trips_with_a_known_smooth_eps(comfy, family, steps):
    """A constant ε isolates the schedule: flipped sigmas, the extra σ_N step,
    noise scaling. Any off-by-one there is an error of order ε·σ."""
    _, model, empty, _ = family
    known = model.clone()

    def constant_eps(apply_model, args):  # returns the denoised x0 for ε = 0.3
        sigma = args["timestep"].view(-1, 1, 1, 1)
        return args["input"] - sigma * 0.3

    known.set_model_unet_function_wrapper(constant_eps)
    latents = random_latents(2, seed=3)
    z_t, _ = invert(comfy, known, empty, latents, capture="none", steps=steps)
    assert (z_t["samples"] - latents).abs().max() > 1.0, "inversion must move the latent"
    # What remains is FlipSigmas' floor: inversion starts at σ=1e-4, not 0,
    # so ε·1e-4 in model space (/ the latent scale factor, ~0.13-0.18, here).
    assert torch.allclose(ksampler_advanced(comfy, known, z_t, empty, steps=steps), latents, atol=3e-4)


def test_invert_then_regenerate_returns_the_latent(comfy, inverted):
    name, model, empty, latents, z_t, _ = inverted
    reconstructed = ksampler_advanced(comfy, model, {"samples": z_t}, empty)
    error = (reconstructed - latents).abs().max().item()
    # The real UNet (every attention layer live, only its output scaled down)
    # adds DDIM inversion's own error: ε at σ_{i-1} stands in for ε at σ_i.
    assert error < 0.01, f"{name}: round trip off by {error}"


def test_cache_has_steps_times_layers_entries_by_timestep(comfy, inverted):
    name, model, _, _, _, features = inverted
    layers = {"sd15": 16, "sdxl": 70}[name]
    assert len(features.layers) == layers
    assert len(features.features) == STEPS * layers
    assert len(set(features.timesteps)) == STEPS
    assert features.timesteps == sorted(features.timesteps, reverse=True)
    # the forward pass's first step (σ_N) is there, the inversion's σ_0 is not
    sampling = model.get_model_object("model_sampling")
    assert features.timesteps[0] == round(float(sampling.timestep(torch.tensor(features.sigmas[0]))), 3)
    assert 0.0 not in features.timesteps
    for stored in features.features.values():
        assert stored.values.dtype == torch.float16 and stored.values.shape[0] == 2 and stored.scale is None


def test_ffa_with_alpha_1_beta_0_and_style_equal_content_is_the_plain_reconstruction(comfy, inverted):
    name, model, empty, _, z_t, features = inverted
    content, style = features.select(0, 1), features.select(1, 1)
    start = {"samples": z_t[:1]}
    plain = ksampler_advanced(comfy, model, start, empty)
    same = ksampler_advanced(comfy, ffa(comfy, model, content, content, alpha=1.0, beta=0.0), start, empty)
    styled = ksampler_advanced(comfy, ffa(comfy, model, content, style), start, empty)
    identity_gap = (same - plain).abs().max().item()
    style_gap = (styled - plain).abs().max().item()
    assert identity_gap < 1e-4, f"{name}: {identity_gap}"
    assert style_gap > 50 * identity_gap, f"{name}: FFA with a real style changed only {style_gap}"


def test_ffa_processor_is_the_formula_written_out(comfy):
    """Eq. 5 with a plain softmax written here (AdaIN as hand_adain below): the dispatcher processor
    given the projections the layer makes of the mixed inputs."""
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    dispatch = comfy.pack("attention.shared.dispatch")
    torch.manual_seed(0)
    b, n, heads, dim = 2, 24, 4, 8
    q_c, q_cur, k_c, k_s = (torch.randn(b, n, heads * dim) for _ in range(4))
    v_c, v_s = torch.randn(b, n, heads * dim) * 3 + 1, torch.randn(b, n, heads * dim) * 0.5 - 2
    alpha, beta, temperature = 0.8, 0.2, 1.3
    q = alpha * q_c + beta * q_cur
    k = torch.cat([k_c, k_s], 1)
    split = lambda t: t.unflatten(-1, (heads, dim)).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) * temperature / dim ** 0.5).softmax(-1)
    expected = (weights @ split(torch.cat([hand_adain(v_c, v_s), v_s], 1))).transpose(1, 2).flatten(2)
    # What the patch does: the layer projects mixed inputs, the processor fuses V.
    fusion = type("Fusion", (), {"temperature": temperature})()
    processor = ffa_module.FFAProcessor(fusion)
    options = {"n_heads": heads, ffa_module.CONTENT_TOKENS: n}
    got = processor(q, k, torch.cat([v_c, v_s], 1), options,
                    lambda q, k, v, o: dispatch.default_attention(q, k, v, o))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adain_latent_has_the_style_statistics(comfy):
    content, style = random_latents(2, seed=1) * 3 + 1, random_latents(1, seed=2) * 0.5 - 2
    (out,) = comfy.run_node("LikenessAdaINLatent", content={"samples": content}, style={"samples": style})
    std, mean = torch.std_mean(out["samples"], dim=(-2, -1), correction=0)
    s_std, s_mean = torch.std_mean(style, dim=(-2, -1), correction=0)
    assert torch.allclose(mean, s_mean.expand_as(mean), atol=1e-4)
    assert torch.allclose(std, s_std.expand_as(std), atol=1e-3)


def test_features_are_found_by_timestep_not_call_count(comfy, inverted, monkeypatch):
    """Heun calls the model twice per step, and cond/uncond in separate calls
    double it again: every call must still find its own timestep's features."""
    name, model, empty, _, z_t, features = inverted
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    looked_up = []
    original = ffa_module.FeatureFusion.features_for

    def recording(self, extra_options, rows, device=None):
        found = original(self, extra_options, rows, device)
        if found is not None:
            looked_up.append(float(extra_options["sigmas"][0]))
        return found

    monkeypatch.setattr(ffa_module.FeatureFusion, "features_for", recording)
    monkeypatch.setattr(model.model, "memory_required", lambda *a, **k: float("inf"))
    patched = ffa(comfy, model, features.select(0, 1), features.select(1, 1))
    out = ksampler_advanced(comfy, patched, {"samples": z_t[:1]}, empty, sampler="heun", cfg=3.0)
    assert torch.isfinite(out).all()
    visited = {round(s, 4) for s in looked_up}
    assert visited == {round(s, 4) for s in features.sigmas[:-1]}


def test_unpatched_model_is_bit_identical_after_ffa_runs(comfy, inverted):
    _, model, empty, _, z_t, features = inverted
    start = {"samples": z_t[:1]}
    before = ksampler_advanced(comfy, model, start, empty, cfg=4.0)
    for cfg in (1.0, 4.0):
        styled = ksampler_advanced(comfy, ffa(comfy, model, features.select(0, 1), features.select(1, 1)),
                                   start, empty, cfg=cfg)
        assert torch.isfinite(styled).all()
    after = ksampler_advanced(comfy, model, start, empty, cfg=4.0)
    assert torch.equal(before, after)


def test_two_content_images_with_one_style(comfy, sd15):
    model, empty, clip = sd15
    model = calm(model, CALM)
    contents = random_latents(2, seed=5)
    z_c, content = invert(comfy, model, empty, contents)
    z_s, style = invert(comfy, model, empty, random_latents(1, seed=6), capture="kv")
    (start,) = comfy.run_node("LikenessAdaINLatent", content=z_c, style=z_s)
    negative = encode(comfy, clip, "blurry")
    patched = ffa(comfy, model, content, style)
    together = ksampler_advanced(comfy, patched, start, empty, cfg=5.0, negative=negative)
    assert together.shape == (2, 4, 8, 8)
    # each image used its own content features: same as sampling it alone
    alone = ksampler_advanced(comfy, ffa(comfy, model, content.select(1, 1), style),
                              {"samples": start["samples"][1:]}, empty, cfg=5.0, negative=negative)
    assert torch.allclose(together[1:], alone, atol=1e-5)


def timesteps_of(model, steps: int) -> int:
    """The timesteps a forward pass over ComfyUI's ddim_uniform schedule visits (σ = 0 excluded)."""
    import comfy.samplers

    return len(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)) - 1


@pytest.mark.parametrize("precision", ["fp8", "fp16"])
def test_cache_memory_measured_against_a_naive_qkv_cache_by_hand(comfy, sd15, precision):
    """The README's ratios: a content (qkv) and a style (kv) inversion's measured storage against
    the Q/K/V a naive cache would keep, counted from the model's own projections."""
    model, empty, _ = sd15
    _, content = invert(comfy, model, empty, random_latents(1, seed=7), precision=precision)
    _, style = invert(comfy, model, empty, random_latents(1, seed=8), capture="kv", precision=precision)
    # The naive cache's Q/K/V, counted from what the layers' own to_q/to_k/to_v output in a model call.
    with cache_measure.projection_outputs(model.model.diffusion_model) as sizes:
        ksampler_advanced(comfy, model, {"samples": random_latents(1, seed=9)}, empty, steps=1)
    timesteps = timesteps_of(model, STEPS)
    naive, layers = cache_measure.naive_qkv_bytes(sizes) * timesteps, cache_measure.self_attention_layers(sizes)
    measured = cache_measure.storage_bytes(content.features) + cache_measure.storage_bytes(style.features)
    if precision == "fp16":
        assert measured * 5 == naive * 2  # 2 of the 5 tensors, hidden states as wide as their projections
    else:  # 1 byte a value, and one fp32 scale per image, layer and timestep beside it
        assert measured * 5 == naive + 5 * 2 * 4 * layers * timesteps
    assert layers == 16


@pytest.mark.parametrize("kind, size", [("sd15", 8), ("sd15", 13), ("sdxl", 8), ("sdxl", 11)])
@pytest.mark.parametrize("precision", ["fp8", "fp16"])
def test_the_memory_formula_is_exactly_what_an_inversion_keeps(comfy, tiny_checkpoints, kind, size, precision):
    """cache_bytes (from the UNet's config alone) against the measured storage of what a real
    inversion holds, odd latent sizes included."""
    bank_module = comfy.pack("attention.magicstyle.feature_bank")
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    _, bank = invert(comfy, model, encode(comfy, clip, ""), random_latents(2, size=size), steps=3,
                     precision=precision)
    config = model.model.model_config.unet_config
    expected = bank_module.cache_bytes(config, bank.layers, (size, size), len(bank.timesteps), 2, precision)
    assert cache_measure.storage_bytes(bank.features) == expected


def test_fp8_features_stylise_as_fp16_ones_do(comfy, inverted):
    """What fp8 storage changes in the result (reported in the README's Memory section)."""
    name, model, empty, latents, _, _ = inverted
    outputs = {}
    for precision in ("fp16", "fp8"):
        z_t, features = invert(comfy, model, empty, latents, precision=precision)
        start = {"samples": z_t["samples"][:1]}
        plain = ksampler_advanced(comfy, model, start, empty)
        outputs[precision] = ksampler_advanced(comfy, ffa(comfy, model, features.select(0, 1), features.select(1, 1)),
                                               start, empty) - plain
    # FFA's effect on the latent, at fp8 against fp16: the same to within a few percent
    difference = (outputs["fp8"] - outputs["fp16"]).norm() / outputs["fp16"].norm()
    print(f"{name}: fp8 vs fp16 features, relative difference of FFA's effect on the latent {float(difference):.4f}")
    assert difference < 0.05


def test_features_can_stay_in_system_memory(comfy, sd15):
    model, empty, _ = sd15
    _, features = invert(comfy, model, empty, random_latents(1), cache_on="cpu")
    assert all(stored.values.device.type == "cpu" for stored in features.features.values())
    out = ksampler_advanced(comfy, ffa(comfy, model, features, features), {"samples": random_latents(1)}, empty)
    assert torch.isfinite(out).all()


def test_bf16_model_runs_inversion_and_ffa(comfy, tiny_checkpoints, base_directory):
    import comfy.sd as comfy_sd

    path = base_directory / "models" / "checkpoints" / tiny_checkpoints["sd15"]
    model, clip, _, _ = comfy_sd.load_checkpoint_guess_config(str(path), model_options={"dtype": torch.bfloat16})
    first_attention = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    assert first_attention.to_q.weight.dtype == torch.bfloat16
    empty = encode(comfy, clip, "")
    z_t, features = invert(comfy, model, empty, random_latents(1))
    out = ksampler_advanced(comfy, ffa(comfy, model, features, features), z_t, empty, cfg=3.0)
    assert torch.isfinite(out).all()


def test_interrupted_inversion_leaves_no_cache(comfy, sd15, monkeypatch):
    import comfy.model_management as model_management

    model, empty, _ = sd15
    bank_module = comfy.pack("attention.magicstyle.feature_bank")
    captures = []
    original_init = bank_module.FeatureCapture.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        captures.append(self)

    monkeypatch.setattr(bank_module.FeatureCapture, "__init__", tracking_init)
    seen_entries = []

    def interrupt_mid_inversion(*args, **kwargs):  # ComfyUI checks this in every op
        captured = sum(len(c._entries) for c in captures)
        seen_entries.append(captured)
        if captured >= 3 * 16:  # three steps' worth of features are held
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_mid_inversion)
    with pytest.raises(model_management.InterruptProcessingException):
        invert(comfy, model, empty, random_latents(1))
    assert max(seen_entries) >= 3 * 16
    assert captures and all(not c._entries for c in captures)


class TestSaveLoad:
    def test_round_trip_is_identical(self, comfy, sd15, base_directory):
        model, empty, _ = sd15
        _, features = invert(comfy, model, empty, random_latents(1), capture="kv", layers="decoder")
        (name,) = comfy.run_node("LikenessSaveFeatures", features=features, filename_prefix="style_test")
        assert (base_directory / "models" / "likeness_features" / name).exists()
        loaded, latent = comfy.run_node("LikenessLoadFeatures", file=name)
        assert torch.equal(latent["samples"], features.latent)
        assert loaded.metadata() == features.metadata()
        assert loaded.features.keys() == features.features.keys()
        for key, stored in features.features.items():
            assert torch.equal(loaded.features[key].values.view(torch.uint8), stored.values.view(torch.uint8))
            assert torch.equal(loaded.features[key].scale, stored.scale)
        assert len(loaded.layers) == 9  # the decoder's self-attention layers

    def test_features_from_another_model_size_or_steps_are_refused(self, comfy, sd15, tiny_checkpoints):
        model, empty, _ = sd15
        other_model, other_clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15_other"])
        _, features = invert(comfy, model, empty, random_latents(1))
        with pytest.raises(ValueError, match="fingerprint"):
            ffa(comfy, other_model, features, features)
        _, big = invert(comfy, model, empty, random_latents(1, size=16))
        with pytest.raises(ValueError, match="size"):
            ffa(comfy, model, features, big)
        with pytest.raises(ValueError, match="size"):
            ksampler_advanced(comfy, ffa(comfy, model, features, features), {"samples": random_latents(1, size=16)},
                              empty)
        with pytest.raises(ValueError, match="steps"):
            ksampler_advanced(comfy, ffa(comfy, model, features, features), {"samples": random_latents(1)},
                              empty, steps=STEPS + 2)

    def test_a_file_that_is_not_features_is_refused(self, comfy, base_directory):
        from safetensors.torch import save_file

        path = base_directory / "models" / "likeness_features" / "not_features.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(path))
        with pytest.raises(ValueError, match="not a Likeness features file"):
            comfy.run_node("LikenessLoadFeatures", file=path.name)


def hand_adain(content, style):
    """Per channel over tokens, population std, eps on the std (AdaIN as MagicStyle Eq. 4 uses it)."""
    c_mean, s_mean = content.mean(1, keepdim=True), style.mean(1, keepdim=True)
    c_std = ((content - c_mean) ** 2).mean(1, keepdim=True).sqrt()
    s_std = ((style - s_mean) ** 2).mean(1, keepdim=True).sqrt()
    return (content - c_mean) / (c_std + 1e-5) * s_std + s_mean


@pytest.mark.parametrize("alpha, beta, temperature", [(0.7, 0.45, 1.0), (0.35, 0.9, 1.3)])
def test_ffa_equals_a_hand_computation_from_the_cached_states_and_the_layers_weights(comfy, inverted, monkeypatch,
                                                                                   alpha, beta, temperature):
    """Algorithm 1 / Eq. 5 written out from the raw cached hidden states and the layer's own
    to_q/to_k/to_v/to_out, against what the patched layer returns inside a real model call.
    The style is image 1 of a two-image bank (style_index 1)."""
    name, model, empty, latents, _, _ = inverted
    _, features = invert(comfy, model, empty, latents, precision="fp8")
    layers, dispatch = comfy.pack("attention.shared.layer_table"), comfy.pack("attention.shared.dispatch")
    training = comfy.pack("attention.shared.training_loop")
    unet = layers.diffusion_model_of(model)
    key = {"sd15": ("output", 4, 0), "sdxl": ("input", 8, 3)}[name]
    block = layers.transformer_block(unet, key)
    content = features.select(0, 1)
    patched = ffa(comfy, model, content, features, alpha=alpha, beta=beta, temperature=temperature, style_index=1)

    recorded = {}
    hooks = [block.norm1.register_forward_hook(lambda m, a, out: recorded.setdefault("n", out.detach().clone())),
             block.attn1.to_out.register_forward_hook(lambda m, a, out: recorded.setdefault("out", out.detach().clone()))]
    values = []
    original = dispatch.default_attention

    def spying(q, k, v, extra_options, mask=None):
        here = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
        if here == key and v.shape[1] == 2 * q.shape[1] and not values:
            values.append((q.detach().clone(), v.detach().clone()))
        return original(q, k, v, extra_options, mask)

    monkeypatch.setattr(dispatch, "default_attention", spying)
    sigma = torch.tensor([features.sigmas[3]])
    # A latent of its own, so the current hidden states differ from the content's cached ones.
    noisy = random_latents(1, seed=21) * sigma
    try:
        with torch.no_grad():
            training.denoised_predictions(model, patched, [empty], noisy, sigma)
    finally:
        for hook in hooks:
            hook.remove()

    timestep = model.get_model_object("model_sampling").timestep(sigma)
    stored = features.get(timestep, key)  # fp8 values, one fp32 scale per image
    h_c = stored.values[0:1].float() * stored.scale[0]
    h_s = stored.values[1:2].float() * stored.scale[1]
    assert stored.values.dtype == torch.float8_e4m3fn
    n = recorded["n"].float()
    attn = block.attn1
    w_q, w_k, w_v = (getattr(attn, p).weight.float() for p in ("to_q", "to_k", "to_v"))
    q = alpha * (h_c @ w_q.T) + beta * (n @ w_q.T)
    k = torch.cat([h_c @ w_k.T, h_s @ w_k.T], 1)
    v_c, v_s = h_c @ w_v.T, h_s @ w_v.T
    v = torch.cat([hand_adain(v_c, v_s), v_s], 1)
    heads, dim = attn.heads, attn.dim_head
    split = lambda t: t.unflatten(-1, (heads, dim)).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) * temperature / dim ** 0.5).softmax(-1)
    expected = attn.to_out[0]((weights @ split(v)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(recorded["out"].float(), expected, rtol=2e-4, atol=2e-4)

    # The V the layer attended over: its content half has the style half's per-channel token statistics.
    ((query, fused),) = values
    tokens = fused.shape[1] // 2
    std_c, mean_c = torch.std_mean(fused[:, :tokens].float(), 1, correction=0)
    std_s, mean_s = torch.std_mean(fused[:, tokens:].float(), 1, correction=0)
    torch.testing.assert_close(mean_c, mean_s, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(std_c, std_s, rtol=1e-3, atol=1e-3)
    # The query the layer used is α·Q_c + β·Q_cur (times the temperature), not the swapped mix.
    torch.testing.assert_close(query.float(), q * temperature, rtol=1e-4, atol=1e-4)
    swapped = (beta * (h_c @ w_q.T) + alpha * (n @ w_q.T)) * temperature
    assert (swapped - query.float()).abs().max() > 1e-2 * query.float().abs().max()


def test_ffa_acts_only_inside_its_window(comfy, inverted, monkeypatch):
    name, model, empty, _, z_t, features = inverted
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    content, style = features.select(0, 1), features.select(1, 1)
    start = {"samples": z_t[:1]}
    plain = ksampler_advanced(comfy, model, start, empty)
    fused_at = []
    original = ffa_module.FeatureFusion.features_for

    def recording(self, extra_options, rows, device=None):
        found = original(self, extra_options, rows, device)
        if found is not None:
            fused_at.append(float(extra_options["sigmas"][0]))
        return found

    monkeypatch.setattr(ffa_module.FeatureFusion, "features_for", recording)
    sampling = model.get_model_object("model_sampling")
    window = comfy.pack("attention.shared.sigmas").SigmaRange.from_percent(sampling, 0.0, 0.5)
    styled = ksampler_advanced(comfy, ffa(comfy, model, content, style, start_percent=0.0, end_percent=0.5),
                               start, empty)
    visited = {round(s, 4) for s in fused_at}
    inside = {round(s, 4) for s in features.sigmas[:-1] if window.contains(s)}
    assert visited == inside and 0 < len(inside) < len(features.sigmas) - 1, (visited, inside)
    everywhere = ksampler_advanced(comfy, ffa(comfy, model, content, style), start, empty)
    # (the calm model moves little in latent space: measured against FFA over the whole schedule)
    assert (styled - plain).abs().max() > 0.1 * (everywhere - plain).abs().max()
    fused_at.clear()
    late = ksampler_advanced(comfy, ffa(comfy, model, content, style, start_percent=1.0, end_percent=1.0),
                             start, empty)
    assert not fused_at and torch.equal(late, plain)


def test_a_run_keeps_the_cache_on_the_gpu_only_when_it_fits(comfy):
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    gib = 1024 ** 3
    # SDXL 1024x1024, 30 steps, content + style, every layer: 6.5 GB at fp8 (README's Memory table)
    assert ffa_module.keep_on_device("auto", int(6.5 * gib), free_bytes=14 * gib)  # a 24 GB card after the model
    assert not ffa_module.keep_on_device("auto", int(6.5 * gib), free_bytes=10 * gib)  # streamed instead
    assert ffa_module.keep_on_device("device", 100 * gib, free_bytes=0)
    assert not ffa_module.keep_on_device("cpu", 1, free_bytes=100 * gib)
    with pytest.raises(ValueError, match="cache_on"):
        ffa_module.keep_on_device("gpu", 1, 1)


def test_nothing_of_the_cache_stays_with_the_patch_after_a_run(comfy, inverted):
    """A run's device copies live in the patch for that run only: cleanup lets go of them."""
    _, model, empty, _, z_t, features = inverted
    content, style = features.select(0, 1), features.select(1, 1)
    content.placement = "device"
    patched = ffa(comfy, model, content, style)
    processors = [p for d in comfy.pack("attention.shared.dispatch").dispatchers(patched) for p in d.processors]
    fusion = processors[0].fusion
    # On a device (here the meta device stands in for a GPU) the first call moves the whole cache.
    sigma = torch.tensor([features.sigmas[0]])
    block, number, index = sorted(fusion.layers)[0]
    found = fusion.features_for({"block": (block, number), "block_index": index, "sigmas": sigma,
                                 "cond_or_uncond": [0]}, 1, torch.device("meta"))
    assert found[0].values.device.type == "meta" and fusion._run["banks"] is not None
    for _ in range(2):  # a real run ends with the cleanup ComfyUI calls, interrupted or not
        ksampler_advanced(comfy, patched, {"samples": z_t[:1]}, empty)
        assert not fusion._run
    assert all(stored.values.device.type == "cpu" for stored in content.features.values())
