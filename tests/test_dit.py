"""Flux.1 and SD3.5 on the real host: tiny DiTs of the real layouts, the user's loader, the family
check, the joint-attention hook (chained, never replacing), and MagicStyle's inversion and FFA."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_dit

STEPS = 12
CALM = 0.05  # velocity scale of the well-behaved DiT (as harness/calm.py does for the UNet)


def calm_dit(model, scale: float = CALM):
    """A clone whose final layer's output is scaled by ``scale`` (ComfyUI weight patches): every block live,
    the velocity smooth, so Euler inversion round-trips."""
    patched = model.clone()
    state = patched.model_state_dict()
    keys = [k for k in state if k.startswith("diffusion_model.final_layer.linear.")]
    assert len(keys) == 2, keys
    patched.add_patches({k: (torch.zeros_like(state[k]),) for k in keys}, strength_patch=1.0, strength_model=scale)
    return patched


def latents(count: int, seed: int = 0, size=(10, 14)) -> torch.Tensor:
    return torch.randn(count, 16, *size, generator=torch.Generator().manual_seed(seed))


def forward(comfy, model, z_t, cond, steps=STEPS):
    """MagicStyle's forward pass on a DiT: core KSamplerAdvanced, euler, ddim_uniform, no added noise."""
    (out,) = comfy.run_node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=steps, cfg=1.0,
                            sampler_name="euler", scheduler="ddim_uniform", positive=cond, negative=cond,
                            latent_image={"samples": z_t}, start_at_step=0, end_at_step=10000,
                            return_with_leftover_noise="disable")
    return out["samples"]


def invert(comfy, model, cond, samples, capture="qkv", layers="all", steps=STEPS, precision="fp16", **extra):
    return comfy.run_node("LikenessInvert", model=model, conditioning=cond, latent={"samples": samples}, steps=steps,
                          capture=capture, layers=layers, cache_on="auto", precision=precision, **extra)


def ffa(comfy, model, content, style, alpha=0.8, beta=0.2, **overrides):
    settings = dict(temperature=1.0, layers="all", style_index=0, start_percent=0.0, end_percent=1.0)
    settings.update(overrides)
    return comfy.run_node("LikenessFeatureFusionAttention", model=model, content=content, style=style,
                          alpha=alpha, beta=beta, **settings)[0]


@pytest.fixture(scope="module", params=["flux", "sd3"])
def dit(request, comfy):
    """(name, calm MODEL, CONDITIONING) of a tiny Flux.1-dev or SD3.5."""
    if request.param == "flux":
        return "flux", calm_dit(tiny_dit.tiny_flux()), tiny_dit.flux_conditioning(guidance=3.5)
    return "sd3", calm_dit(tiny_dit.tiny_sd3()), tiny_dit.sd3_conditioning()


@pytest.fixture(scope="module")
def inverted(comfy, dit):
    """Content (image 0) and style (image 1) inverted together, every block captured (fp16)."""
    name, model, cond = dit
    start = latents(2)
    z_t, features = invert(comfy, model, cond, start)
    return name, model, cond, start, z_t["samples"], features


def test_tiny_dits_are_comfyui_flux_and_sd3_models(comfy):
    import importlib

    model_base = importlib.import_module("comfy.model_base")
    model_sampling = importlib.import_module("comfy.model_sampling")
    table = comfy.pack("attention.shared.layer_table")
    flux, schnell, sd3 = tiny_dit.tiny_flux(), tiny_dit.tiny_flux(guidance=False), tiny_dit.tiny_sd3()
    assert type(flux.model) is model_base.Flux and type(sd3.model) is model_base.SD3
    assert isinstance(flux.get_model_object("model_sampling"), model_sampling.ModelSamplingFlux)
    assert isinstance(sd3.get_model_object("model_sampling"), model_sampling.ModelSamplingDiscreteFlow)
    assert [table.family_of(m) for m in (flux, schnell, sd3)] == ["flux", "flux", "sd3"]
    assert table.attention_keys(flux.get_model_object("diffusion_model")) == [
        ("double", 0, 0), ("double", 1, 0), ("single", 0, 0), ("single", 1, 0)]
    assert table.attention_keys(sd3.get_model_object("diffusion_model")) == [("double", 0, 0), ("double", 1, 0)]
    assert table.parse_blocks("d1, s0", table.attention_keys(flux.get_model_object("diffusion_model"))) == [
        ("double", 1, 0), ("single", 0, 0)]
    with pytest.raises(ValueError, match=r"blocks='d0, s7'.*'s7'.*d0-d1, s0-s1"):
        table.parse_blocks("d0, s7", table.attention_keys(flux.get_model_object("diffusion_model")))


