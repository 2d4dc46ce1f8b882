"""Several Likeness methods on one MODEL: each still contributes, in either order."""

from __future__ import annotations

import pytest
import torch

from harness.calm import calm
from harness.sampling import encode
from tiny import tiny_faceid

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
    infinite_id, layers = comfy.pack("attention.infinite_id.identity_streams"), comfy.pack("attention.shared.layer_table")
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


def face_latent(size: int = 8, seed: int = 3) -> dict:
    return {"samples": torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))}


def with_face_fusion(comfy, model, size: int = 8):
    return comfy.run_node("LikenessFaceFusion", model=model, face=face_latent(size), weight=1.0,
                          kv="self-attention to_k/to_v (training-free)", start_percent=0.0, end_percent=1.0,
                          face_noise="noised", noise_seed=0, uncond=True)[0]


def patcher(name: str, comfy, bank, base_directory):
    """The Likeness patch ``name`` as a function of the model it is put on."""
    return {"ffa": lambda model: with_ffa(comfy, model, bank),
            "face_fusion": lambda model: with_face_fusion(comfy, model),
            "infinite_id": lambda model: with_infinite_id(comfy, model, base_directory)}[name]


PATCHES = ("ffa", "face_fusion", "infinite_id")
ORDERED_PAIRS = [(a, b) for a in PATCHES for b in PATCHES if a != b]


@pytest.fixture(scope="module")
def alone(comfy, sd15, features, base_directory):
    """The plain model's result and each patch's alone, computed once."""
    model, clip = sd15
    z_t, bank = features
    results = {"plain": forward(comfy, model, clip, z_t)}
    for name in PATCHES:
        results[name] = forward(comfy, patcher(name, comfy, bank, base_directory)(model), clip, z_t)
    return results


def test_each_likeness_patch_acts_alone(alone):
    for name in PATCHES:
        assert differs(alone[name], alone["plain"]), name


@pytest.mark.parametrize("first, second", ORDERED_PAIRS)
def test_two_likeness_patches_on_one_model_each_still_act(comfy, sd15, features, base_directory, alone, first,
                                                          second):
    """``second`` put on a model that already has ``first``: the result differs from each patch alone
    by far more than rounding, so neither silenced the other."""
    model, clip = sd15
    z_t, bank = features
    both_model = patcher(second, comfy, bank, base_directory)(patcher(first, comfy, bank, base_directory)(model))
    if "infinite_id" in (first, second) and "ffa" in (first, second):
        # The LoRA's input recorder sees what the projections see: it runs after FFA's input mix.
        attn1_patches = both_model.model_options["transformer_options"]["patches"]["attn1_patch"]
        assert type(attn1_patches[-1]).__name__ == "LoRAInputs", [type(p).__name__ for p in attn1_patches]
    both = forward(comfy, both_model, clip, z_t)
    assert torch.isfinite(both).all()
    assert differs(both, alone[first]), f"{second} must still act beside {first}"
    assert differs(both, alone[second]), f"{first} must still act beside {second}"


def face_pass_keys_values(comfy, monkeypatch, model, clip, z_t) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every K_f/V_f Face Fusion computes from the face pass during one run, in call order."""
    face_fusion = comfy.pack("attention.face_fusion.face_kv_attention")
    original = face_fusion.face_keys_values
    seen = []

    def recording(*args, **kwargs):
        k_f, v_f = original(*args, **kwargs)
        seen.append((k_f.detach().clone(), v_f.detach().clone()))
        return k_f, v_f

    monkeypatch.setattr(face_fusion, "face_keys_values", recording)
    forward(comfy, model, clip, z_t)
    monkeypatch.setattr(face_fusion, "face_keys_values", original)
    return seen


@pytest.mark.parametrize("ffa_first", [True, False])
def test_the_face_pass_is_the_same_with_and_without_ffa(comfy, monkeypatch, sd15, features, ffa_first):
    """FFA acts on the image being made only: Face Fusion's face pass (an auxiliary pass) gives
    bit-identical K_f/V_f whether FFA is on the model or not."""
    model, clip = sd15
    z_t, bank = features
    # Beside FFA the faces take a call of their own: so do they here, so that the rows of each
    # matrix product are the same and any difference is FFA's.
    monkeypatch.setattr(comfy.pack("attention.face_fusion.face_pass"), "BATCH_FACE_ROWS", False)
    reference = face_pass_keys_values(comfy, monkeypatch, with_face_fusion(comfy, model), clip, z_t)
    both = (with_face_fusion(comfy, with_ffa(comfy, model, bank)) if ffa_first
            else with_ffa(comfy, with_face_fusion(comfy, model), bank))
    beside_ffa = face_pass_keys_values(comfy, monkeypatch, both, clip, z_t)
    assert len(reference) == len(beside_ffa) > 0
    for (k_plain, v_plain), (k_ffa, v_ffa) in zip(reference, beside_ffa):
        assert torch.equal(k_plain, k_ffa) and torch.equal(v_plain, v_ffa)


def test_a_face_latent_of_another_size_works_beside_ffa(comfy, sd15, features, alone):
    """The face pass at 6x6 beside an 8x8 image with FFA: FFA's cached 8x8 features are never
    offered to the face pass, and the face still acts."""
    model, clip = sd15
    z_t, bank = features
    both = forward(comfy, with_face_fusion(comfy, with_ffa(comfy, model, bank), size=6), clip, z_t)
    assert torch.isfinite(both).all()
    assert differs(both, alone["ffa"]), "the face must act beside FFA"


def test_face_fusion_and_infinite_id_on_an_editing_model(comfy, base_directory, tiny_checkpoints):
    """The MCDM conditioning beside Face Fusion (whose face pass reads each reference as the
    editing model reads an unedited portrait: its own latent as the source) and beside Infinite-ID:
    each acts on the 8-channel model."""
    from test_mcdm import conditionings, mcdm_guider, one_step, portrait
    from tiny import tiny_mcdm

    files = tiny_mcdm.write(base_directory / "models")
    mcdm = comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                          clip_vision_name=files["clip_vision"])
    checkpoint = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    positive, negative, latent = conditionings(comfy, checkpoint, mcdm, portrait(64))
    model = mcdm[0]
    sigmas = model.model.model_sampling.sigma(torch.tensor([900.0, 600.0, 300.0]))
    start = {"samples": torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(4))}

    def edit(patched):
        return one_step(comfy, mcdm_guider(comfy, patched, positive, negative, (3.0, 2.0, 4.0)), start, sigmas)

    plain = edit(model)
    fused = edit(with_face_fusion(comfy, model))
    assert torch.isfinite(fused).all() and differs(fused, plain), "Face Fusion must act on the editing model"
    identity = edit(with_infinite_id(comfy, model, base_directory))
    assert torch.isfinite(identity).all() and differs(identity, plain), "Infinite-ID must act on the editing model"


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
