"""The FaceID-PlusV2 loader (Infinite-ID's identity stream) on the real host, with tiny files in the real layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_faceid

FORMATS = (".safetensors", ".bin")


@pytest.fixture(scope="module")
def ipadapter_folder(comfy, base_directory):
    return base_directory / "models" / "ipadapter"


@pytest.fixture(scope="module")
def tiny_files(ipadapter_folder) -> dict[tuple[str, str], str]:
    """{(kind, suffix): file name} in models/ipadapter/, with FaceID's LoRA like the released files."""
    names = {}
    for kind in tiny_faceid.KINDS:
        for suffix in FORMATS:
            name = f"tiny_faceid_plusv2_{kind}{suffix}"
            tiny_faceid.write(ipadapter_folder / name, kind, seed=len(names))
            names[kind, suffix] = name
    return names


@pytest.fixture(scope="module", params=list(tiny_faceid.KINDS))
def family(request, comfy, tiny_checkpoints):
    model, _, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    layers = comfy.pack("attention.shared.layer_table")
    return request.param, layers.diffusion_model_of(model)


def load(comfy, name):
    return comfy.run_node("LikenessIDAdapterLoader", adapter_name=name)[0]


def test_file_numbering_is_diffusers_processor_order(comfy, family):
    kind, unet = family
    id_adapter, layers = comfy.pack("attention.infinite_id.id_adapter"), comfy.pack("attention.shared.layer_table")
    layout = id_adapter.FILE_LAYOUTS[kind]
    assert list(layout) == id_adapter.file_order(layers.attention_keys(unet))
    # IPAdapter_plus' numbering (number*2+1 over input ids, output ids, then middle):
    # file 1 is the first input block, the output blocks follow the inputs, the middle block comes last.
    first_output = {"sd15": 6, "sdxl": 24}[kind]
    assert layout[0] == {"sd15": ("input", 1, 0), "sdxl": ("input", 4, 0)}[kind]
    assert layout[first_output - 1][0] == "input"
    assert layout[first_output] == ("output", {"sd15": 3, "sdxl": 0}[kind], 0)
    assert layout[-1] == {"sd15": ("middle", 0, 0), "sdxl": ("middle", 0, 9)}[kind]
    assert len(layout) == {"sd15": 16, "sdxl": 70}[kind]


