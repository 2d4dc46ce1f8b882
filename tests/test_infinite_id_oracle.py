"""Infinite-ID's identity stream against IP-Adapter's authors' code (ip-adapterv, test-only):
FaceID-PlusV2's tokens (ProjPlusModel, V2 shortcut, s_scale), its "no face" tokens
(get_image_embeds), and its LoRA on the identity rows (LoRAIPAttnProcessor2_0 /
LoRAAttnProcessor2_0) inside a real ComfyUI model call; the text rows stay the original model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import required
from harness.faceid_reference import hf_clip_vision
from harness.sampling import encode
from tiny import tiny_faceid, tiny_models

STEP_TIMESTEP = 500.0


@pytest.fixture(scope="module")
def oracle():
    required.module("ip_adapter", "ip-adapterv (test-only) is installed by tests/run.py")
    import ip_adapter.attention_processor_faceid as processors
    import ip_adapter.ip_adapter_faceid as faceid

    return faceid, processors


@pytest.fixture(scope="module")
def clip_vision(comfy, base_directory):
    path = tiny_models.write_clip_vision(base_directory / "models" / "clip_vision")
    return comfy.run_node("CLIPVisionLoader", clip_name=path.name)[0]


def adapter_for(comfy, base_directory, kind, seed=7, **loader):
    name = f"oracle_faceid_{kind}_{seed}.safetensors"
    tiny_faceid.write(base_directory / "models" / "ipadapter" / name, kind, seed=seed)
    return comfy.run_node("LikenessIDAdapterLoader", adapter_name=name, **loader)[0], tiny_faceid.state_dict(kind, seed)


def file_section(state: dict, section: str) -> dict:
    prefix = section + "."
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def reference_projection(faceid, state: dict, kind: str):
    projection = faceid.ProjPlusModel(cross_attention_dim=tiny_faceid.KINDS[kind]["context"],
                                      id_embeddings_dim=tiny_faceid.ID_DIM, clip_embeddings_dim=tiny_faceid.CLIP_DIM,
                                      num_tokens=tiny_faceid.NUM_TOKENS)
    projection.load_state_dict(file_section(state, "image_proj"))
    return projection.eval()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_identity_tokens_equal_proj_plus_model_with_the_v2_shortcut(comfy, base_directory, oracle, kind):
    faceid, _ = oracle
    adapter, state = adapter_for(comfy, base_directory, kind)
    reference = reference_projection(faceid, state, kind)
    generator = torch.Generator().manual_seed(1)
    face = F.normalize(torch.randn(2, tiny_faceid.ID_DIM, generator=generator), dim=-1)
    clip = torch.randn(2, 5, tiny_faceid.CLIP_DIM, generator=generator)
    ours = adapter.to(dtype=torch.float32)
    for s_scale in (0.4, 1.0, 1.7):
        with torch.no_grad():
            expected = reference(face, clip, shortcut=True, scale=s_scale)
        torch.testing.assert_close(ours.image_tokens(face, clip, s_scale), expected, rtol=1e-4, atol=1e-5)


def test_cond_and_no_face_tokens_equal_get_image_embeds(comfy, base_directory, oracle, clip_vision):
    """Cond tokens from the face crop and uncond tokens from zero ArcFace + a zero *normalised*
    image, both as IPAdapterFaceIDPlus.get_image_embeds computes them."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    faceid, _ = oracle
    infinite_id = comfy.pack("attention.infinite_id.identity_tokens")
    adapter, state = adapter_for(comfy, base_directory, "sd15")
    size = tiny_models.TINY_CLIP_VISION["image_size"]
    pixels = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    face = F.normalize(torch.randn(1, tiny_faceid.ID_DIM, generator=torch.Generator().manual_seed(4)), dim=-1)

    author = faceid.IPAdapterFaceIDPlus.__new__(faceid.IPAdapterFaceIDPlus)
    author.device, author.torch_dtype = "cpu", torch.float32
    author.image_encoder = hf_clip_vision(clip_vision)
    author.clip_image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                     crop_size={"height": size, "width": size})
    author.image_proj_model = reference_projection(faceid, state, "sd15")
    cond, uncond = author.get_image_embeds(face, Image.fromarray(pixels), s_scale=0.8, shortcut=True)

    image = torch.from_numpy(pixels).float()[None] / 255
    with torch.no_grad():
        hidden = clip_vision.encode_image(image)["penultimate_hidden_states"]
    found = infinite_id.identity_tokens(adapter.to(dtype=torch.float32), face, hidden,
                                        infinite_id.no_face_clip_hidden(clip_vision), [1.0], 0.8)
    torch.testing.assert_close(found.tokens, cond.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(found.uncond, uncond.float(), rtol=1e-4, atol=1e-5)
    # A black photo (what the pack used before) moves the uncond tokens: the authors' input matters.
    with torch.no_grad():
        black = clip_vision.encode_image(torch.zeros_like(image))["penultimate_hidden_states"]
        from_black = adapter.to(dtype=torch.float32).image_tokens(torch.zeros_like(face), black, 0.8)
    assert (from_black - uncond).abs().max() > 1e-2 * uncond.abs().max()


STREAM_ROWS = "likeness_infinite_id_stream_rows"  # a model call holding the text and identity streams' rows


def stream_of(extra_options: dict) -> str:
    for name in ("identity", "text"):
        if f"likeness_infinite_id_{name}_stream" in extra_options:
            return name
    return "plain"


def is_the_plain_models(got: torch.Tensor, plain: torch.Tensor) -> bool:
    """The text stream's output against the unpatched model's. In a call holding both streams the
    text rows share the UNet's matmuls with the identity rows, whose larger batch may round the last
    bit differently: equal within 1e-5 relative there (a LoRA or identity token leaking onto the text
    rows moves them by ~1e-2); bit for bit with a call per stream (test_text_stream_output_...)."""
    return bool((got.double() - plain.double()).abs().max() <= 1e-5 * plain.double().abs().max())


def streams_in(extra_options: dict, rows: int) -> dict[str, tuple[slice, list]]:
    """Each stream a model call holds: its rows and its cond_or_uncond. A call holding both streams
    (one identity) has the text rows first, then the identity stream's."""
    layout = extra_options.get(STREAM_ROWS)
    if layout is None:
        return {stream_of(extra_options): (slice(0, rows), list(extra_options["cond_or_uncond"]))}
    assert len(layout.identities) == 1 and rows == 2 * layout.text_rows
    text = layout.text_rows
    return {"text": (slice(0, text), list(layout.chunks)), "identity": (slice(text, rows), list(layout.chunks))}


class LayerRecorder:
    """A test attn patch and output patch placed after Infinite-ID's: what one layer's attention
    projections saw (n, context, value) and what it returned after to_out, per stream."""

    def __init__(self, kind: str, key):
        self.kind, self.key = kind, tuple(key)
        self.inputs: dict[str, tuple] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def _here(self, extra_options) -> bool:
        block = extra_options.get("block")
        return block is not None and (block[0], block[1], extra_options.get("block_index", 0)) == self.key

    def patch(self, n, context, value, extra_options):
        if self._here(extra_options):
            for stream, (rows, cond_or_uncond) in streams_in(extra_options, n.shape[0]).items():
                assert stream not in self.inputs, "one model call per test"
                self.inputs[stream] = (n[rows].clone(), context[rows].clone(), cond_or_uncond)
        return n, context, value

    def output(self, n, extra_options):
        if self._here(extra_options):
            for stream, (rows, _) in streams_in(extra_options, n.shape[0]).items():
                self.outputs[stream] = n[rows].clone()
        return n

    def install(self, model):
        recording = model.clone()
        getattr(recording, f"set_model_{self.kind}_patch")(self.patch)
        getattr(recording, f"set_model_{self.kind}_output_patch")(self.output)
        return recording


def diffusers_attention(comfy_attention, cross: bool):
    from diffusers.models.attention_processor import Attention

    inner, query_dim = comfy_attention.to_q.weight.shape
    attention = Attention(query_dim=query_dim, cross_attention_dim=comfy_attention.to_k.weight.shape[1] if cross
                          else None, heads=comfy_attention.heads, dim_head=comfy_attention.dim_head, bias=False,
                          out_bias=True)
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            getattr(attention, name).weight.copy_(getattr(comfy_attention, name).weight.float())
        attention.to_out[0].weight.copy_(comfy_attention.to_out[0].weight.float())
        attention.to_out[0].bias.copy_(comfy_attention.to_out[0].bias.float())
    return attention.eval()


def one_model_call(comfy, model, patched, clip):
    """One batched cond+uncond call of ``patched`` at a mid timestep, as a sampler makes it."""
    training = comfy.pack("attention.shared.training_loop")
    positive, negative = encode(comfy, clip, "a portrait photo"), encode(comfy, clip, "blurry")
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([STEP_TIMESTEP]))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma
    with torch.no_grad():
        return training.denoised_predictions(model, patched, [positive, negative], noisy, sigma)


