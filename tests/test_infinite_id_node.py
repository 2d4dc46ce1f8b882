"""The LikenessInfiniteID node end to end in-process: loader, face analysis,
CLIP vision (a tiny one built from a ComfyUI CLIP-vision config), patch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.faceid_reference import (authors_faceid_plus, identities_of, model_card_inputs, one_model_call,
                                      proj_plus_model, write_float32_adapter)
from harness.sampling import txt2img_latent
from harness.threads import one_thread
from harness.workflows import TINY_FACE_PACK, for_tiny_models, load_api
from tiny import tiny_faceid, tiny_insightface, tiny_models

@pytest.fixture(scope="module")
def clip_vision(comfy, base_directory):
    """The tiny CLIP vision tower, through ComfyUI's own CLIPVisionLoader."""
    path = tiny_models.write_clip_vision(base_directory / "models" / "clip_vision")
    return comfy.run_node("CLIPVisionLoader", clip_name=path.name)[0]


@pytest.fixture(scope="module")
def parts(comfy, base_directory, clip_vision):
    tiny_insightface.write_pack(base_directory / "models" / "insightface", TINY_FACE_PACK)
    (analysis,) = comfy.run_node("LikenessFaceAnalysis", model_name=TINY_FACE_PACK, provider="CPU")
    import skimage.data

    photo = torch.from_numpy(skimage.data.astronaut()).float()[None] / 255
    return analysis, clip_vision, torch.cat([photo, photo.flip(2)])


def run_node(comfy, model, adapter, parts, **overrides):
    analysis, clip_vision, images = parts
    settings = dict(weight=1.0, mixed_attention=True, cross_attention_merge=True, adain_mean=False, mix_weights="",
                    shortcut_scale=1.0, start_percent=0.0, end_percent=1.0, image=images[:1])
    settings.update(overrides)
    return comfy.run_node("LikenessInfiniteID", model=model, id_adapter=adapter, analysis=analysis,
                          clip_vision=clip_vision, **settings)[0]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_infinite_id_node_runs_and_weight_zero_is_text_only(comfy, tiny_checkpoints, base_directory, parts, kind):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[kind])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / f"tiny_faceid_{kind}.safetensors", kind)
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    plain = txt2img_latent(comfy, model, clip)
    identity = txt2img_latent(comfy, run_node(comfy, model, adapter, parts), clip)
    assert torch.isfinite(identity).all() and (identity - plain).abs().max() > 1e-2 * plain.abs().max()
    assert torch.equal(txt2img_latent(comfy, run_node(comfy, model, adapter, parts, weight=0.0), clip), plain)
    styled = txt2img_latent(comfy, run_node(comfy, model, adapter, parts, adain_mean=True), clip)
    assert (styled - identity).abs().max() > 1e-2 * identity.abs().max()


def test_a_reference_of_weight_zero_is_never_read(comfy, tiny_checkpoints, base_directory, parts):
    # Two references against two: the CPU's matrix kernels round a batch of one and a batch of two
    # differently, so "1, 0" is compared with another second person, not with one reference alone.
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "tiny_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    photo, flipped = parts[2][:1], parts[2][1:]

    def sample(image, mix_weights):
        return txt2img_latent(comfy, run_node(comfy, model, adapter, parts, image=image, mix_weights=mix_weights),
                              clip)

    first_only = sample(torch.cat([photo, flipped]), "1, 0")
    assert torch.equal(sample(torch.cat([photo, photo]), "1, 0"), first_only)
    both = sample(torch.cat([photo, flipped]), "1, 1")
    assert (both - first_only).abs().max() > 1e-2 * first_only.abs().max(), "the second person, weighted, acts"
    with pytest.raises(ValueError, match="mix_weights"):
        run_node(comfy, model, adapter, parts, image=torch.cat([photo, flipped]), mix_weights="1")


def test_an_adapter_for_the_other_family_is_refused(comfy, tiny_checkpoints, base_directory, parts):
    model, _, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "tiny_faceid_sdxl.safetensors", "sdxl")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    with pytest.raises(ValueError, match="id_adapter"):
        run_node(comfy, model, adapter, parts)


def write_pairs(folder):
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage.data.astronaut())
    for index in range(2):
        photo.crop((40 * index, 0, 320 + 40 * index, 320)).resize((64, 64)).save(folder / f"pair{index}.png")
        photo.save(folder / f"pair{index}.id.png")