@pytest.mark.parametrize("suffix", FORMATS)
def test_tiny_files_load_strictly_and_cover_every_cross_attention(comfy, family, tiny_files, ipadapter_folder, suffix):
    kind, unet = family
    layers = comfy.pack("attention.shared.layer_table")
    adapter = load(comfy, tiny_files[kind, suffix])
    context = tiny_faceid.KINDS[kind]["context"]
    assert (adapter.kind, adapter.num_tokens, adapter.cross_attention_dim) == (kind, 4, context)
    assert adapter.layer_count == len(layers.attention_keys(unet)) == {"sd15": 16, "sdxl": 70}[kind]
    assert set(adapter.kv_weights) == set(layers.attention_keys(unet))
    for key in layers.attention_keys(unet):
        to_k = layers.transformer_block(unet, key).attn2.to_k.weight
        w_k, w_v = adapter.kv_weights[key]
        assert w_k.shape == w_v.shape == to_k.shape, key  # (layer inner width, context width)
    # Each block key holds the file's tensor of its number, as written.
    written = tiny_faceid.state_dict(kind, seed=list(tiny_files).index((kind, suffix)))
    for n, key in enumerate(comfy.pack("attention.infinite_id.id_adapter").FILE_LAYOUTS[kind]):
        assert torch.equal(adapter.kv_weights[key][0], written[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"])
        assert torch.equal(adapter.kv_weights[key][1], written[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"])


def test_the_combo_lists_the_ipadapter_folder(comfy, tiny_files):
    options = comfy.node_class("LikenessIDAdapterLoader").GET_SCHEMA().inputs[0].options
    assert set(tiny_files.values()) <= set(options)


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("kind, dropped", [("sd15", "ip_adapter.31.to_v_ip.weight"),
                                           ("sdxl", "image_proj.perceiver_resampler.layers.2.0.to_kv.weight"),
                                           ("sdxl", "ip_adapter.138.to_out_lora.up.weight")])
def test_a_file_with_a_key_missing_is_refused_naming_it(comfy, ipadapter_folder, kind, dropped, suffix):
    name = f"tiny_faceid_missing_{kind}_{dropped.split('.')[-3]}{suffix}"
    tiny_faceid.write(ipadapter_folder / name, kind, drop=(dropped,))
    with pytest.raises(ValueError) as refused:
        load(comfy, name)
    message = str(refused.value)
    assert dropped in message and name in message and "adapter_name" in message
    assert "1 missing key" in message


def test_unexpected_keys_and_other_files_are_refused(comfy, ipadapter_folder):
    state = tiny_faceid.state_dict("sd15")
    state["ip_adapter.33.to_k_ip.weight"] = state["ip_adapter.31.to_k_ip.weight"].clone()
    tiny_faceid.write_safetensors(ipadapter_folder / "tiny_extra.safetensors", state)
    with pytest.raises(ValueError, match=r"unexpected key.*ip_adapter\.33\.to_k_ip\.weight"):
        load(comfy, "tiny_extra.safetensors")

    # A plain IP-Adapter (no FaceID projection) summarises what is missing, with counts.
    plain = {k: v for k, v in state.items() if k.startswith("ip_adapter.") and "lora" not in k}
    plain.update({"image_proj.proj.weight": torch.zeros(4 * 64, 32), "image_proj.norm.weight": torch.ones(64)})
    tiny_faceid.write_safetensors(ipadapter_folder / "tiny_plain_ipadapter.safetensors", plain)
    with pytest.raises(ValueError, match=r"tiny_plain_ipadapter\.safetensors.*missing key\(s\): .*proj\.0\.weight"):
        load(comfy, "tiny_plain_ipadapter.safetensors")

    whole = (ipadapter_folder / "tiny_faceid_plusv2_sd15.safetensors").read_bytes()
    (ipadapter_folder / "tiny_truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="tiny_truncated.safetensors.*truncated"):
        load(comfy, "tiny_truncated.safetensors")

    torch.save({"image_proj": {}, "ip_adapter": {}, "hook": ExecutesOnLoad()}, ipadapter_folder / "tiny_pickle.bin")
    with pytest.raises(ValueError, match="tiny_pickle.bin.*weights-only"):
        load(comfy, "tiny_pickle.bin")

    with pytest.raises(ValueError, match="adapter_name='nothing.bin'.*models/ipadapter/"):
        load(comfy, "nothing.bin")


def test_files_without_faceid_lora_load_and_widths_are_checked(comfy, ipadapter_folder):
    tiny_faceid.write(ipadapter_folder / "tiny_no_lora.safetensors", "sd15", lora=False)
    adapter = load(comfy, "tiny_no_lora.safetensors")
    assert adapter.lora == {} and adapter.layer_count == 16

    state = tiny_faceid.state_dict("sd15", lora=False)
    state["ip_adapter.5.to_k_ip.weight"] = torch.zeros(64, tiny_faceid.KINDS["sd15"]["context"] + 1)
    tiny_faceid.write_safetensors(ipadapter_folder / "tiny_wrong_width.safetensors", state)
    with pytest.raises(ValueError, match=r"ip_adapter\.5\.to_k_ip.*\(64, 65\)"):
        load(comfy, "tiny_wrong_width.safetensors")


class ExecutesOnLoad:
    """Stands for a pickle that would run code: weights_only must refuse it."""


def reference_tokens(state: dict[str, torch.Tensor], face: torch.Tensor, clip: torch.Tensor, scale: float,
                     width: int) -> torch.Tensor:
    """FaceID-PlusV2 from the raw tensors, written out the way the IP-Adapter code computes it."""
    p = {k[len("image_proj."):]: v.float() for k, v in state.items() if k.startswith("image_proj.")}
    x = F.linear(F.gelu(F.linear(face, p["proj.0.weight"], p["proj.0.bias"])), p["proj.2.weight"], p["proj.2.bias"])
    x = F.layer_norm(x.reshape(face.shape[0], -1, width), (width,), p["norm.weight"], p["norm.bias"])
    r = "perceiver_resampler."
    features = F.linear(clip, p[r + "proj_in.weight"], p[r + "proj_in.bias"])
    latents = x
    for i in range(tiny_faceid.DEPTH):
        a, f = f"{r}layers.{i}.0.", f"{r}layers.{i}.1."
        feats = F.layer_norm(features, (width,), p[a + "norm1.weight"], p[a + "norm1.bias"])
        lat = F.layer_norm(latents, (width,), p[a + "norm2.weight"], p[a + "norm2.bias"])
        q = F.linear(lat, p[a + "to_q.weight"])
        k, v = F.linear(torch.cat([feats, lat], 1), p[a + "to_kv.weight"]).chunk(2, -1)
        heads = q.shape[-1] // tiny_faceid.HEAD_WIDTH
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        weight = (q @ k.transpose(-1, -2) / math.sqrt(tiny_faceid.HEAD_WIDTH)).softmax(-1)
        out = (weight @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        latents = latents + F.linear(out, p[a + "to_out.weight"])
        hidden = F.layer_norm(latents, (width,), p[f + "0.weight"], p[f + "0.bias"])
        latents = latents + F.linear(F.gelu(F.linear(hidden, p[f + "1.weight"])), p[f + "3.weight"])
    resampled = F.layer_norm(F.linear(latents, p[r + "proj_out.weight"], p[r + "proj_out.bias"]), (width,),
                             p[r + "norm_out.weight"], p[r + "norm_out.bias"])
    return x + scale * resampled


@pytest.mark.parametrize("kind", list(tiny_faceid.KINDS))
def test_image_tokens_follow_faceid_plusv2(comfy, tiny_files, kind):
    state = tiny_faceid.state_dict(kind, seed=list(tiny_files).index((kind, ".safetensors")))
    adapter = load(comfy, tiny_files[kind, ".safetensors"]).to(dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    face = F.normalize(torch.randn(2, 512, generator=generator), dim=-1)
    clip = torch.randn(2, 9, tiny_faceid.CLIP_DIM, generator=generator)
    width = tiny_faceid.KINDS[kind]["context"]

    tokens = adapter.image_tokens(face, clip, scale=1.0)
    assert tokens.shape == (2, 4, width) and tokens.dtype == torch.float32
    for scale in (0.0, 0.5, 1.0):
        torch.testing.assert_close(adapter.image_tokens(face, clip, scale=scale),
                                   reference_tokens(state, face, clip, scale, width), rtol=1e-4, atol=1e-4)
    # V2 shortcut: scale 0 is exactly the MLP + LayerNorm tokens; the resampler adds linearly.
    mlp_only = adapter.image_tokens(face, clip, scale=0.0)
    torch.testing.assert_close(mlp_only, reference_tokens(state, face, clip, 0.0, width), rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter.image_tokens(face, clip, 0.5) - mlp_only,
                               0.5 * (tokens - mlp_only), rtol=1e-4, atol=1e-5)
    # One face for a batch of CLIP images, and a wrong CLIP width named in the error.
    assert adapter.image_tokens(face[:1], clip).shape == (2, 4, width)
    with pytest.raises(ValueError, match=f"\\(batch, tokens, {tiny_faceid.CLIP_DIM}\\)"):
        adapter.image_tokens(face, torch.zeros(2, 9, tiny_faceid.CLIP_DIM + 1))


def test_low_precision_copy_leaves_the_loaded_adapter_alone(comfy, tiny_files):
    adapter = load(comfy, tiny_files["sdxl", ".bin"])
    half = adapter.to(dtype=torch.bfloat16)
    assert adapter.dtype == torch.float16 and half.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for pair in half.kv_weights.values() for w in pair)
    generator = torch.Generator().manual_seed(5)
    tokens = half.image_tokens(torch.randn(1, 512, generator=generator),
                               torch.randn(1, 5, tiny_faceid.CLIP_DIM, generator=generator))
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens).all()


@pytest.mark.parametrize("kind", list(tiny_faceid.KINDS))
def test_save_then_load_round_trips_every_tensor(comfy, tiny_files, ipadapter_folder, kind):
    id_adapter = comfy.pack("attention.infinite_id.id_adapter")
    adapter = load(comfy, tiny_files[kind, ".bin"])
    path = ipadapter_folder / f"tiny_saved_{kind}.safetensors"
    id_adapter.save_id_adapter(adapter, path)
    again = load(comfy, path.name)
    before, after = adapter.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    written = tiny_faceid.state_dict(kind, seed=list(tiny_files).index((kind, ".bin")))
    assert before.keys() == written.keys(), "state_dict() is the file layout, LoRA included"
    assert all(torch.equal(before[key], written[key]) for key in written)
    assert again.kind == kind and again.layer_count == adapter.layer_count