def infinite_id_settings(comfy, adapter, model, **overrides):
    infinite_id = comfy.pack("attention.infinite_id.identity_streams")
    generator = torch.Generator().manual_seed(9)
    context = adapter.cross_attention_dim
    settings = dict(tokens=torch.randn(1, 4, context, generator=generator),
                    uncond_tokens=torch.randn(1, 4, context, generator=generator),
                    kv={k: (w_k.float(), w_v.float()) for k, (w_k, w_v) in adapter.kv_weights.items()},
                    lora=adapter.to(dtype=torch.float32).faceid_lora(model))
    settings.update(overrides)
    return infinite_id.InfiniteID(**settings)


def layer_file_numbers(comfy, kind, key) -> tuple[int, int]:
    layout = comfy.pack("attention.infinite_id.id_adapter").FILE_LAYOUTS[kind]
    n = layout.index(tuple(key))
    return 2 * n, 2 * n + 1  # attn1, attn2 processor numbers in the file


def lora_processor_state(ip: dict, number: int, with_ip: bool) -> dict:
    parts = [f"to_{p}_lora.{side}.weight" for p in ("q", "k", "v", "out") for side in ("down", "up")]
    if with_ip:
        parts += ["to_k_ip.weight", "to_v_ip.weight"]
    return {part: ip[f"{number}.{part}"] for part in parts}


