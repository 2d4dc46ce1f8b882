"""MagicStyle's FFA in one joint block, against the block written out from its own weights: a Flux double
block, a Flux single block, an SD3.5 joint block (modulation, QK-norm, RoPE where the model has it, text
tokens, AdaIN, softmax, projection, MLP), through the router as ComfyUI calls it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_dit


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


def stored_fusion(comfy, model, key, sigma: float, latent_shape: list[int], content, style, *, alpha: float,
                  beta: float, temperature: float):
    """The FFA settings of one block with content Q/K/V and style K/V stored at ``sigma``, as an
    inversion would have left them (no inversion run: the test chooses them)."""
    bank_module = comfy.pack("attention.magicstyle.feature_bank")
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
    sigmas = comfy.pack("attention.shared.sigmas")
    sampling = model.get_model_object("model_sampling")
    timestep = bank_module.timestep_key(sampling.timestep(torch.tensor(sigma)))

    def bank(q, k, v):
        made = bank_module.FeatureBank([key], [timestep], [sigma, 0.0], latent_shape, "x", 1, "qkv", "fp16")
        made.features = {(timestep, key): bank_module.StoredStates(joint_ffa.pack_qkv(q, k, v))}
        return made

    (q_c, k_c, v_c), (k_s, v_s) = content, style
    return comfy.pack("attention.magicstyle.ffa").FeatureFusion(
        bank(q_c, k_c, v_c), bank(q_c * 0, k_s, v_s), style_index=0, alpha=alpha, beta=beta, temperature=temperature,
        layers=[key], sigma_range=sigmas.SigmaRange.always(), model_sampling=sampling)


@pytest.mark.parametrize("keep_text_share", [True, False])
def test_one_flux_double_block_with_ffa_is_the_hand_computation(comfy, keep_text_share):
    """Flux double block 0 run by ComfyUI with FFA in its joint attention (through the router) against
    the block written out here from its weights: modulation, QK-norm, RoPE, text tokens, AdaIN,
    α = 0.7, β = 0.45, temperature 1.2, style ≠ content."""
    joint = comfy.pack("attention.shared.joint_attention")
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
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

    sigma, key = 0.6, ("double", 0, 0)
    fusion = stored_fusion(comfy, model, key, sigma, [1, 16, 6, 10], (q_c, k_c, v_c), (k_s, v_s), alpha=alpha,
                           beta=beta, temperature=temperature)
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


def test_one_flux_single_block_with_ffa_is_the_hand_computation(comfy):
    """Flux single block 1 (text and image in one stream, parallel MLP) with FFA through the router, against
    the block written out from its weights; α 0.6, β 0.3, style ≠ content."""
    joint = comfy.pack("attention.shared.joint_attention")
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
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

    sigma, key = 0.4, ("single", 1, 0)
    fusion = stored_fusion(comfy, model, key, sigma, [1, 16, 6, 6], (q_c, k_c, v_c), (k_s, v_s), alpha=alpha,
                           beta=beta, temperature=1.0)
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
    joint_ffa = comfy.pack("attention.magicstyle.joint_ffa")
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

    sigma, key = 0.7, ("double", 0, 0)
    fusion = stored_fusion(comfy, model, key, sigma, [1, 16, 4, 6], (q_c, k_c, v_c), (k_s, v_s), alpha=alpha,
                           beta=beta, temperature=temperature)
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