def test_id_adapter_trainer_lowers_the_loss_and_its_file_loads(comfy, tiny_checkpoints, base_directory, parts):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "tiny_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    write_pairs(base_directory / "input" / "id_pairs")
    analysis, clip_vision, _ = parts
    before_training = txt2img_latent(comfy, model, clip)
    name, before, after, curve = comfy.run_node(
        "LikenessTrainIDAdapter", model=model, clip=clip, vae=vae, id_adapter=adapter, analysis=analysis,
        clip_vision=clip_vision, folder="id_pairs", steps=8, learning_rate=1e-3, seed=0, shortcut_scale=1.0,
        filename_prefix="trained_id", batch_size=1)
    assert after < before, (before, after)
    assert curve.shape == (1, 512, 768, 3) and 0 <= curve.min() and curve.max() <= 1
    assert (curve < 0.9).any(axis=-1).float().mean() > 0.01, "the plot draws axes, text and the curve"
    (trained,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=name)
    assert trained.kind == "sd15" and trained.layer_count == 16
    moved = max(float((trained.kv_weights[k][0].float() - adapter.kv_weights[k][0].float()).abs().max()
                      / adapter.kv_weights[k][0].float().abs().max()) for k in adapter.kv_weights)
    assert moved > 1e-2, "training must move the image K/V weights (AdamW, learning rate 1e-3, 8 steps)"
    # the UNet was frozen and is shared with the rest of the graph: it computes exactly what it did
    assert torch.equal(txt2img_latent(comfy, model, clip), before_training)


def test_id_adapter_training_never_reads_the_prompt(comfy, tiny_checkpoints, base_directory, parts):
    training = comfy.pack("attention.infinite_id.id_adapter_training")
    recipe = dataclasses.replace(comfy.pack("attention.shared.recipes").ID_ADAPTER_TRAINING, learning_rate=1e-3)
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "tiny_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 8, 8, generator=generator)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1)
    hidden = torch.randn(1, 5, tiny_faceid.CLIP_DIM, generator=generator)
    results = []
    for prompt in ("a portrait photo", "a red car on a bridge"):
        with torch.inference_mode():
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        pair = training.IdentityPair(target, face, hidden, cond)
        with one_thread():  # the CPU's backward pass sums across threads in no fixed order
            _, before, after = training.train_id_adapter(model, adapter, [pair], steps=2, recipe=recipe, seed=3,
                                                     no_face_hidden=torch.zeros_like(hidden))
        results.append((before, after))
    assert results[0] == results[1]


def float32_adapter(comfy, base_directory, kind="sd15"):
    path = write_float32_adapter(base_directory / "models" / "ipadapter" / f"node_faceid_{kind}_f32.safetensors", kind)
    return comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)[0]


NEW_STACK, NEW_MEAN = "stack: weights as attention log-bias", "mean: weighted mean of tokens"


@pytest.mark.parametrize("mode", [NEW_STACK, "stack", NEW_MEAN, "mean"])
def test_each_mixing_mode_is_its_hand_computation(comfy, tiny_checkpoints, base_directory, parts, mode):
    """Two people at 0.7 / 0.3. stack: their tokens side by side with log(0.7) / log(0.3) on their
    keys' logits, the "no face" tokens once per person; mean: 0.7·c_a + 0.3·c_b (Fig. 14), one set
    of "no face" tokens. The names saved workflows hold ("stack", "mean") compute the same."""
    import math

    model, _, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    adapter = float32_adapter(comfy, base_directory)
    images = parts[2]
    people = [identities_of(run_node(comfy, model, adapter, parts, image=images[i:i + 1]))[0] for i in range(2)]
    (mixed,) = identities_of(run_node(comfy, model, adapter, parts, image=images, mix_weights="0.7, 0.3",
                                      mixing=mode))
    first, second = (person.tokens for person in people)
    tokens = first.shape[1]
    if mode.startswith("stack"):
        torch.testing.assert_close(mixed.tokens, torch.cat([first, second], 1), rtol=1e-5, atol=1e-6)
        expected_bias = torch.tensor([math.log(0.7)] * tokens + [math.log(0.3)] * tokens)
        torch.testing.assert_close(mixed.token_bias, expected_bias)
        torch.testing.assert_close(mixed.uncond_tokens, people[0].uncond_tokens.repeat(1, 2, 1))
    else:
        torch.testing.assert_close(mixed.tokens, 0.7 * first + 0.3 * second, rtol=1e-5, atol=1e-6)
        assert mixed.token_bias is None
        torch.testing.assert_close(mixed.uncond_tokens, people[0].uncond_tokens)
    assert (first - second).abs().max() > 1e-2 * first.abs().max()  # two people, not one twice