LAYERS = {"sd15": [("input", 1, 0), ("middle", 0, 0), ("output", 11, 0)],
          "sdxl": [("input", 7, 3), ("output", 1, 9)]}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_identity_rows_cross_attention_equals_lora_ip_attn_processor(comfy, tiny_checkpoints, base_directory, oracle,
                                                                     kind):
    _, processors = oracle
    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    adapter, state = adapter_for(comfy, base_directory, kind)
    ip = file_section(state, "ip_adapter")
    settings = infinite_id_settings(comfy, adapter, model)
    unet = layers.diffusion_model_of(model)
    for key in LAYERS[kind]:
        recorder = LayerRecorder("attn2", key)
        patched = recorder.install(infinite_id.apply_infinite_id(model, settings, layers.attention_keys(unet)))
        one_model_call(comfy, model, patched, clip)
        n, context, cond_or_uncond = recorder.inputs["identity"]
        output = recorder.outputs["identity"]
        n_text, context_text, _ = recorder.inputs["text"]
        comfy_attention = layers.transformer_block(unet, key).attn2
        attention = diffusers_attention(comfy_attention, cross=True)
        processor = processors.LoRAIPAttnProcessor2_0(
            hidden_size=comfy_attention.to_q.weight.shape[0], cross_attention_dim=context.shape[-1],
            rank=tiny_faceid.LORA_RANK, scale=1.0, num_tokens=settings.tokens.shape[1])
        processor.load_state_dict(lora_processor_state(ip, layer_file_numbers(comfy, kind, key)[1], with_ip=True))
        uncond = comfy.pack("attention.shared.rows").row_mask(1, cond_or_uncond, n.shape[0])
        ip_tokens = torch.where(uncond.view(-1, 1, 1), settings.uncond_tokens, settings.tokens)
        with torch.no_grad():
            expected = processor(attention, n.float(), torch.cat([context.float(), ip_tokens], 1))
            plain_text = comfy_attention(n_text, context=context_text)
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
        assert is_the_plain_models(recorder.outputs["text"], plain_text), \
            f"{key}: the text stream is the original attention"
        # The LoRA is really there: without it the identity rows differ well above rounding.
        no_lora = processors.LoRAIPAttnProcessor2_0(
            hidden_size=comfy_attention.to_q.weight.shape[0], cross_attention_dim=context.shape[-1],
            rank=tiny_faceid.LORA_RANK, scale=1.0, num_tokens=settings.tokens.shape[1], lora_scale=0.0)
        no_lora.load_state_dict(processor.state_dict())
        with torch.no_grad():
            without = no_lora(attention, n.float(), torch.cat([context.float(), ip_tokens], 1))
        assert (without - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_identity_rows_self_attention_equals_lora_attn_processor(comfy, tiny_checkpoints, base_directory, oracle, kind):
    """With mixed attention off the identity stream's self-attention is FaceID's LoRAAttnProcessor2_0;
    with it on, K and V also hold the text stream's (unLoRAed) keys: Eq. 5 by hand."""
    _, processors = oracle
    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    adapter, state = adapter_for(comfy, base_directory, kind)
    ip = file_section(state, "ip_adapter")
    unet = layers.diffusion_model_of(model)
    key = LAYERS[kind][0]
    comfy_attention = layers.transformer_block(unet, key).attn1
    attention = diffusers_attention(comfy_attention, cross=False)
    processor = processors.LoRAAttnProcessor2_0(hidden_size=comfy_attention.to_q.weight.shape[0],
                                                rank=tiny_faceid.LORA_RANK)
    processor.load_state_dict(lora_processor_state(ip, layer_file_numbers(comfy, kind, key)[0], with_ip=False))
    for mixed in (False, True):
        settings = infinite_id_settings(comfy, adapter, model, mixed_attention=mixed)
        recorder = LayerRecorder("attn1", key)
        patched = recorder.install(infinite_id.apply_infinite_id(model, settings, layers.attention_keys(unet)))
        one_model_call(comfy, model, patched, clip)
        x_id, x_text = recorder.inputs["identity"][0].float(), recorder.inputs["text"][0].float()
        output = recorder.outputs["identity"]
        with torch.no_grad():
            if not mixed:
                expected = processor(attention, x_id)
            else:
                lora = {p: (getattr(processor, f"to_{p}_lora").down.weight, getattr(processor, f"to_{p}_lora").up.weight)
                        for p in ("q", "k", "v", "out")}

                def with_lora(weight, part, x):
                    down, up = lora[part]
                    return x @ weight.T + (x @ down.T) @ up.T

                q = with_lora(attention.to_q.weight, "q", x_id)
                k = torch.cat([with_lora(attention.to_k.weight, "k", x_id), x_text @ attention.to_k.weight.T], 1)
                v = torch.cat([with_lora(attention.to_v.weight, "v", x_id), x_text @ attention.to_v.weight.T], 1)
                heads = comfy_attention.heads
                split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
                weights = (split(q) @ split(k).transpose(-1, -2) / comfy_attention.dim_head ** 0.5).softmax(-1)
                hidden = (weights @ split(v)).transpose(1, 2).flatten(2)
                expected = attention.to_out[0](hidden) + (hidden @ lora["out"][0].T) @ lora["out"][1].T
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            assert is_the_plain_models(recorder.outputs["text"], comfy_attention(recorder.inputs["text"][0]))


@pytest.mark.parametrize("one_call", [False, True])
def test_text_stream_output_is_the_unpatched_models(comfy, tiny_checkpoints, base_directory, monkeypatch, one_call):
    """A weight-1 run: the text stream's noise prediction is bit for bit the unpatched model's with
    a call per stream, and within rounding of the larger batch with both streams in one call."""
    import comfy.patcher_extension as extension

    monkeypatch.setattr(comfy.pack("attention.infinite_id.stream_calls"), "BATCH_STREAMS", one_call)
    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    adapter, _ = adapter_for(comfy, base_directory, "sd15")
    settings = infinite_id_settings(comfy, adapter, model)
    patched = infinite_id.apply_infinite_id(model, settings, layers.attention_keys(layers.diffusion_model_of(model)))
    outputs: dict[str, list] = {"identity": [], "text": [], "plain": []}

    def spy(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        for stream, (rows, _) in streams_in(args[5], out.shape[0]).items():
            outputs[stream].append(out[rows])
        return out

    # The innermost DIFFUSION_MODEL wrapper sees each stream's UNet output.
    patched.add_wrapper_with_key(extension.WrappersMP.DIFFUSION_MODEL, "zz_test_spy", spy)
    plain = model.clone()
    plain.add_wrapper_with_key(extension.WrappersMP.DIFFUSION_MODEL, "zz_test_spy", spy)
    one_model_call(comfy, model, patched, clip)
    one_model_call(comfy, model, plain, clip)
    (identity,), (text,), (alone,) = outputs["identity"], outputs["text"], outputs["plain"]
    assert is_the_plain_models(text, alone) if one_call else torch.equal(text, alone)
    assert (identity - alone).abs().max() > 1e-2 * alone.abs().max()


def kohya_lora(comfy, model, ip: dict, kind: str, alpha: float | None = None, dtype=torch.float16) -> dict:
    """The adapter's LoRA as a separate kohya-format file (what h94 releases as *_lora.safetensors),
    named through ComfyUI's key map for this model; ``alpha`` None: alpha = rank, as h94's."""
    import comfy.lora as comfy_lora

    id_adapter = comfy.pack("attention.infinite_id.id_adapter")
    faceid_lora = comfy.pack("attention.infinite_id.faceid_lora")
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    prefix_of = {}
    for prefix, target in key_map.items():
        placed = faceid_lora.block_key_of(target)
        if prefix.startswith("lora_unet_") and placed is not None:
            prefix_of[placed] = prefix
    names = {"q": "q", "k": "k", "v": "v", "out": "out"}
    state = {}
    for n, key in enumerate(id_adapter.FILE_LAYOUTS[kind]):
        for kind_name, number in (("attn1", 2 * n), ("attn2", 2 * n + 1)):
            for part in names:
                prefix = prefix_of[((kind_name, key), part)]
                down, up = ip[f"{number}.to_{part}_lora.down.weight"], ip[f"{number}.to_{part}_lora.up.weight"]
                state[f"{prefix}.lora_down.weight"] = down.to(dtype)
                state[f"{prefix}.lora_up.weight"] = up.to(dtype)
                state[f"{prefix}.alpha"] = torch.tensor(float(down.shape[0] if alpha is None else alpha))
    return state


def test_a_separate_lora_file_gives_what_the_adapters_own_lora_gives(comfy, tiny_checkpoints, base_directory):
    from safetensors.torch import save_file

    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    adapter, state = adapter_for(comfy, base_directory, "sd15", seed=11)
    loras = base_directory / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(comfy, model, file_section(state, "ip_adapter"), "sd15"),
              str(loras / "oracle_faceid_sd15_11_lora.safetensors"))
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    outputs = {}
    for choice in ("from the adapter file", "oracle_faceid_sd15_11_lora.safetensors", "none"):
        (chosen,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name="oracle_faceid_sd15_11.safetensors",
                                   lora=choice)
        settings = infinite_id_settings(comfy, chosen, model, lora=chosen.to(dtype=torch.float32).faceid_lora(model))
        outputs[choice] = one_model_call(comfy, model, infinite_id.apply_infinite_id(model, settings, keys), clip)[0]
    own, separate, none = outputs.values()
    torch.testing.assert_close(separate, own, rtol=1e-3, atol=1e-3)  # fp16 file vs fp16 adapter, same values
    assert (none - own).abs().max() > 1e-2 * own.abs().max()


LORA_SCALE = 0.6  # neither 0 nor the reference's 1, where a dropped or doubled scale would not show
ALPHA = 2.0  # of rank tiny_faceid.LORA_RANK (4): the file's weights count half


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("source", ["adapter file", "kohya file, alpha 2 of rank 4"])
def test_the_lora_at_another_scale_and_alpha_equals_the_processors_at_that_scale(comfy, tiny_checkpoints,
                                                                              base_directory, oracle, kind, source):
    """lora_scale 0.6, from the adapter file (no alpha) or a separate file with alpha 2 at rank 4:
    the identity rows' self- and cross-attention equal LoRAAttnProcessor2_0 / LoRAIPAttnProcessor2_0
    built with lora_scale=0.6 and network_alpha=2 (IP-Adapter's LoRALinearLayer scales by alpha/rank)."""
    from safetensors.torch import save_file

    _, processors = oracle
    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    adapter, state = adapter_for(comfy, base_directory, kind, seed=13)
    ip = file_section(state, "ip_adapter")
    alpha = None
    if source != "adapter file":
        alpha, name = ALPHA, f"oracle_faceid_{kind}_alpha_lora.safetensors"
        loras = base_directory / "models" / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        save_file(kohya_lora(comfy, model, ip, kind, alpha=ALPHA, dtype=torch.float32), str(loras / name))
        (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=f"oracle_faceid_{kind}_13.safetensors",
                                    lora=name)
    lora = adapter.to(dtype=torch.float32).faceid_lora(model, LORA_SCALE)
    unet = layers.diffusion_model_of(model)
    key = LAYERS[kind][-1]
    self_number, cross_number = layer_file_numbers(comfy, kind, key)
    for kind_name in ("attn1", "attn2"):
        settings = infinite_id_settings(comfy, adapter, model, lora=lora, mixed_attention=False)
        recorder = LayerRecorder(kind_name, key)
        patched = recorder.install(infinite_id.apply_infinite_id(model, settings, layers.attention_keys(unet)))
        one_model_call(comfy, model, patched, clip)
        n, context, cond_or_uncond = recorder.inputs["identity"]
        comfy_attention = getattr(layers.transformer_block(unet, key), kind_name)
        hidden = comfy_attention.to_q.weight.shape[0]
        attention = diffusers_attention(comfy_attention, cross=kind_name == "attn2")
        if kind_name == "attn1":
            processor = processors.LoRAAttnProcessor2_0(hidden_size=hidden, rank=tiny_faceid.LORA_RANK,
                                                        network_alpha=alpha, lora_scale=LORA_SCALE)
            processor.load_state_dict(lora_processor_state(ip, self_number, with_ip=False))
            with torch.no_grad():
                expected = processor(attention, n.float())
        else:
            processor = processors.LoRAIPAttnProcessor2_0(
                hidden_size=hidden, cross_attention_dim=context.shape[-1], rank=tiny_faceid.LORA_RANK,
                network_alpha=alpha, lora_scale=LORA_SCALE, scale=1.0, num_tokens=settings.tokens.shape[1])
            processor.load_state_dict(lora_processor_state(ip, cross_number, with_ip=True))
            uncond = comfy.pack("attention.shared.rows").row_mask(1, cond_or_uncond, n.shape[0])
            ip_tokens = torch.where(uncond.view(-1, 1, 1), settings.uncond_tokens, settings.tokens)
            with torch.no_grad():
                expected = processor(attention, n.float(), torch.cat([context.float(), ip_tokens], 1))
        torch.testing.assert_close(recorder.outputs["identity"], expected, rtol=1e-4, atol=1e-4)
