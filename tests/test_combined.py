"""Several Likeness methods on one MODEL: each still contributes, in either order."""

from __future__ import annotations

import pytest
import torch

import tiny_faceid
from harness.calm import calm
from harness.sampling import encode

STEPS = 6


def differs(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-2) -> bool:
    return bool((a - b).abs().max() > floor * b.abs().max())


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    return calm(model, 0.05), clip


@pytest.fixture(scope="module")
def features(comfy, sd15):
    model, clip = sd15
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z_t, bank = comfy.run_node("LikenessInvert", model=model, conditioning=encode(comfy, clip, ""),
                               latent={"samples": latents}, steps=STEPS, capture="qkv", layers="all",
                               cache_on="device")
    return z_t["samples"], bank


def with_ffa(comfy, model, bank):
    return comfy.run_node("LikenessFeatureFusionAttention", model=model, content=bank.select(0, 1),
                          style=bank.select(1, 1), alpha=0.8, beta=0.2, temperature=1.0, layers="all",
                          style_index=0, start_percent=0.0, end_percent=1.0)[0]


def with_infinite_id(comfy, model, base_directory):
    infinite_id, layers = comfy.pack("attention.infinite_id"), comfy.pack("attention.unet_layers")
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "combined_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    adapter = adapter.to(dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    settings = infinite_id.InfiniteID(tokens=torch.randn(1, 4, adapter.cross_attention_dim, generator=generator),
                                      uncond_tokens=torch.zeros(1, 4, adapter.cross_attention_dim),
                                      kv=adapter.kv_weights, lora=adapter.faceid_lora(model))
    return infinite_id.apply_infinite_id(model, settings, layers.attention_keys(layers.diffusion_model_of(model)))


def forward(comfy, model, clip, z_t):
    (out,) = comfy.run_node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=STEPS, cfg=4.0,
                            sampler_name="euler", scheduler="ddim_uniform", positive=encode(comfy, clip, "a portrait"),
                            negative=encode(comfy, clip, ""), latent_image={"samples": z_t[:1]}, start_at_step=0,
                            end_at_step=10000, return_with_leftover_noise="disable")
    return out["samples"]


def test_ffa_and_infinite_id_on_one_model_each_contribute_in_either_order(comfy, sd15, features, base_directory):
    model, clip = sd15
    z_t, bank = features
    plain = forward(comfy, model, clip, z_t)
    ffa_only = forward(comfy, with_ffa(comfy, model, bank), clip, z_t)
    identity_only = forward(comfy, with_infinite_id(comfy, model, base_directory), clip, z_t)
    for first, second in ((with_ffa, with_infinite_id), (with_infinite_id, with_ffa)):
        one = first(comfy, model, bank) if first is with_ffa else first(comfy, model, base_directory)
        both_model = second(comfy, one, bank) if second is with_ffa else second(comfy, one, base_directory)
        # The LoRA's input recorder sees what the projections see: it runs after FFA's input mix.
        attn1_patches = both_model.model_options["transformer_options"]["patches"]["attn1_patch"]
        assert type(attn1_patches[-1]).__name__ == "LoRAInputs", [type(p).__name__ for p in attn1_patches]
        both = forward(comfy, both_model, clip, z_t)
        assert torch.isfinite(both).all()
        assert differs(both, ffa_only), "Infinite-ID must still contribute beside FFA"
        assert differs(both, identity_only), "FFA must still contribute beside Infinite-ID"
    assert differs(ffa_only, plain) and differs(identity_only, plain)


def per_run_state(model) -> dict:
    """Every run-scoped store of the Likeness patches on ``model`` (device copies of weights,
    features, LoRA) by name: ComfyUI's memory manager does not see them, so they must be empty
    between prompts."""
    found = {}
    seen = set()

    def visit(obj, path, depth=0):
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
            if name in ("_on_device", "_kv_on_device", "_run"):
                found[f"{path}.{name}"] = value
            elif hasattr(value, "__dict__") and type(value).__module__.startswith(PACK_PREFIX):
                visit(value, f"{path}.{name}", depth + 1)

    replace = model.model_options["transformer_options"].get("patches_replace", {})
    for kind, patches in replace.items():
        for key, dispatcher in patches.items():
            for index, processor in enumerate(getattr(dispatcher, "processors", [])):
                visit(processor, f"{kind}{key}[{index}]")
    return found


PACK_PREFIX = ""  # set from the loaded pack's module name in the test


def test_nothing_likeness_moved_to_the_device_stays_between_prompts(comfy, sd15, features, base_directory):
    global PACK_PREFIX
    PACK_PREFIX = comfy.pack_module.__name__
    model, clip = sd15
    z_t, bank = features
    both = with_infinite_id(comfy, with_ffa(comfy, model, bank), base_directory)
    stores = per_run_state(both)
    assert {name.rsplit(".", 1)[1] for name in stores} == {"_run", "_kv_on_device", "_on_device"}, stores
    for _ in range(2):
        forward(comfy, both, clip, z_t)
        assert all(not value for value in per_run_state(both).values()), per_run_state(both)