@pytest.mark.parametrize("mixing, valid", [(NEW_STACK, True), (NEW_MEAN, True), ("stack", True), ("mean", True),
                                           ("average", False)])
def test_saved_workflows_mixing_values_pass_comfyuis_validation(comfy, shipped_model_files, mixing, valid):
    """identity_mix as shipped, and as saved before the modes were renamed, through ComfyUI's own
    prompt validation (what the server runs on a POSTed or queued workflow). ComfyUI 0.3.75 does not
    check a V3 combo's value against its options; the node's validate_inputs does, for every host."""
    import execution

    from harness.inprocess import run_coroutine

    prompt = for_tiny_models(load_api("identity_mix"))
    (node_id,) = [k for k, node in prompt.items() if node["class_type"] == "LikenessInfiniteID"]
    prompt[node_id]["inputs"]["mixing"] = mixing
    ok, error, _, node_errors = run_coroutine(execution.validate_prompt("mixing-test", prompt, None))
    assert ok == valid, (error, node_errors)
    if not valid:
        assert "average" in json_text(node_errors) and NEW_STACK in json_text(node_errors)


def json_text(value) -> str:
    import json

    return json.dumps(value)


SWITCHES = [dict(mixed_attention=m, cross_attention_merge=c, adain_mean=a)
            for m in (True, False) for c in (True, False) for a in (False, True)]


def test_each_switch_and_the_no_face_tokens_of_the_node_equal_the_functions_run_directly(
        comfy, tiny_checkpoints, base_directory, parts):
    """Every combination of mixed_attention, cross_attention_merge and adain_mean, at lora_scale 0.6
    and shortcut_scale 0.8: the node's model call equals apply_infinite_id run with the same switches
    on tokens computed here (ProjPlusModel on insightface's own embedding and norm_crop) and the
    authors' "no face" tokens (get_image_embeds); each switch changes the call."""
    from PIL import Image

    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    analysis, clip_vision, images = parts
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    adapter = float32_adapter(comfy, base_directory)
    photo = (images[0].numpy() * 255).round().astype("uint8")
    card = model_card_inputs(base_directory / "models" / "insightface" / "models" / TINY_FACE_PACK, photo)
    with torch.no_grad():
        hidden = clip_vision.encode_image(card.clip_image)["penultimate_hidden_states"].float()
        tokens = proj_plus_model("sd15")(card.embedding, hidden, shortcut=True, scale=0.8)
    _, no_face = authors_faceid_plus(clip_vision, "sd15").get_image_embeds(
        card.embedding, Image.fromarray(photo), s_scale=0.8, shortcut=True)
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    calls = {}
    for switches in SWITCHES:
        node = run_node(comfy, model, adapter, parts, shortcut_scale=0.8, lora_scale=0.6, **switches)
        torch.testing.assert_close(identities_of(node)[0].uncond_tokens, no_face.float(), rtol=1e-4, atol=1e-5)
        direct = infinite_id.apply_infinite_id(model, infinite_id.InfiniteID(
            tokens=tokens, uncond_tokens=no_face.float(), kv=adapter.kv_weights, lora=adapter.faceid_lora(model, 0.6),
            **switches), keys)
        got, expected = one_model_call(comfy, model, node, clip), one_model_call(comfy, model, direct, clip)
        for row, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=lambda m: f"{switches}, row {row}: {m}")
        calls[tuple(switches.values())] = torch.cat(got)
    for position, name in enumerate(SWITCHES[0]):
        flipped = [(on, calls[tuple(not v if i == position else v for i, v in enumerate(on))]) for on in calls]
        largest = max(float((calls[on] - other).abs().max()) for on, other in flipped)
        assert largest > 1e-2 * float(calls[(True, True, False)].abs().max()), f"{name} changes nothing"
