"""Face Fusion on the real host: exactness at weight 0, the face pass's input and prompt, the schedule,
another processor's mask, Infinite-ID beside it, chaining, the trainer. Hand computations of Eq. 2–7
are in test_face_fusion_oracle.py."""

from __future__ import annotations

import math

import pytest
import torch

from harness.face_spies import (TEXT_TOKENS, AttentionRecorder, UNetCalls, face_latent, fuse, relative_difference,
                                softmax_attention)
from harness.sampling import encode, txt2img_latent
from tiny import tiny_faceid

FLOOR = 1e-2  # "changes the output": well above batch-size rounding on the tiny models


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def test_weight_zero_is_the_unpatched_model(comfy, family):
    _, model, clip = family
    plain = txt2img_latent(comfy, model, clip)
    assert torch.equal(txt2img_latent(comfy, fuse(comfy, model, face_latent(), weight=0.0), clip), plain)


def test_a_face_changes_the_output_and_leaves_the_model_alone(comfy, family):
    _, model, clip = family
    before = txt2img_latent(comfy, model, clip)
    fused = txt2img_latent(comfy, fuse(comfy, model, face_latent()), clip)
    assert torch.isfinite(fused).all()
    assert relative_difference(fused, before) > FLOOR
    assert torch.equal(txt2img_latent(comfy, model, clip), before)
    # Noised, a face input at high sigma is mostly its fixed noise (by design, as the image's is);
    # clean, it is the face alone: another face must give another image. The tiny random UNets'
    # cross-attention moves the final latent little (another prompt: ~3%, another face: ~0.5%), so the
    # floor is on the face's own contribution (fused - plain), which another face changes by ~20%.
    one = txt2img_latent(comfy, fuse(comfy, model, face_latent(), face_noise="clean"), clip)
    other = txt2img_latent(comfy, fuse(comfy, model, face_latent(seed=99), face_noise="clean"), clip)
    assert relative_difference(other - before, one - before) > 10 * FLOOR, "another face, another image"


def test_every_cross_attention_layer_gets_the_face_keys(comfy, family, monkeypatch):
    _, model, clip = family
    layers = comfy.pack("attention.shared.layer_table")
    recorder = AttentionRecorder().install(monkeypatch, comfy.pack("attention.shared.dispatch"))
    fused = fuse(comfy, model, face_latent(count=2))  # two references of one person
    txt2img_latent(comfy, fused, clip, steps=1)
    with_faces = [c for c in recorder.calls if c["k"].shape[1] > TEXT_TOKENS]
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    assert {c["key"] for c in with_faces} == set(keys)
    assert all(c["mask"] is None for c in with_faces), "one person needs no mask: fused attention stays fast"
    for call in with_faces:
        # same size face latent: each reference brings as many tokens as the image has queries
        assert call["k"].shape[1] - TEXT_TOKENS == 2 * call["q"].shape[1]


def test_chaining_adds_people_to_one_patch(comfy, tiny_checkpoints):
    import comfy.patcher_extension as extension

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    face_fusion = comfy.pack("attention.face_fusion.face_kv_attention")
    one = fuse(comfy, model, face_latent(seed=1))
    two = fuse(comfy, one, face_latent(seed=2))
    wrappers = two.get_wrappers(extension.WrappersMP.DIFFUSION_MODEL, face_fusion.WRAPPER_KEY)
    assert len(wrappers) == 1 and len(wrappers[0].fusion.identities) == 2
    (first,) = one.get_wrappers(extension.WrappersMP.DIFFUSION_MODEL, face_fusion.WRAPPER_KEY)
    assert len(first.fusion.identities) == 1, "chaining must not change the first patched model"
    assert relative_difference(txt2img_latent(comfy, two, clip), txt2img_latent(comfy, one, clip)) > FLOOR


def test_uncond_rows_can_be_kept_off_the_face(comfy, tiny_checkpoints, monkeypatch):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    recorder = AttentionRecorder().install(monkeypatch, comfy.pack("attention.shared.dispatch"))
    txt2img_latent(comfy, fuse(comfy, model, face_latent(), uncond=False), clip, steps=1)
    call = next(c for c in recorder.calls if c["mask"] is not None)
    probs, _ = softmax_attention(call["q"], call["k"], call["v"], call["heads"], call["mask"])
    kinds = comfy.pack("attention.shared.rows").row_kinds(call["cond_or_uncond"], probs.shape[0])
    for row, kind in enumerate(kinds):
        face_share = probs[row][..., TEXT_TOKENS:].sum(-1)
        assert (face_share.max() == 0) if kind == 1 else (face_share.min() > 0)


SCALE_FACTOR = {"sd15": 0.18215, "sdxl": 0.13025}  # the published latent scales of SD1.x and SDXL


