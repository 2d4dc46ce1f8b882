"""The Multi-Conditioned Diffusion Model: released file layouts, the key conversion
proven against diffusers, the B/32 hidden states, the three-scale guider."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tiny_mcdm
from harness.sampling import encode


@pytest.fixture(scope="module")
def files(comfy, base_directory):
    return tiny_mcdm.write(base_directory / "models")


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    return comfy.load_checkpoint(tiny_checkpoints["sd15"])


@pytest.fixture(scope="module")
def mcdm(comfy, files):
    return comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                          clip_vision_name=files["clip_vision"])


def portrait(size: int = 512, seed: int = 3) -> torch.Tensor:
    """A smooth random image, (1, size, size, 3) in 0..1."""
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").movedim(1, -1)


def conditionings(comfy, sd15, mcdm, image, prompt="a man in a suit", negative=""):
    _, clip, vae = sd15
    return comfy.run_node("LikenessMCDMConditioning", mcdm=mcdm[1], positive=encode(comfy, clip, prompt),
                          negative=encode(comfy, clip, negative), vae=vae, image=image)


def write_pairs(folder, seeds: list[tuple[int, int]], prompt: str | None = None) -> None:
    """pair_NNNNN.png (target) and pair_NNNNN.source.png from (target seed, source seed)."""
    from PIL import Image

    folder.mkdir()
    for index, (target_seed, source_seed) in enumerate(seeds):
        for suffix, seed in (("", target_seed), (".source", source_seed)):
            Image.fromarray((portrait(64, seed)[0] * 255).byte().numpy()).save(folder / f"pair_{index:05d}{suffix}.png")
        if prompt is not None:
            (folder / f"pair_{index:05d}.txt").write_text(prompt)


def predictions(comfy, model, conds, noisy, sigma):
    training = comfy.pack("attention.training")
    return training.denoised_predictions(model, model, conds, noisy, sigma)


def test_released_layout_loads_as_an_8_channel_sd15_unet(mcdm):
    model, state = mcdm
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 8
    assert type(model.model).__name__ == "SD15_instructpix2pix"
    assert state.image_tokens == 50 and state.scaled_concat
    assert state.image_encoder.width == tiny_mcdm.WIDTH


def test_a_diffusers_safetensors_unet_loads_the_same_weights(comfy, base_directory, mcdm):
    unet = {k: v.contiguous() for k, v in tiny_mcdm.diffusers_unet().state_dict().items()}
    save_file(unet, str(base_directory / "models" / "likeness" / "diffusers_unet.safetensors"))
    model, state = comfy.run_node("LikenessMCDMLoader", unet_name="diffusers_unet.safetensors", adapter_name="none",
                                  clip_vision_name="none")
    assert state.adapter is None
    for (key, value), released in zip(model.model.diffusion_model.state_dict().items(),
                                      mcdm[0].model.diffusion_model.state_dict().values()):
        assert torch.equal(value, released), key


def test_wrong_files_are_refused_with_what_would_be_accepted(comfy, base_directory, files, tiny_checkpoints):
    likeness = base_directory / "models" / "likeness"
    four = {f"module.{k}": v for k, v in tiny_mcdm.diffusers_unet(in_channels=4).state_dict().items()}
    torch.save(four, likeness / "four_channels.pth")
    with pytest.raises(ValueError, match=r"unet_name='four_channels.pth'.*4 channels.*takes 8"):
        comfy.run_node("LikenessMCDMLoader", unet_name="four_channels.pth", adapter_name="none",
                       clip_vision_name="none")
    adapter = torch.load(likeness / files["adapter"], weights_only=True)
    save_file({**{k[len("module."):]: v for k, v in adapter.items()}, "extra.weight": torch.zeros(1)},
              str(likeness / "bad_adapter.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_name='bad_adapter.safetensors'.*unexpected extra.weight"):
        comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name="bad_adapter.safetensors",
                       clip_vision_name=files["clip_vision"])
    with pytest.raises(ValueError, match=r"clip_vision_name='none'.*CLIP ViT-B/32"):
        comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                       clip_vision_name="none")
    # A pickle that needs code to load is refused by weights_only=True.
    torch.save({"module.conv_in.weight": torch.zeros(1), "object": object()}, likeness / "pickled.pth")
    with pytest.raises(ValueError, match="unet_name='pickled.pth'.*weights_only=True"):
        comfy.run_node("LikenessMCDMLoader", unet_name="pickled.pth", adapter_name="none", clip_vision_name="none")


def test_key_conversion_and_adapter_match_diffusers_and_the_released_adapter(comfy, sd15, mcdm):
    """The same noise prediction through LikenessMCDMLoader inside ComfyUI as through diffusers."""
    from comfy.clip_vision import clip_preprocess

    model, state = mcdm
    image = portrait()
    positive, negative, latent = conditionings(comfy, sd15, mcdm, image)
    reference_unet = tiny_mcdm.diffusers_unet()
    reference_adapter = tiny_mcdm.released_adapter()
    tower = tiny_mcdm.clip_b32()
    # ComfyUI stores a CLIP vision tower in its text-encoder dtype (fp16) and computes in fp32: the
    # reference gets the same rounded weights.
    tower.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in tower.state_dict().items()})
    sigma = model.model.model_sampling.sigma(torch.tensor([420.0]))
    noisy = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(9)) * sigma
    with torch.no_grad():
        (denoised,) = predictions(comfy, model, [positive], noisy, sigma)
    noise_comfy = (noisy - denoised) / sigma

    c_s = latent["samples"] * 0.18215
    with torch.no_grad():
        pixels = clip_preprocess(image, size=224)
        clip_tokens = tower(pixel_values=pixels).last_hidden_state
        image_tokens = reference_adapter(clip_tokens, c_s)
        text = positive[0][0][:, :77]
        sample = torch.cat([noisy / torch.sqrt(sigma ** 2 + 1), c_s], dim=1)
        timestep = model.model.model_sampling.timestep(sigma)
        context = torch.cat([text, image_tokens], 1)
        noise_diffusers = reference_unet(sample, timestep, encoder_hidden_states=context).sample
    assert positive[0][0].shape[1] == 77 + 50
    assert (positive[0][0][:, 77:] - image_tokens).abs().max() <= 1e-5
    assert (noise_comfy - noise_diffusers).abs().max() <= 1e-4
    assert noise_diffusers.abs().mean() > 0.1  # a real prediction, not zeros on both sides


def one_step(comfy, guider, latent, sigmas, seed=5):
    (noise,) = comfy.run_node("RandomNoise", noise_seed=seed)
    (sampler,) = comfy.run_node("KSamplerSelect", sampler_name="euler")
    out, _ = comfy.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                            latent_image=latent)
    return out["samples"]


def mcdm_guider(comfy, model, positive, negative, scales, **optional):
    return comfy.run_node("LikenessMCDMGuider", model=model, positive=positive, negative=negative,
                          image_scale=scales[0], spatial_scale=scales[1], text_scale=scales[2], **optional)[0]


@pytest.fixture(scope="module")
def small_edit(comfy, sd15, mcdm):
    image = portrait(64)
    positive, negative, latent = conditionings(comfy, sd15, mcdm, image)
    source = conditionings(comfy, sd15, mcdm, image, prompt="a man in a sweater")[0]
    sigmas = mcdm[0].model.model_sampling.sigma(torch.tensor([900.0, 600.0]))
    return positive, negative, source, {"samples": torch.zeros_like(latent["samples"])}, sigmas


def test_scales_of_one_give_the_all_conditions_prediction(comfy, mcdm, small_edit):
    model = mcdm[0]
    positive, negative, _, latent, sigmas = small_edit
    plain = comfy.run_node("CFGGuider", model=model, positive=positive, negative=negative, cfg=1.0)[0]
    assert torch.allclose(one_step(comfy, mcdm_guider(comfy, model, positive, negative, (1, 1, 1)), latent, sigmas),
                          one_step(comfy, plain, latent, sigmas), rtol=1e-5, atol=1e-4)


def test_three_scales_follow_eq_1_over_the_released_rows(comfy, mcdm, small_edit):
    model = mcdm[0]
    rows_module = comfy.pack("attention.mcdm")
    positive, negative, _, latent, sigmas = small_edit
    scales = (3.0, 2.0, 4.0)
    stepped = one_step(comfy, mcdm_guider(comfy, model, positive, negative, scales), latent, sigmas, seed=5)

    rows = rows_module.guidance_rows(positive, negative)
    start = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    with torch.no_grad():
        full, null, image_only, image_spatial = predictions(
            comfy, model, [rows.full, rows.null, rows.image_only, rows.image_spatial], start, sigmas[:1])
    denoised = rows_module.combine(null, full, image_only, image_spatial, *scales)
    expected = model.model.process_latent_out(start + (start - denoised) / sigmas[0] * (sigmas[1] - sigmas[0]))
    assert torch.allclose(stepped, expected, rtol=1e-5, atol=1e-3)
    # the rows really differ: each scale changes the result
    for changed in ((1.0, 2.0, 4.0), (3.0, 1.0, 4.0), (3.0, 2.0, 1.0)):
        other = one_step(comfy, mcdm_guider(comfy, model, positive, negative, changed), latent, sigmas)
        assert not torch.allclose(other, stepped, atol=1e-4), changed


def test_mask_of_ones_is_the_target_only_edit_and_zeros_the_source_only(comfy, mcdm, small_edit):
    model = mcdm[0]
    positive, negative, source, latent, sigmas = small_edit
    scales = (3.0, 2.0, 4.0)
    target_only = one_step(comfy, mcdm_guider(comfy, model, positive, negative, scales), latent, sigmas)
    source_only = one_step(comfy, mcdm_guider(comfy, model, source, negative, scales), latent, sigmas)
    assert not torch.allclose(target_only, source_only, atol=1e-4)
    for mask, expected in ((torch.ones(64, 64), target_only), (torch.zeros(64, 64), source_only)):
        blended = one_step(comfy, mcdm_guider(comfy, model, positive, negative, scales, source=source, mask=mask),
                           latent, sigmas)
        # rows batched differently: float32 noise on values of order 100
        assert torch.allclose(blended, expected, rtol=1e-5, atol=1e-3), (blended - expected).abs().max()


def test_edit_mask_runs_on_an_mcdm(comfy, mcdm, small_edit):
    positive, _, source, _, _ = small_edit
    latent = {"samples": source[0][1]["concat_latent_image"] / 0.18215}
    (mask,) = comfy.run_node("LikenessEditMask", model=mcdm[0], latent=latent, source=source, target=positive,
                             seeds=2, strength=0.5, blur=5, threshold=0.2, normalisation="min-max", seed=0)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1


def test_instruct_pix2pix_checkpoint_loads_as_an_mcdm_without_adapter(comfy, base_directory, sd15, tiny_checkpoints):
    from safetensors.torch import load_file

    checkpoint = load_file(str(base_directory / "models" / "checkpoints" / tiny_checkpoints["sd15"]))
    conv_in = checkpoint["model.diffusion_model.input_blocks.0.0.weight"]
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat(
        [conv_in, torch.randn_like(conv_in) * 0.1], dim=1)
    save_file(checkpoint, str(base_directory / "models" / "likeness" / "tiny_ip2p.safetensors"))
    model, state = comfy.run_node("LikenessMCDMLoader", unet_name="tiny_ip2p.safetensors", adapter_name="none",
                                  clip_vision_name="none")
    assert state.adapter is None and not state.scaled_concat
    image = portrait(64)
    positive, negative, latent = conditionings(comfy, sd15, (model, state), image)
    assert positive[0][0].shape[1] == 77
    assert torch.equal(positive[0][1]["concat_latent_image"], latent["samples"])  # InstructPix2Pix: unscaled
    rows = comfy.pack("attention.mcdm").guidance_rows(positive, negative)
    assert rows.image_only is None  # row 2 is row 0 without image tokens
    sigmas = model.model.model_sampling.sigma(torch.tensor([900.0, 600.0]))
    empty = {"samples": torch.zeros_like(latent["samples"])}
    stepped = one_step(comfy, mcdm_guider(comfy, model, positive, negative, (3.0, 1.5, 7.5)), empty, sigmas)
    assert torch.isfinite(stepped).all()


def test_save_pairs_writes_a_training_folder_and_numbers_on(comfy, base_directory):
    sources, targets = torch.cat([portrait(64, 1), portrait(64, 2)]), torch.cat([portrait(64, 3), portrait(64, 4)])
    for _ in range(2):
        comfy.run_node("LikenessSavePairs", source=sources, target=targets, prompt="a man in a suit",
                       source_prompt="a man in a sweater", folder="pairs_numbering", filename_prefix="pair")
    folder = base_directory / "input" / "pairs_numbering"
    assert sorted(p.name for p in folder.glob("*.png"))[:4] == [
        "pair_00001.png", "pair_00001.source.png", "pair_00002.png", "pair_00002.source.png"]
    assert len(list(folder.glob("*.png"))) == 8
    assert (folder / "pair_00004.txt").read_text() == "a man in a suit"
    assert (folder / "pair_00004.source.txt").read_text() == "a man in a sweater"
    examples = comfy.pack("attention.face_kv_training").find_examples(folder, ".source")
    assert [e.image.name for e in examples] == [f"pair_{i:05d}.png" for i in range(1, 5)]
    with pytest.raises(ValueError, match="target"):
        comfy.run_node("LikenessSavePairs", source=sources, target=targets[:1], prompt="", source_prompt="",
                       folder="pairs_numbering", filename_prefix="pair")


def test_a_4_channel_model_starts_as_itself(comfy, sd15):
    """Zero-initialised extra conv_in channels: the expanded UNet predicts what the base model
    predicts, whatever c_s is."""
    model, clip, _ = sd15
    training = comfy.pack("attention.mcdm_training")
    expanded = comfy.pack("attention.mcdm").build_model(training.expanded_unet(model), dtype=torch.float32)
    assert expanded.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 8
    text = encode(comfy, clip, "a portrait")
    with_latent = [[text[0][0], {**text[0][1], "concat_latent_image": torch.randn(1, 4, 8, 8)}]]
    sigma = model.model.model_sampling.sigma(torch.tensor([500.0]))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma
    with torch.no_grad():
        (base,) = predictions(comfy, model, [text], noisy, sigma)
        (grown,) = predictions(comfy, expanded, [with_latent], noisy, sigma)
    assert torch.allclose(base, grown, atol=1e-5)


def test_trainer_loss_falls_and_its_files_load_back(comfy, base_directory, sd15, mcdm, files):
    model, clip, vae = sd15
    write_pairs(base_directory / "input" / "pairs_training", [(10, 20), (11, 21)], prompt="a man in a suit")
    for start in (mcdm[0], model):  # continue an MCDM; grow a 4-channel SD1.5
        name, before, after = comfy.run_node(
            "LikenessTrainMCDM", model=start, mcdm=mcdm[1], clip=clip, vae=vae, folder="pairs_training", steps=8,
            learning_rate=1e-4, seed=0, filename_prefix="tiny_trained")
        assert after < before, (before, after)
        loaded, state = comfy.run_node("LikenessMCDMLoader", unet_name=name,
                                       adapter_name=name.replace(".safetensors", ".adapter.safetensors"),
                                       clip_vision_name=files["clip_vision"])
        assert loaded.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 8
        assert not torch.equal(state.adapter.vae2clip.weight, mcdm[1].adapter.vae2clip.weight)
    # the input models are untouched
    fresh = comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                           clip_vision_name=files["clip_vision"])
    for (key, value), fresh_value in zip(mcdm[0].model.diffusion_model.state_dict().items(),
                                         fresh[0].model.diffusion_model.state_dict().values()):
        assert torch.equal(value, fresh_value), key
    assert torch.equal(mcdm[1].adapter.linear1.weight, fresh[1].adapter.linear1.weight)


def test_dropout_cases_and_identity_pairs_come_at_the_papers_rates(comfy):
    training = comfy.pack("attention.mcdm_training")
    generator = torch.Generator().manual_seed(0)
    draws = [training.draw_case(generator) for _ in range(20000)]
    identity = sum(i for i, _ in draws) / len(draws)
    assert abs(identity - 0.05) < 0.01
    for case in training.DROPOUT_CASES:
        assert abs(sum(d == case for _, d in draws) / len(draws) - 0.05) < 0.01, case
    assert abs(sum(d is None for _, d in draws) / len(draws) - 0.80) < 0.015


def test_bf16_mcdm_follows_the_fp32_one(comfy, base_directory, files, mcdm, small_edit):
    """The low-precision path users run on GPUs: same files built in bfloat16."""
    module = comfy.pack("attention.mcdm")
    state = module.load_state_dict(base_directory / "models" / "likeness" / files["unet"])
    half = module.build_model(module.read_unet(state), dtype=torch.bfloat16)
    assert half.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.bfloat16
    positive, negative, _, latent, sigmas = small_edit
    full = one_step(comfy, mcdm_guider(comfy, mcdm[0], positive, negative, (3, 2, 4)), latent, sigmas)
    low = one_step(comfy, mcdm_guider(comfy, half, positive, negative, (3, 2, 4)), latent, sigmas)
    assert torch.isfinite(low).all()
    assert (low - full).abs().mean() < 0.05 * full.abs().mean()


def test_only_the_negative_rows_are_marked_uncond(comfy, mcdm, small_edit):
    """cond_or_uncond: the negative's rows are 1 (what patches and other packs read as uncond)."""
    from test_editing import uncond_contexts

    positive, negative, source, latent, sigmas = small_edit
    guider = mcdm_guider(comfy, mcdm[0], positive, negative, (3, 2, 4), source=source, mask=torch.ones(64, 64))
    uncond, cond = uncond_contexts(comfy, guider, latent, sigmas)
    assert uncond and all(torch.equal(c, negative[0][0][0]) for c in uncond)
    assert len(cond) == 4 and not any(torch.equal(c, negative[0][0][0]) for c in cond)


