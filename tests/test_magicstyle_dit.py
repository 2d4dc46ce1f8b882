"""MagicStyle on Flux.1 and SD3.5 (tiny models of the real layouts): Euler inversion of the flow,
features captured in joint attention, FFA there against a hand computation from a block's own
weights, the input MODEL unchanged, another pack's attention override chained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_dit import ffa, forward, invert, latents
from tiny import tiny_dit

# max |z_0 − forward(invert(z_0))| on the calm tiny DiTs, 12 steps (latents ~N(0, 1)): Euler inversion's own
# error (v at σ_{i-1} stands in for v at σ_i), as the UNet tests' 0.01. Measured: Flux 5.6e-3, SD3.5 see the log.
ROUND_TRIP = 1e-2


@pytest.fixture(scope="module", params=["flux", "sd3"])
def inverted(request, comfy):
    """Content (image 0) and style (image 1) inverted together on a calm tiny DiT, every block (fp16)."""
    from test_dit import calm_dit

    if request.param == "flux":
        model, cond = calm_dit(tiny_dit.tiny_flux()), tiny_dit.flux_conditioning(guidance=3.5)
    else:
        model, cond = calm_dit(tiny_dit.tiny_sd3()), tiny_dit.sd3_conditioning()
    start = latents(2)
    z_t, features = invert(comfy, model, cond, start)
    return request.param, model, cond, start, z_t["samples"], features


def test_euler_inversion_of_the_flow_round_trips(comfy, inverted):
    name, model, cond, start, z_t, features = inverted
    assert (z_t - start).abs().max() > 0.5, "inversion must move the latent"
    back = forward(comfy, model, z_t, cond)
    error = (back - start).abs().max().item()
    print(f"{name}: round trip max error {error:.2e}")
    assert error < ROUND_TRIP, f"{name}: round trip off by {error}"
    blocks = {"flux": 4, "sd3": 2}[name]
    assert len(features.features) == len(features.timesteps) * blocks
    stored = next(iter(features.features.values()))
    hidden = model.get_model_object("diffusion_model").hidden_size if name == "flux" else 128
    assert tuple(stored.values.shape) == (2, 5 * 7, 3 * hidden)  # 10×14 latent, 2×2 patches: 35 image tokens


def test_ffa_alpha_1_beta_0_style_content_is_the_plain_reconstruction(comfy, inverted):
    name, model, cond, _, z_t, features = inverted
    content, style = features.select(0, 1), features.select(1, 1)
    plain = forward(comfy, model, z_t[:1], cond)
    same = forward(comfy, ffa(comfy, model, content, content, alpha=1.0, beta=0.0), z_t[:1], cond)
    styled = forward(comfy, ffa(comfy, model, content, style), z_t[:1], cond)
    identity_gap, style_gap = (same - plain).abs().max().item(), (styled - plain).abs().max().item()
    print(f"{name}: identity gap {identity_gap:.2e}, style gap {style_gap:.2e}")
    assert identity_gap < 1e-3, f"{name}: {identity_gap}"
    assert style_gap > 20 * identity_gap, f"{name}: FFA with a real style changed only {style_gap}"
    # The literal keys [K_txt; K_c; K_s] halve the text's share: no longer the plain model.
    halved = forward(comfy, ffa(comfy, model, content, content, alpha=1.0, beta=0.0, keep_text_share=False),
                     z_t[:1], cond)
    assert (halved - plain).abs().max().item() > 5 * identity_gap


def test_input_model_is_unchanged_and_another_packs_override_still_runs(comfy, inverted):
    name, model, cond, _, z_t, features = inverted
    content, style = features.select(0, 1), features.select(1, 1)
    before = forward(comfy, model, z_t[:1], cond)
    options_before = repr(sorted(model.model_options.get("transformer_options", {})))
    seen = []

    def foreign(func, *args, **kwargs):  # another pack's override: scales every attention output
        seen.append(kwargs["transformer_options"].get("block_index"))
        return func(*args, **kwargs) * 0.5

    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = foreign
    with_foreign = forward(comfy, ffa(comfy, other, content, style, blocks="d0"), z_t[:1], cond)
    calls = len(seen)
    alone = forward(comfy, ffa(comfy, model, content, style, blocks="d0"), z_t[:1], cond)
    assert calls > 0 and len(seen) == calls, "the foreign override ran in the FFA run, and only there"
    assert (with_foreign - alone).abs().max() > 1e-5, "the foreign override's change is in the result"
    after = forward(comfy, model, z_t[:1], cond)
    assert torch.equal(before, after), f"{name}: the input MODEL samples differently after FFA runs"
    assert repr(sorted(model.model_options.get("transformer_options", {}))) == options_before


def hand_rope(x: torch.Tensor, ids: torch.Tensor, axes: list[int], theta: float) -> torch.Tensor:
    """RoPE as Flux defines it (BFL's flux/math.py): each axis rotates its own channel pairs (2i, 2i+1)
    by pos·θ^(−2i/d)."""
    angles = torch.cat([ids[..., a:a + 1].double() / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
                        for a, d in enumerate(axes)], dim=-1)[:, None]
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    return torch.stack([x0 * angles.cos() - x1 * angles.sin(), x0 * angles.sin() + x1 * angles.cos()],
                       -1).flatten(-2).float()


def hand_stream(block, prefix: str, tokens: torch.Tensor, vec: torch.Tensor, heads: int):
    """(q, k, v) (B, H, L, D) before RoPE and the modulation chunks of one stream of a Flux double block,
    from its weights: LayerNorm, (1 + scale)·x + shift, qkv, QK RMS-norm with its scales."""
    mod = F.linear(F.silu(vec), getattr(block, f"{prefix}_mod").lin.weight,
                   getattr(block, f"{prefix}_mod").lin.bias)[:, None].chunk(6, dim=-1)
    x = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + mod[1]) + mod[0]
    attn = getattr(block, f"{prefix}_attn")
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    rms = lambda t, scale: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * scale  # noqa: E731
    return rms(q, attn.norm.query_norm.scale), rms(k, attn.norm.key_norm.scale), v, mod


def sharpen(*norms) -> None:
    """QK-norm scales of ~3 instead of the random init's ~0.02: logits of order 1 and more, so the attention
    weights (and a test of them) depend on every query and key, not a near-uniform average."""
    with torch.no_grad():
        for norm in norms:
            getattr(norm, "scale", getattr(norm, "weight", None)).normal_(3.0, 0.5)


def hand_adain(content, style):
    c_std, c_mean = torch.std_mean(content, -2, correction=0, keepdim=True)
    s_std, s_mean = torch.std_mean(style, -2, correction=0, keepdim=True)
    return (content - c_mean) / (c_std + 1e-5) * s_std + s_mean


class AttentionSpy:
    """An outer override that records what the joint attention returns (the router inside it)."""

    def __init__(self, inner) -> None:
        self.inner, self.outputs = inner, []

    def __call__(self, func, *args, **kwargs):
        out = self.inner(func, *args, **kwargs)
        self.outputs.append(out)
        return out


def softmax_attention(q, k, v, temperature=1.0):
    weights = (q @ k.transpose(-1, -2) * temperature / q.shape[-1] ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("keep_text_share", [True, False])
def test_one_flux_double_block_with_ffa_is_the_hand_computation(comfy, keep_text_share):
    """Flux double block 0 run by ComfyUI with FFA in its joint attention (through the router) against
    the block written out here from its weights: modulation, QK-norm, RoPE, text tokens, AdaIN,
    α = 0.7, β = 0.45, temperature 1.2, style ≠ content."""
    joint = comfy.pack("attention.shared.joint_attention")
    bank_module = comfy.pack("attention.magicstyle.feature_bank")
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
    sigmas = comfy.pack("attention.shared.sigmas")
    model = tiny_dit.tiny_flux()
    net, heads = model.get_model_object("diffusion_model"), tiny_dit.TINY_FLUX["num_heads"]
    block = net.double_blocks[0]
    torch.manual_seed(3)
    sharpen(block.img_attn.norm.query_norm, block.img_attn.norm.key_norm, block.txt_attn.norm.query_norm,
            block.txt_attn.norm.key_norm)
    grid, text, width = (3, 5), 4, tiny_dit.TINY_FLUX["hidden_size"]
    img, img_c, img_s = torch.randn(1, 15, width), torch.randn(1, 15, width) * 2 + 0.5, torch.randn(1, 15, width) - 1
    txt, vec = torch.randn(1, text, width), torch.randn(1, width)
    ids = torch.zeros(1, text + 15, 3)
    ids[0, text:, 1] = torch.arange(grid[0]).repeat_interleave(grid[1]).float()
    ids[0, text:, 2] = torch.arange(grid[1]).repeat(grid[0]).float()
    axes, theta = tiny_dit.TINY_FLUX["axes_dim"], tiny_dit.TINY_FLUX["theta"]
    rope = lambda t, where: hand_rope(t, ids[:, where], axes, theta)  # noqa: E731
    image = slice(text, text + 15)

    def image_qkv(tokens):
        q, k, v, _ = hand_stream(block, "img", tokens, vec, heads)
        return rope(q, image), rope(k, image), v

    q_i, k_i, v_i = image_qkv(img)
    q_c, k_c, v_c = image_qkv(img_c)
    _, k_s, v_s = image_qkv(img_s)
    q_t, k_t, v_t, txt_mod = hand_stream(block, "txt", txt, vec, heads)
    q_t, k_t = rope(q_t, slice(0, text)), rope(k_t, slice(0, text))
    alpha, beta, temperature = 0.7, 0.45, 1.2
    copies = 2 if keep_text_share else 1
    keys = torch.cat([k_t] * copies + [k_c, k_s], 2)
    values = torch.cat([v_t] * copies + [hand_adain(v_c, v_s), v_s], 2)
    attn_img = softmax_attention(alpha * q_c + beta * q_i, keys, values, temperature)
    attn_txt = softmax_attention(q_t, torch.cat([k_t, k_i], 2), torch.cat([v_t, v_i], 2))
    _, _, _, img_mod = hand_stream(block, "img", img, vec, heads)

    def finish(tokens, attn, mod, prefix):
        out = tokens + mod[2] * F.linear(attn, getattr(block, f"{prefix}_attn").proj.weight,
                                         getattr(block, f"{prefix}_attn").proj.bias)
        mlp = getattr(block, f"{prefix}_mlp")
        hidden = F.layer_norm(out, out.shape[-1:], eps=1e-6) * (1 + mod[4]) + mod[3]
        hidden = F.linear(F.gelu(F.linear(hidden, mlp[0].weight, mlp[0].bias), approximate="tanh"),
                          mlp[2].weight, mlp[2].bias)
        return out + mod[5] * hidden

    expected_img, expected_txt = finish(img, attn_img, img_mod, "img"), finish(txt, attn_txt, txt_mod, "txt")

    sampling = model.get_model_object("model_sampling")
    sigma = 0.6
    timestep = bank_module.timestep_key(sampling.timestep(torch.tensor(sigma)))
    key = ("double", 0, 0)

    def bank(q, k, v):
        made = bank_module.FeatureBank([key], [timestep], [sigma, 0.0], [1, 16, 6, 10], "x", 1, "qkv", "fp16")
        made.features = {(timestep, key): bank_module.StoredStates(joint_ffa.pack_qkv(q, k, v))}
        return made

    fusion = ffa_module.FeatureFusion(bank(q_c, k_c, v_c), bank(q_c * 0, k_s, v_s), style_index=0, alpha=alpha,
                                      beta=beta, temperature=temperature, layers=[key],
                                      sigma_range=sigmas.SigmaRange.always(), model_sampling=sampling)
    router = joint.JointAttentionRouter()
    router.add(joint_ffa.JointFFAProcessor(fusion, keep_text_share))
    spy = AttentionSpy(router)
    options = {"optimized_attention_override": spy, joint.JOINT_TOKENS: joint.JointTokens(text, grid),
               "block_type": "double", "block_index": 0, "sigmas": torch.tensor([sigma]), "cond_or_uncond": [0]}
    pe = net.pe_embedder(ids)
    with torch.no_grad():
        got_img, got_txt = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, transformer_options=options)
    # the attention itself (O(1) values: a 1% change of β moves it by ~1e-3), then the whole block
    (attention,) = spy.outputs
    assert torch.allclose(attention, torch.cat([attn_txt, attn_img], 1), atol=1e-5), attention
    assert torch.allclose(got_img, expected_img, atol=2e-5, rtol=1e-4), (got_img - expected_img).abs().max()
    assert torch.allclose(got_txt, expected_txt, atol=2e-5, rtol=1e-4), (got_txt - expected_txt).abs().max()
    plain_img, _ = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, transformer_options={})
    assert (plain_img - got_img).abs().max() > 1e-2  # FFA acted


def test_recompute_equals_cache_on_tiny_flux(comfy):
    """recompute keeps only the inverted latents and runs them beside the image: the same features,
    so the same picture as the cache (fp32 cache, to compare without fp16's rounding)."""
    from test_dit import calm_dit

    model, cond = calm_dit(tiny_dit.tiny_flux()), tiny_dit.flux_conditioning(guidance=3.5)
    start = latents(2, seed=5)
    z_cache, cached = invert(comfy, model, cond, start, precision="fp16")
    z_kept, kept = invert(comfy, model, cond, start, mode="recompute")
    assert torch.equal(z_cache["samples"], z_kept["samples"])
    kept_latents = sum(t.numel() * t.element_size() for t in kept.trajectory.latents.values())
    assert not kept.features and kept_latents == len(kept.timesteps) * 2 * 16 * 10 * 14 * 4  # per timestep, fp32
    assert kept.nbytes() < cached.nbytes()  # (tiny: 3×; Flux at 1024², README Memory)
    z_t = z_kept["samples"]
    content, style = kept.select(0, 1), kept.select(1, 1)
    plain = forward(comfy, model, z_t[:1], cond)
    recomputed = forward(comfy, ffa(comfy, model, content, style, alpha=0.7, beta=0.45, blocks="d1, s0"), z_t[:1], cond)
    _, full = invert(comfy, model, cond, start, precision="fp16")
    from_cache = forward(comfy, ffa(comfy, model, full.select(0, 1), full.select(1, 1), alpha=0.7, beta=0.45,
                                    blocks="d1, s0"), z_t[:1], cond)
    gap, effect = (recomputed - from_cache).abs().max().item(), (from_cache - plain).abs().max().item()
    print(f"recompute vs cache {gap:.2e}, FFA effect {effect:.2e}")
    assert effect > 1e-3 and gap < effect / 100, (gap, effect)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_recompute_equals_cache_on_the_unet(comfy, tiny_checkpoints, kind):
    """recompute on SD1.5/SDXL: the content and style rows beside the image give each self-attention the
    hidden states the cache keeps (fp16 cache: equal to its rounding)."""
    from harness.calm import calm
    from harness.sampling import encode
    from test_magicstyle import CALM, ksampler_advanced

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    model, empty = calm(model, CALM), encode(comfy, clip, "")
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    run = lambda **kw: comfy.run_node("LikenessInvert", model=model, conditioning=empty,  # noqa: E731
                                      latent={"samples": start}, steps=10, capture="qkv", layers="all",
                                      cache_on="auto", precision="fp16", **kw)
    (z_cache, cached), (z_kept, kept) = run(), run(mode="recompute")
    assert torch.equal(z_cache["samples"], z_kept["samples"]) and not kept.features
    z_t = {"samples": z_kept["samples"][:1]}
    plain = ksampler_advanced(comfy, model, z_t, empty)
    results = [ksampler_advanced(comfy, ffa(comfy, model, bank.select(0, 1), bank.select(1, 1), alpha=0.7, beta=0.45,
                                            temperature=1.2), z_t, empty) for bank in (cached, kept)]
    gap, effect = (results[0] - results[1]).abs().max().item(), (results[0] - plain).abs().max().item()
    print(f"{kind}: recompute vs cache {gap:.2e}, FFA effect {effect:.2e}")
    assert effect > 1e-3 and gap < effect / 100, (gap, effect)


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_dit_cache_formula_is_what_an_inversion_keeps(comfy, precision):
    """joint_cache_bytes (the README's Memory rows for Flux) against the bytes a real inversion of the tiny
    Flux keeps, on an odd latent (9×13: 5×7 tokens, the last row and column padded)."""
    joint = comfy.pack("attention.magicstyle.joint_ffa")
    model, cond = tiny_dit.tiny_flux(), tiny_dit.flux_conditioning()
    _, bank = invert(comfy, model, cond, latents(2, size=(9, 13)), steps=4, precision=precision)
    # 4 blocks; per image, block and timestep: 35 tokens × (Q, K, V of 32) at 2 or 1 bytes, + a 4-byte scale at fp8
    by_hand = len(bank.timesteps) * 2 * 4 * (35 * 3 * 32 * {"fp16": 2, "fp8": 1}[precision] + (4 if precision == "fp8" else 0))
    assert bank.nbytes() == by_hand == joint.joint_cache_bytes(32, 4, 35, len(bank.timesteps), 2, precision)


def test_one_flux_single_block_with_ffa_is_the_hand_computation(comfy):
    """Flux single block 1 (text and image in one stream, parallel MLP) with FFA through the router, against
    the block written out from its weights; α 0.6, β 0.3, style ≠ content."""
    joint = comfy.pack("attention.shared.joint_attention")
    bank_module = comfy.pack("attention.magicstyle.feature_bank")
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
    sigmas = comfy.pack("attention.shared.sigmas")
    model = tiny_dit.tiny_flux()
    net, heads = model.get_model_object("diffusion_model"), tiny_dit.TINY_FLUX["num_heads"]
    block = net.single_blocks[1]
    torch.manual_seed(5)
    sharpen(block.norm.query_norm, block.norm.key_norm)
    grid, text, width = (3, 3), 3, tiny_dit.TINY_FLUX["hidden_size"]
    n = grid[0] * grid[1]
    x, img_c, img_s = torch.randn(1, text + n, width), torch.randn(1, n, width) + 1, torch.randn(1, n, width) * 3
    vec = torch.randn(1, width)
    ids = torch.zeros(1, text + n, 3)
    ids[0, text:, 1] = torch.arange(grid[0]).repeat_interleave(grid[1]).float()
    ids[0, text:, 2] = torch.arange(grid[1]).repeat(grid[0]).float()
    axes, theta = tiny_dit.TINY_FLUX["axes_dim"], tiny_dit.TINY_FLUX["theta"]
    shift, scale, gate = F.linear(F.silu(vec), block.modulation.lin.weight, block.modulation.lin.bias)[:, None].chunk(3, -1)
    rms = lambda t, s: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * s  # noqa: E731

    def stream(tokens, where):
        hidden = F.linear(F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + scale) + shift, block.linear1.weight,
                          block.linear1.bias)
        qkv, mlp = hidden[..., :3 * width], hidden[..., 3 * width:]
        q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = rms(q, block.norm.query_norm.scale), rms(k, block.norm.key_norm.scale)
        return hand_rope(q, ids[:, where], axes, theta), hand_rope(k, ids[:, where], axes, theta), v, mlp

    q, k, v, mlp = stream(x, slice(0, text + n))
    q_c, k_c, v_c, _ = stream(img_c, slice(text, text + n))
    _, k_s, v_s, _ = stream(img_s, slice(text, text + n))
    alpha, beta = 0.6, 0.3
    keys = torch.cat([k[:, :, :text]] * 2 + [k_c, k_s], 2)
    values = torch.cat([v[:, :, :text]] * 2 + [hand_adain(v_c, v_s), v_s], 2)
    attn = torch.cat([softmax_attention(q[:, :, :text], k, v),
                      softmax_attention(alpha * q_c + beta * q[:, :, text:], keys, values)], 1)
    expected = x + gate * F.linear(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1), block.linear2.weight,
                                   block.linear2.bias)

    sampling = model.get_model_object("model_sampling")
    sigma, key = 0.4, ("single", 1, 0)
    timestep = bank_module.timestep_key(sampling.timestep(torch.tensor(sigma)))

    def bank(q_, k_, v_):
        made = bank_module.FeatureBank([key], [timestep], [sigma, 0.0], [1, 16, 6, 6], "x", 1, "qkv", "fp16")
        made.features = {(timestep, key): bank_module.StoredStates(joint_ffa.pack_qkv(q_, k_, v_))}
        return made

    fusion = ffa_module.FeatureFusion(bank(q_c, k_c, v_c), bank(q_c * 0, k_s, v_s), style_index=0, alpha=alpha,
                                      beta=beta, temperature=1.0, layers=[key], sigma_range=sigmas.SigmaRange.always(),
                                      model_sampling=sampling)
    router = joint.JointAttentionRouter()
    router.add(joint_ffa.JointFFAProcessor(fusion))
    spy = AttentionSpy(router)
    options = {"optimized_attention_override": spy, joint.JOINT_TOKENS: joint.JointTokens(text, grid),
               "block_type": "single", "block_index": 1, "sigmas": torch.tensor([sigma]), "cond_or_uncond": [0]}
    with torch.no_grad():
        got = block(x.clone(), vec=vec, pe=net.pe_embedder(ids), transformer_options=options)
    assert torch.allclose(spy.outputs[0], attn, atol=1e-5), (spy.outputs[0] - attn).abs().max()
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