def test_a_clean_face_is_the_latent_itself_at_the_smallest_timestep(comfy, family, monkeypatch):
    name, model, clip = family
    face = face_latent()
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    txt2img_latent(comfy, fuse(comfy, model, face, face_noise="clean"), clip, steps=3)
    assert len(spy.faces) == len(spy.images) == 3
    for call in spy.faces:
        assert torch.equal(call["x"], face["samples"] * SCALE_FACTOR[name])
        assert (call["timesteps"] == 0).all(), "SD's smallest sigma is timestep 0"


def test_the_face_pass_reads_the_positive_prompt_when_cond_and_uncond_run_apart(comfy, family, monkeypatch):
    name, model, clip = family
    dispatch = comfy.pack("attention.shared.dispatch")
    # What ComfyUI does when cond and uncond together do not fit in memory.
    monkeypatch.setattr(model.model, "memory_required", lambda *a, **k: float("inf"))
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    txt2img_latent(comfy, fuse(comfy, model, face_latent()), clip, steps=1)  # positive "a portrait photo"
    positive = encode(comfy, clip, "a portrait photo")[0][0][0]
    assert sorted(c["cond_or_uncond"] for c in spy.images) == [[0], [1]]
    cond = next(c for c in spy.images if c["cond_or_uncond"] == [0])
    uncond = next(c for c in spy.images if c["cond_or_uncond"] == [1])
    assert relative_difference(uncond["context"][0], positive.to(uncond["context"])) > FLOOR
    for index, call in enumerate(spy.calls):
        if call["face"]:
            continue
        face = spy.calls[index - 1]  # each image call follows its face pass
        assert face["face"]
        assert torch.equal(face["context"][0], positive.to(face["context"])), call["cond_or_uncond"]
        if name == "sdxl":  # the pooled prompt and size embedding of the positive, not the negative's
            assert relative_difference(uncond["y"][0], cond["y"][0]) > FLOOR
            assert torch.equal(face["y"][0], cond["y"][0]), call["cond_or_uncond"]
        assert face["options"].get(dispatch.PASS) is dispatch.Pass.FACE_REFERENCE, \
            "marked, so that other Likeness patches leave the face pass alone"


def test_the_face_acts_only_inside_its_start_end_window(comfy, tiny_checkpoints, monkeypatch):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    sampling = model.get_model_object("model_sampling")
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    txt2img_latent(comfy, fuse(comfy, model, face_latent(), start_percent=0.3, end_percent=0.7), clip, steps=6)
    steps = [c["sigma"] for c in spy.images]
    first, last = sampling.percent_to_sigma(0.3), sampling.percent_to_sigma(0.7)
    inside = [s for s in steps if last <= s <= first]
    assert 0 < len(inside) < len(steps)
    assert [c["sigma"] for c in spy.faces] == inside
    # A window between two steps: no face pass, and the unpatched model's output bit for bit.
    spy.calls.clear()
    plain = txt2img_latent(comfy, model, clip, steps=6)
    assert not [s for s in steps if s == sampling.percent_to_sigma(0.5)]
    windowless = fuse(comfy, model, face_latent(), start_percent=0.5, end_percent=0.5)
    assert torch.equal(txt2img_latent(comfy, windowless, clip, steps=6), plain)
    assert not spy.faces


class BiasedText:
    """A processor outside Face Fusion (order < 150) that passes a mask over the text keys only, as
    Infinite-ID's stacked identities pass one over their image tokens."""

    order = 100

    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def __call__(self, q, k, v, extra_options, attend):
        return attend(q, k, v, extra_options, mask=self.bias.to(q).view(1, 1, -1))


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_another_processors_mask_is_widened_over_the_face_keys(comfy, tiny_checkpoints, monkeypatch, weight):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    dispatch, layers = comfy.pack("attention.shared.dispatch"), comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    text_bias = torch.randn(TEXT_TOKENS, generator=torch.Generator().manual_seed(5))
    fused = fuse(comfy, model, face_latent(), weight=weight)
    both = dispatch.patched_clone(fused, [("attn2", key, BiasedText(text_bias)) for key in keys])
    recorder = AttentionRecorder().install(monkeypatch, dispatch)
    biased = txt2img_latent(comfy, both, clip, steps=1)
    calls = [c for c in recorder.calls if c["k"].shape[1] > TEXT_TOKENS]
    assert {c["key"] for c in calls} == set(keys)
    for call in calls:
        rows, queries, width = call["q"].shape[0], call["q"].shape[1], call["k"].shape[1]
        expected = torch.full((rows, queries, width), math.log(weight))
        expected[..., :TEXT_TOKENS] = text_bias
        assert torch.equal(call["mask"].float().expand(rows, queries, width), expected), call["key"]
        _, by_hand = softmax_attention(call["q"], call["k"], call["v"], call["heads"], expected)
        torch.testing.assert_close(call["out"].double(), by_hand, rtol=1e-4, atol=1e-5)
    assert relative_difference(biased, txt2img_latent(comfy, fused, clip, steps=1)) > FLOOR