def test_full_width_flux_file_loads_through_the_core_unet_loader(comfy, base_directory):
    """The user's path: a Flux.1-dev file (3,072 wide, 24 heads of 128, one double + one single block)
    through UNETLoader, accepted by LikenessInvert, which inverts it and captures both blocks."""
    from harness.paths import cache_root

    path = tiny_dit.write_flux_unet(cache_root() / "dit")
    link = base_directory / "models" / "diffusion_models" / path.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(path)
    (model,) = comfy.run_node("UNETLoader", unet_name=path.name, weight_dtype="default")
    net = model.get_model_object("diffusion_model")
    assert (net.hidden_size, net.num_heads, len(net.double_blocks), len(net.single_blocks)) == (3072, 24, 1, 1)
    assert comfy.pack("attention.shared.layer_table").family_of(model) == "flux"
    cond = [[torch.randn(1, 3, 4096), {"pooled_output": torch.randn(1, 768), "guidance": 3.5}]]
    z_t, features = invert(comfy, model, cond, latents(1, size=(4, 4)), steps=2, precision="fp8")
    assert z_t["samples"].shape == (1, 16, 4, 4) and torch.isfinite(z_t["samples"]).all()
    assert sorted(features.layers) == [("double", 0, 0), ("single", 0, 0)]
    # image tokens 2×2, Q/K/V of 3,072 each: the formula's size
    stored = next(iter(features.features.values()))
    assert tuple(stored.values.shape) == (1, 4, 3 * 3072)


@pytest.mark.parametrize("node_id", ["LikenessInvert", "LikenessFeatureFusionAttention", "LikenessFaceFusion"])
def test_other_dits_are_refused_by_name(comfy, node_id):
    """Flux.2 derives from Flux's classes but is no Flux.1: refused, naming it; the refusal keeps its style."""
    from comfy.supported_models import Flux2

    flux2 = tiny_dit.tiny_flux()
    flux2.model.model_config = Flux2({**tiny_dit.TINY_FLUX, "image_model": "flux2"})
    schema = comfy.node_class(node_id).define_schema()
    assert any(i.id == "model" for i in schema.inputs)
    common = comfy.pack("nodes.common")
    with pytest.raises(ValueError, match=r"model='Flux2 \(flow\)' cannot be used: expected .*Flux\.1"):
        common.require_model_family(flux2, dit=True)
    if node_id == "LikenessInvert":  # through the node itself, before any sampling
        with pytest.raises(ValueError, match=r"model='Flux2 \(flow\)' cannot be used"):
            invert(comfy, flux2, tiny_dit.flux_conditioning(), latents(1), steps=2)
    with pytest.raises(ValueError, match=r"model='Flux \(flow\)' cannot be used: expected an SD1\.5- or SDXL"):
        common.require_model_family(tiny_dit.tiny_flux())  # a node that stays SD-only


def test_a_bf16_flux_runs_magicstyle_and_face_fusion(comfy):
    """The low-precision path (DESIGN rule 9): a bf16 tiny Flux inverts (cache and recompute), fuses and
    fuses a face, finite, and FFA still changes the picture."""
    model, cond = tiny_dit.tiny_flux(dtype=torch.bfloat16), tiny_dit.flux_conditioning()
    start = latents(2, seed=9)
    z_t, cached = invert(comfy, model, cond, start, steps=4)
    _, kept = invert(comfy, model, cond, start, steps=4, mode="recompute")
    plain = forward(comfy, model, z_t["samples"][:1], cond, steps=4)
    for bank in (cached, kept):
        styled = forward(comfy, ffa(comfy, model, bank.select(0, 1), bank.select(1, 1)), z_t["samples"][:1], cond,
                         steps=4)
        assert torch.isfinite(styled).all() and (styled - plain).abs().max() > 1e-2
    kv = comfy.node_class("LikenessFaceFusion").define_schema().inputs[3].default
    (fused,) = comfy.run_node("LikenessFaceFusion", model=model, face={"samples": latents(1, size=(6, 6))}, weight=1.0,
                              kv=kv, start_percent=0.0, end_percent=1.0, face_noise="noised", noise_seed=0, uncond=True)
    faced = forward(comfy, fused, z_t["samples"][:1], cond, steps=4)
    assert torch.isfinite(faced).all() and (faced - plain).abs().max() > 1e-2