def test_one_sd35_joint_block_with_ffa_is_the_hand_computation(comfy):
    """SD3.5 joint block 0 (MMDiT: adaLN modulation, QK RMS-norm, no RoPE) with FFA through the router and the
    block marker's key, against the block written out from its weights; α 0.7, β 0.45, temperature 0.8."""
    joint = comfy.pack("attention.shared.joint_attention")
    bank_module = comfy.pack("attention.magicstyle.feature_bank")
    ffa_module = comfy.pack("attention.magicstyle.ffa")
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
    sigmas = comfy.pack("attention.shared.sigmas")
    model = tiny_dit.tiny_sd3()
    block = model.get_model_object("diffusion_model").joint_blocks[0]
    heads, width = block.x_block.attn.num_heads, 128
    torch.manual_seed(6)
    sharpen(block.x_block.attn.ln_q, block.x_block.attn.ln_k, block.context_block.attn.ln_q, block.context_block.attn.ln_k)
    grid, text = (2, 3), 4
    n = grid[0] * grid[1]
    x, x_c, x_s = torch.randn(1, n, width), torch.randn(1, n, width) - 1, torch.randn(1, n, width) * 2
    context, c = torch.randn(1, text, width), torch.randn(1, width)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731

    def stream(part, tokens):
        mods = F.linear(F.silu(c), part.adaLN_modulation[1].weight, part.adaLN_modulation[1].bias).chunk(6, 1)
        hidden = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + mods[1][:, None]) + mods[0][:, None]
        q, k, v = F.linear(hidden, part.attn.qkv.weight, part.attn.qkv.bias).unflatten(-1, (3, heads, -1)).permute(
            2, 0, 3, 1, 4)
        return rms(q, part.attn.ln_q.weight), rms(k, part.attn.ln_k.weight), v, mods

    def finish(part, tokens, attn, mods):
        out = tokens + mods[2][:, None] * F.linear(attn, part.attn.proj.weight, part.attn.proj.bias)
        hidden = F.layer_norm(out, out.shape[-1:], eps=1e-6) * (1 + mods[4][:, None]) + mods[3][:, None]
        mlp = F.linear(F.gelu(F.linear(hidden, part.mlp.fc1.weight, part.mlp.fc1.bias), approximate="tanh"),
                       part.mlp.fc2.weight, part.mlp.fc2.bias)
        return out + mods[5][:, None] * mlp

    q_t, k_t, v_t, mods_t = stream(block.context_block, context)
    q_i, k_i, v_i, mods_i = stream(block.x_block, x)
    q_c, k_c, v_c, _ = stream(block.x_block, x_c)
    _, k_s, v_s, _ = stream(block.x_block, x_s)
    alpha, beta, temperature = 0.7, 0.45, 0.8
    keys = torch.cat([k_t, k_t, k_c, k_s], 2)
    values = torch.cat([v_t, v_t, hand_adain(v_c, v_s), v_s], 2)
    attn_x = softmax_attention(alpha * q_c + beta * q_i, keys, values, temperature)
    attn_t = softmax_attention(q_t, torch.cat([k_t, k_i], 2), torch.cat([v_t, v_i], 2))
    expected_x, expected_t = finish(block.x_block, x, attn_x, mods_i), finish(block.context_block, context, attn_t, mods_t)

    sampling = model.get_model_object("model_sampling")
    sigma, key = 0.7, ("double", 0, 0)
    timestep = bank_module.timestep_key(sampling.timestep(torch.tensor(sigma)))

    def bank(q_, k_, v_):
        made = bank_module.FeatureBank([key], [timestep], [sigma, 0.0], [1, 16, 4, 6], "x", 1, "qkv", "fp16")
        made.features = {(timestep, key): bank_module.StoredStates(joint_ffa.pack_qkv(q_, k_, v_))}
        return made

    fusion = ffa_module.FeatureFusion(bank(q_c, k_c, v_c), bank(q_c * 0, k_s, v_s), style_index=0, alpha=alpha,
                                      beta=beta, temperature=temperature, layers=[key],
                                      sigma_range=sigmas.SigmaRange.always(), model_sampling=sampling)
    router = joint.JointAttentionRouter()
    router.add(joint_ffa.JointFFAProcessor(fusion))
    spy = AttentionSpy(router)
    options = {"optimized_attention_override": spy, joint.JOINT_TOKENS: joint.JointTokens(text, grid),
               "sigmas": torch.tensor([sigma]), "cond_or_uncond": [0]}
    marker = joint.BlockMarker(0)  # what names an MMDiT's block for the router (ComfyUI names none)
    with torch.no_grad():
        out = marker({"txt": context, "img": x, "vec": c, "transformer_options": options},
                     {"original_block": lambda a: dict(zip(("txt", "img"), block(a["txt"], a["img"], c=a["vec"],
                                                            transformer_options=a["transformer_options"])))})
    (attention,) = spy.outputs
    assert torch.allclose(attention, torch.cat([attn_t, attn_x], 1), atol=1e-5), attention
    assert torch.allclose(out["img"], expected_x, atol=2e-5, rtol=1e-4), (out["img"] - expected_x).abs().max()
    assert torch.allclose(out["txt"], expected_t, atol=2e-5, rtol=1e-4), (out["txt"] - expected_t).abs().max()