def with_infinite_id(comfy, model, base_directory):
    infinite_id, layers = (comfy.pack("attention.infinite_id.identity_streams"),
                           comfy.pack("attention.shared.layer_table"))
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "face_fusion_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    adapter = adapter.to(dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    settings = infinite_id.InfiniteID(tokens=torch.randn(1, 4, adapter.cross_attention_dim, generator=generator),
                                      uncond_tokens=torch.zeros(1, 4, adapter.cross_attention_dim),
                                      kv=adapter.kv_weights, lora=adapter.faceid_lora(model))
    return infinite_id.apply_infinite_id(model, settings, layers.attention_keys(layers.diffusion_model_of(model)))


@pytest.mark.parametrize("face_first", [True, False])
def test_beside_infinite_id_the_face_pass_is_one_plain_call(comfy, tiny_checkpoints, base_directory, monkeypatch,
                                                            face_first):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    face_fusion, infinite_id = (comfy.pack("attention.face_fusion.face_kv_attention"),
                                comfy.pack("attention.infinite_id.identity_streams"))
    face_only = fuse(comfy, model, face_latent())
    identity_only = with_infinite_id(comfy, model, base_directory)
    both = (with_infinite_id(comfy, face_only, base_directory) if face_first
            else fuse(comfy, identity_only, face_latent()))
    spy = UNetCalls(face_fusion.FACE_PASS).install(monkeypatch, model)
    out = txt2img_latent(comfy, both, clip, steps=2)
    # Infinite-ID runs two streams per model call; one face pass per model call, whichever wrapper
    # is outside (the identity stream reads the face through the text stream's K/V), carrying
    # neither stream's state.
    dispatch = comfy.pack("attention.shared.dispatch")
    streams = len(spy.images) // 2
    assert len(spy.faces) == streams and streams == 2
    for call in spy.faces:
        assert call["options"][dispatch.PASS] is dispatch.Pass.FACE_REFERENCE
        assert not {infinite_id.TEXT_STREAM, infinite_id.IDENTITY_STREAM} & set(call["options"])
    spy.calls.clear()
    assert relative_difference(out, txt2img_latent(comfy, identity_only, clip, steps=2)) > FLOOR, \
        "the face must still contribute beside Infinite-ID"
    assert relative_difference(out, txt2img_latent(comfy, face_only, clip, steps=2)) > FLOOR, \
        "Infinite-ID must still contribute beside the face"


def test_bf16_model_two_people_of_different_face_sizes(comfy, tiny_checkpoints, base_directory, monkeypatch):
    import comfy.sd as comfy_sd

    path = base_directory / "models" / "checkpoints" / tiny_checkpoints["sd15"]
    model, clip, _, _ = comfy_sd.load_checkpoint_guess_config(str(path), model_options={"dtype": torch.bfloat16})
    assert model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_q.weight.dtype == \
        torch.bfloat16
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :36], right[:, 28:] = 1.0, 1.0
    fused = fuse(comfy, model, face_latent(seed=1, size=8), mask=left, weight=0.5, face_noise="clean")
    fused = fuse(comfy, fused, face_latent(seed=2, size=6), mask=right, weight=2.0)
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    out = txt2img_latent(comfy, fused, clip, steps=2)
    # One face pass per face size, in the dtype ComfyUI runs the model in, the clean one at timestep 0.
    assert sorted(tuple(c["x"].shape[-2:]) for c in spy.faces) == [(6, 6), (6, 6), (8, 8), (8, 8)]
    assert {c["x"].dtype for c in spy.calls} == {spy.images[0]["x"].dtype}
    assert all((c["timesteps"] == 0).all() for c in spy.faces if c["x"].shape[-1] == 8)
    assert torch.isfinite(out).all()
    assert relative_difference(out, txt2img_latent(comfy, model, clip, steps=2)) > FLOOR


def write_dataset(folder, count=2):
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage.data.astronaut())
    for index in range(count):
        box = (60 + 20 * index, 0, 380 + 20 * index, 320)
        photo.crop(box).resize((64, 64)).save(folder / f"shot{index}.png")
        photo.crop((150, 40, 270, 160)).resize((64, 64)).save(folder / f"shot{index}.face.png")
        (folder / f"shot{index}.txt").write_text("a photo of an astronaut")