def test_trainer_can_be_interrupted_and_writes_nothing(comfy, base_directory, sd15, mcdm, monkeypatch):
    import comfy.model_management as model_management

    _, clip, vae = sd15
    write_pairs(base_directory / "input" / "pairs_interrupt", [(30, 31)])
    steps_seen = []
    training = comfy.pack("attention.mcdm_training")
    real_train = training.train_mcdm

    def counting_train(*args, on_step=None, **kwargs):
        def step(index, loss):
            steps_seen.append(index)
            if len(steps_seen) > 2:
                raise model_management.InterruptProcessingException()
            on_step(index, loss)
        return real_train(*args, on_step=step, **kwargs)

    monkeypatch.setattr(training, "train_mcdm", counting_train)
    likeness = base_directory / "models" / "likeness"
    before = set(likeness.glob("interrupted*"))
    with pytest.raises(model_management.InterruptProcessingException):
        comfy.run_node("LikenessTrainMCDM", model=mcdm[0], mcdm=mcdm[1], clip=clip, vae=vae, folder="pairs_interrupt",
                       steps=50, learning_rate=1e-4, seed=0, filename_prefix="interrupted")
    assert len(steps_seen) == 3
    assert set(likeness.glob("interrupted*")) == before


def test_guider_refuses_conditionings_not_made_for_an_mcdm(comfy, sd15, mcdm, small_edit):
    _, clip, _ = sd15
    positive, negative, _, _, _ = small_edit
    plain = encode(comfy, clip, "blurry")
    with pytest.raises(ValueError, match="positive has no input-image latent"):
        mcdm_guider(comfy, mcdm[0], plain, negative, (3, 2, 4))
    with pytest.raises(ValueError, match="negative has no null-image tokens"):
        mcdm_guider(comfy, mcdm[0], positive, plain, (3, 2, 4))
    with pytest.raises(ValueError, match="mask"):
        mcdm_guider(comfy, mcdm[0], positive, negative, (3, 2, 4), source=positive)