def test_trainer_lowers_the_loss_leaves_the_model_alone_and_its_weights_load(comfy, tiny_checkpoints,
                                                                             base_directory):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    write_dataset(base_directory / "input" / "face_kv_test")
    plain_before = txt2img_latent(comfy, model, clip)
    free = txt2img_latent(comfy, fuse(comfy, model, face_latent()), clip)
    name, before, after, _ = comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae,
                                         folder="face_kv_test", steps=8, learning_rate=1e-2, seed=0,
                                         filename_prefix="face_kv_test")
    assert after < before, (before, after)
    # The UNet was frozen: the base model and the training-free fusion compute what they did before.
    assert torch.equal(txt2img_latent(comfy, model, clip), plain_before)
    assert torch.equal(txt2img_latent(comfy, fuse(comfy, model, face_latent()), clip), free)
    path = base_directory / "models" / "likeness" / name
    assert path.exists()
    trained = txt2img_latent(comfy, fuse(comfy, model, face_latent(), kv=name), clip)
    assert relative_difference(trained, free) > FLOOR


def test_training_and_sampling_give_the_face_pass_the_same_input(comfy, tiny_checkpoints, base_directory,
                                                                 monkeypatch):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    face_pass = comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS
    write_dataset(base_directory / "input" / "face_kv_rule", count=1)
    seed = 5
    spy = UNetCalls(face_pass).install(monkeypatch, model)
    comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae, folder="face_kv_rule", steps=1,
                   learning_rate=1e-3, seed=seed, filename_prefix="face_kv_rule")
    trained = spy.faces[0]  # the validation loss before the first step
    sigma = trained["sigma"]
    assert sigma > 1.0, "a noisy step, where noise and scaling both matter"
    # By hand: the face latent noised with the fixed noise of the trainer's seed + 1 (the first example),
    # scaled as SD's input at sigma: (x0 + n·σ)/√(σ² + 1), at the timestep ComfyUI gives sigma.
    (image, _) = comfy.run_node("LoadImage", image="face_kv_rule/shot0.face.png")
    (face,) = comfy.run_node("VAEEncode", pixels=image, vae=vae)
    x0 = face["samples"].double() * SCALE_FACTOR["sd15"]
    noise = torch.randn(face["samples"].shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    expected = (x0 + noise * sigma) / math.sqrt(sigma ** 2 + 1)
    torch.testing.assert_close(trained["x"].double(), expected, rtol=1e-5, atol=1e-6)
    timestep = model.get_model_object("model_sampling").timestep(torch.tensor([sigma]))
    assert torch.equal(trained["timesteps"], timestep.float())
    # Sampling at that sigma with the same noise gives the face pass the same tensor, bit for bit.
    spy.calls.clear()
    (sampler,) = comfy.run_node("KSamplerSelect", sampler_name="euler")
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    comfy.run_node("SamplerCustom", model=fuse(comfy, model, face, noise_seed=seed + 1), add_noise=True,
                   noise_seed=0, cfg=1.0, positive=encode(comfy, clip, "a photo of an astronaut"),
                   negative=encode(comfy, clip, ""), sampler=sampler, sigmas=torch.tensor([sigma, 0.0]),
                   latent_image=latent)
    (sampled,) = spy.faces
    assert sampled["sigma"] == sigma
    assert torch.equal(sampled["x"], trained["x"]) and torch.equal(sampled["timesteps"], trained["timesteps"])
    assert torch.equal(sampled["context"], trained["context"]), "both read the caption as the positive prompt"


def test_trainer_names_what_a_bad_folder_lacks(comfy, tiny_checkpoints, base_directory):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    folder = base_directory / "input" / "face_kv_bad"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(folder / "lonely.png")
    with pytest.raises(ValueError, match="lonely.face.png"):
        comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae, folder="face_kv_bad", steps=1,
                       learning_rate=1e-3, seed=0, filename_prefix="x")


def test_trainer_can_be_interrupted_and_writes_nothing(comfy, tiny_checkpoints, base_directory, monkeypatch):
    import comfy.model_management as model_management

    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    write_dataset(base_directory / "input" / "face_kv_interrupt")
    steps_seen = []
    original = model_management.throw_exception_if_processing_interrupted

    def interrupt_after_two_steps(*args, **kwargs):
        if len(steps_seen) >= 2:
            raise model_management.InterruptProcessingException()
        return original(*args, **kwargs)

    training = comfy.pack("attention.face_fusion.face_kv_training")
    real_train = training.train_face_kv

    def counting_train(*args, on_step=None, **kwargs):
        def step(index, loss):
            steps_seen.append(index)
            on_step(index, loss)
        return real_train(*args, on_step=step, **kwargs)

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_after_two_steps)
    monkeypatch.setattr(training, "train_face_kv", counting_train)
    before = set((base_directory / "models" / "likeness").glob("interrupted*"))
    with pytest.raises(model_management.InterruptProcessingException):
        comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae, folder="face_kv_interrupt",
                       steps=50, learning_rate=1e-3, seed=0, filename_prefix="interrupted")
    assert len(steps_seen) == 2
    assert set((base_directory / "models" / "likeness").glob("interrupted*")) == before
