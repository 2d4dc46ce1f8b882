"""The Multi-Conditioned Diffusion Model: released file layouts, the key conversion proven
against diffusers, Eq. 1 and InstructPix2Pix guidance against separately computed rows, the
negative row's content, the trainer's recipe (identity pairs, dropout) and its untouched inputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness.sampling import encode
from test_editing import differs, row_inputs, x0_of
from tiny import tiny_mcdm


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


def conditionings(comfy, sd15, mcdm, image, prompt="a man in a suit", negative="", **options):
    _, clip, vae = sd15
    return comfy.run_node("LikenessMCDMConditioning", mcdm=mcdm[1], positive=encode(comfy, clip, prompt),
                          negative=encode(comfy, clip, negative), vae=vae, image=image, **options)


def write_pairs(folder, seeds: list[tuple[int, int]], prompt: str | None = None,
                source_prompt: str | None = "a man") -> None:
    """pair_NNNNN.png (target) and pair_NNNNN.source.png from (target seed, source seed), with
    pair_NNNNN.txt and pair_NNNNN.source.txt where a prompt is given."""
    from PIL import Image

    folder.mkdir()
    for index, (target_seed, source_seed) in enumerate(seeds):
        for suffix, seed, text in (("", target_seed, prompt), (".source", source_seed, source_prompt)):
            Image.fromarray((portrait(64, seed)[0] * 255).byte().numpy()).save(folder / f"pair_{index:05d}{suffix}.png")
            if text is not None:
                (folder / f"pair_{index:05d}{suffix}.txt").write_text(text)


def predictions(comfy, model, conds, noisy, sigma):
    training = comfy.pack("attention.shared.training_loop")
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


def rows_by_hand(positive, negative, source):
    """The released pipeline's rows, built from the conditionings' tensors (77 text tokens, then the
    image tokens; c_s in concat_latent_image): 0 (negative text, null image, null c_s), 1 (prompt,
    image, c_s), 2 (negative text, image, null c_s), 3 (negative text, image, c_s), and row 1 for the
    source prompt. The null c_s is the negative's (none: ComfyUI's InstructPix2Pix model concatenates
    zeros)."""
    text, image = positive[0][0][:, :77], positive[0][0][:, 77:]
    c_s, null_c_s = positive[0][1]["concat_latent_image"], negative[0][1].get("concat_latent_image")
    negative_text, null_image = negative[0][0][:, :77], negative[0][0][:, 77:]
    row = lambda words, tokens, concat: [[torch.cat([words, tokens], 1), {} if concat is None else
                                          {"concat_latent_image": concat}]]
    return {"null": row(negative_text, null_image, null_c_s), "full": row(text, image, c_s),
            "image": row(negative_text, image, null_c_s), "image_spatial": row(negative_text, image, c_s),
            "source": row(source[0][0][:, :77], image, c_s)}


SD_SIZED_C_S = 60.0


def sd_sized_c_s(cond: list) -> list:
    """The tiny VAE's latents are ~60× smaller than SD1.5's (|c_s| ≤ 0.014 here, ~1 from a real VAE), so
    c_s barely moves the tiny UNet (0.2%); scaled to a real VAE's size the spatial term weighs ~10%."""
    return [[tokens, {**options, "concat_latent_image": options["concat_latent_image"] * SD_SIZED_C_S}]
            for tokens, options in cond]


@pytest.fixture(scope="module")
def eq1(comfy, sd15, mcdm):
    """Conditionings of prompts far apart, and each row's x0 prediction on its own (a plain CFGGuider
    at cfg 1 runs only that conditioning), at one sigma, from the same noisy latent the guider gets."""
    model = mcdm[0]
    image = portrait(64)
    positive, negative, latent = conditionings(comfy, sd15, mcdm, image, prompt="a man in a suit of shining armour")
    source = conditionings(comfy, sd15, mcdm, image, prompt="a cartoon drawing of an old woman")[0]
    positive, source = sd_sized_c_s(positive), sd_sized_c_s(source)
    latent = {"samples": torch.zeros_like(latent["samples"])}
    sigma = model.model.model_sampling.sigma(torch.tensor([900.0]))[0]
    rows = {name: x0_of(comfy, comfy.run_node("CFGGuider", model=model, positive=cond, negative=cond, cfg=1.0)[0],
                        latent, sigma)
            for name, cond in rows_by_hand(positive, negative, source).items()}
    return (positive, negative, source, latent), rows, sigma


def eq_1(rows, full, s1, s2, s3):
    """ε = ε(∅) + s1(ε(c_im) − ε(∅)) + s2(ε(c_im, c_s) − ε(c_im)) + s3(ε(c_im, c_s, c_T) − ε(c_im, c_s)),
    on x0 predictions (x0 = x − σ·ε, and the weights 1 − s1, s1 − s2, s2 − s3, s3 sum to 1)."""
    return (rows["null"] + s1 * (rows["image"] - rows["null"]) + s2 * (rows["image_spatial"] - rows["image"])
            + s3 * (rows[full] - rows["image_spatial"]))


@pytest.mark.parametrize("scales", [(3.0, 2.0, 4.0), (2.0, 4.0, 3.0)])
def test_three_scales_are_eq_1_over_separately_computed_rows(comfy, mcdm, eq1, scales):
    (positive, negative, _, latent), rows, sigma = eq1
    got = x0_of(comfy, mcdm_guider(comfy, mcdm[0], positive, negative, scales), latent, sigma)
    expected = eq_1(rows, "full", *scales)
    # rows batched differently: float32 rounding ~1e-6 of the largest value
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()
    # each difference Eq. 1 scales is over 1% of the prediction, so a wrong weight of 0.01 already fails
    for a, b in (("image", "null"), ("image_spatial", "image"), ("full", "image_spatial")):
        assert differs(rows[a], rows[b]), (a, b)


def test_a_soft_mask_blends_eq_1_for_the_target_and_the_source_prompt(comfy, mcdm, eq1):
    """Eq. 3 at M = 0.3 over Eq. 1 for each prompt. Text scale 10: the tiny CLIP's two prompts
    differ by ~0.4% of a row, so s3 = 10 makes each side's share over 1% of the prediction."""
    model = mcdm[0]
    (positive, negative, source, latent), rows, sigma = eq1
    scales = (2.0, 4.0, 10.0)
    guider = mcdm_guider(comfy, model, positive, negative, scales, source=source, mask=torch.full((64, 64), 0.3))
    got = x0_of(comfy, guider, latent, sigma)
    target, kept = eq_1(rows, "full", *scales), eq_1(rows, "source", *scales)
    expected = 0.3 * target + 0.7 * kept
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()
    assert differs(got, target) and differs(got, kept)


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
GREY, BLACK = "grey (released training)", "black (released demo)"


def null_latent(vae, pixel: float, size: int) -> torch.Tensor:
    """The model-space latent of a flat image of ``pixel`` (0..1), ``size`` pixels square."""
    with torch.no_grad():
        return vae.encode(torch.full((1, size, size, 3), pixel)) * 0.18215


def null_by_hand(vae, pixel: float):
    """(tokens, c_s) of a null image as the released code builds it, at 512×512 (the adapter's own
    size): the reference B/32 tower on a black image (CLIP's preprocessing of pixel 0), the VAE on
    a flat image of ``pixel``, the released adapter on both."""
    black_pixels = ((0 - CLIP_MEAN) / CLIP_STD).expand(1, 3, 224, 224)
    latent = null_latent(vae, pixel, 512)
    with torch.no_grad():
        clip_tokens = tiny_mcdm.clip_b32(stored_as=torch.float16)(pixel_values=black_pixels).last_hidden_state
        return tiny_mcdm.released_adapter()(clip_tokens, latent), latent


@pytest.mark.parametrize("null_image", [GREY, BLACK])
def test_the_negative_rows_hold_the_null_image(comfy, sd15, mcdm, null_image):
    """Row 0 holds the negative text and the null image's tokens, computed here with the reference
    tower and the released adapter (at 512×512, the adapter's own size), and rows 0 and 2 the null
    c_s. grey (the default, what the released training and Likeness Train MCDM drop an image to):
    CLIP reads black, the VAE mid-grey (pixel 0 in −1..1), c_s is that latent. black (the released
    demo): black for both, zeros for c_s."""
    _, clip, vae = sd15
    model = mcdm[0]
    grey = null_image == GREY
    positive, negative, latent = conditionings(comfy, sd15, mcdm, portrait(), negative="", null_image=null_image)
    null_tokens, latent_512 = null_by_hand(vae, 0.5 if grey else 0.0)
    assert torch.equal(negative[0][0][:, :77], encode(comfy, clip, "")[0][0])
    assert (negative[0][0][:, 77:] - null_tokens).abs().max() <= 1e-5 * null_tokens.abs().max()
    assert differs(null_tokens, positive[0][0][:, 77:])
    other = null_by_hand(vae, 0.0 if grey else 0.5)[0]  # the other null: ten times the tolerance away
    assert (other - null_tokens).abs().max() > 1e-4 * null_tokens.abs().max()
    if grey:
        assert torch.allclose(negative[0][1]["concat_latent_image"], latent_512, rtol=0, atol=1e-7)
    else:
        assert "concat_latent_image" not in negative[0][1]
    # what the model receives, on a smaller image
    positive, negative, _ = conditionings(comfy, sd15, mcdm, portrait(64), null_image=null_image)
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    sigmas = model.model.model_sampling.sigma(torch.tensor([900.0, 600.0]))
    null_c_s = null_latent(vae, 0.5, 64)[0] if grey else torch.zeros(4, 8, 8)
    guider = mcdm_guider(comfy, model, positive, negative, (3, 2, 4))
    seen = row_inputs(comfy, guider, empty, sigmas)
    uncond = [(context, concat) for label, context, concat in seen if label == 1]
    assert len(uncond) == 1 and len(seen) == 4
    context, concat = uncond[0]
    assert torch.equal(context, negative[0][0][0]) and torch.allclose(concat, null_c_s, rtol=0, atol=1e-7)
    c_s = positive[0][1]["concat_latent_image"][0]
    assert differs(c_s, null_c_s)
    rows = [c for label, _, c in seen if label != 1]
    assert sum(torch.equal(c, c_s) for c in rows) == 2  # the full and image + spatial rows
    assert sum(torch.allclose(c, null_c_s, rtol=0, atol=1e-7) for c in rows) == 1  # the image-only row


def test_mask_of_ones_is_the_target_only_edit_and_zeros_the_source_only(comfy, mcdm, small_edit):
    model = mcdm[0]
    positive, negative, source, latent, sigmas = small_edit
    scales = (3.0, 2.0, 4.0)
    target_only = one_step(comfy, mcdm_guider(comfy, model, positive, negative, scales), latent, sigmas)
    source_only = one_step(comfy, mcdm_guider(comfy, model, source, negative, scales), latent, sigmas)
    assert differs(target_only, source_only)
    with pytest.raises(ValueError, match="mask='a mask of all 0'"):
        mcdm_guider(comfy, model, positive, negative, scales, source=source, mask=torch.zeros(64, 64))
    for mask, expected in ((torch.ones(64, 64), target_only), (torch.zeros(64, 64), source_only)):
        # the guider itself (the node refuses an all-0 mask: it would edit nothing)
        guider = comfy.pack("attention.portrait_editing.editing_guiders").MCDMCFGGuider(model)
        guider.set_conds(positive, negative, source, mask)
        guider.set_scales(*scales)
        blended = one_step(comfy, guider, latent, sigmas)
        # rows batched differently: float32 noise on values of order 100
        assert torch.allclose(blended, expected, rtol=1e-5, atol=1e-3), (blended - expected).abs().max()


def test_edit_mask_runs_on_an_mcdm(comfy, mcdm, small_edit):
    positive, _, source, _, _ = small_edit
    latent = {"samples": source[0][1]["concat_latent_image"] / 0.18215}
    mask, _ = comfy.run_node("LikenessEditMask", model=mcdm[0], latent=latent, source=source, target=positive,
                             seeds=2, strength=0.5, blur=5, threshold=0.2, normalisation="min-max", seed=0)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1


@pytest.fixture(scope="module")
def ip2p(comfy, base_directory, tiny_checkpoints):
    """An InstructPix2Pix checkpoint: the tiny SD1.5 with 4 more conv_in channels, loaded as an MCDM."""
    from safetensors.torch import load_file

    checkpoint = load_file(str(base_directory / "models" / "checkpoints" / tiny_checkpoints["sd15"]))
    conv_in = checkpoint["model.diffusion_model.input_blocks.0.0.weight"]
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat(
        [conv_in, torch.randn(conv_in.shape, generator=torch.Generator().manual_seed(12)) * 0.1], dim=1)
    save_file(checkpoint, str(base_directory / "models" / "likeness" / "tiny_ip2p.safetensors"))
    return comfy.run_node("LikenessMCDMLoader", unet_name="tiny_ip2p.safetensors", adapter_name="none",
                          clip_vision_name="none")


def test_instruct_pix2pix_checkpoint_loads_as_an_mcdm_without_adapter(comfy, sd15, ip2p):
    model, state = ip2p
    assert state.adapter is None and not state.scaled_concat
    image = portrait(64)
    positive, negative, latent = conditionings(comfy, sd15, (model, state), image)
    assert positive[0][0].shape[1] == 77
    assert torch.equal(positive[0][1]["concat_latent_image"], latent["samples"])  # InstructPix2Pix: unscaled
    assert "concat_latent_image" not in negative[0][1] and torch.equal(negative[0][0], encode(comfy, sd15[1], "")[0][0])


def test_instruct_pix2pix_guidance_is_its_own_formula(comfy, sd15, ip2p):
    """Brooks et al.'s guidance, ε(∅,∅) + s_I(ε(c_I,∅) − ε(∅,∅)) + s_T(ε(c_I,c_T) − ε(c_I,∅)), with the
    spatial scale as s_I and the text scale as s_T, from three separately run rows; the image scale
    has nothing to act on (no image tokens)."""
    model, state = ip2p
    positive, negative, latent = conditionings(comfy, sd15, (model, state), portrait(64),
                                               prompt="a man in a suit of shining armour")
    positive = sd_sized_c_s(positive)  # raw SD latents reach ~±4; the tiny VAE's ~0.08
    c_i, text, no_text = positive[0][1]["concat_latent_image"], positive[0][0], negative[0][0]
    rows = {"none": [[no_text, {}]], "image": [[no_text, {"concat_latent_image": c_i}]],
            "image_text": [[text, {"concat_latent_image": c_i}]]}
    empty = {"samples": torch.zeros_like(latent["samples"])}
    sigma = model.model.model_sampling.sigma(torch.tensor([900.0]))[0]
    eps = {name: x0_of(comfy, comfy.run_node("CFGGuider", model=model, positive=cond, negative=cond, cfg=1.0)[0],
                       empty, sigma) for name, cond in rows.items()}
    s_i, s_t = 1.5, 7.5
    expected = eps["none"] + s_i * (eps["image"] - eps["none"]) + s_t * (eps["image_text"] - eps["image"])
    got = x0_of(comfy, mcdm_guider(comfy, model, positive, negative, (3.0, s_i, s_t)), empty, sigma)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()
    assert differs(eps["image"], eps["none"]) and differs(eps["image_text"], eps["image"])
    assert torch.equal(x0_of(comfy, mcdm_guider(comfy, model, positive, negative, (0.5, s_i, s_t)), empty, sigma), got)


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
    examples = comfy.pack("attention.shared.training_folders").find_examples(folder, ".source")
    assert [e.image.name for e in examples] == [f"pair_{i:05d}.png" for i in range(1, 5)]
    with pytest.raises(ValueError, match="target"):
        comfy.run_node("LikenessSavePairs", source=sources, target=targets[:1], prompt="", source_prompt="",
                       folder="pairs_numbering", filename_prefix="pair")


def test_a_4_channel_model_starts_as_itself(comfy, sd15):
    """Zero-initialised extra conv_in channels: the expanded UNet predicts what the base model
    predicts, whatever c_s is."""
    model, clip, _ = sd15
    training = comfy.pack("attention.portrait_editing.mcdm_training")
    expanded = comfy.pack("attention.portrait_editing.mcdm").build_model(training.expanded_unet(model),
                                                                         dtype=torch.float32)
    assert expanded.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 8
    text = encode(comfy, clip, "a portrait")
    with_latent = [[text[0][0], {**text[0][1], "concat_latent_image": torch.randn(1, 4, 8, 8)}]]
    sigma = model.model.model_sampling.sigma(torch.tensor([500.0]))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma
    with torch.no_grad():
        (base,) = predictions(comfy, model, [text], noisy, sigma)
        (grown,) = predictions(comfy, expanded, [with_latent], noisy, sigma)
    assert torch.allclose(base, grown, atol=1e-5)


def test_trainer_loss_falls_and_its_files_load_back(comfy, base_directory, sd15, mcdm, files, small_edit):
    model, clip, vae = sd15
    write_pairs(base_directory / "input" / "pairs_training", [(10, 20), (11, 21)], prompt="a man in a suit")
    # each start model's output before training: one fixed x0 prediction (plain cfg-1 run)
    positive, _, _, edit_latent, _ = small_edit
    text = encode(comfy, clip, "a portrait")
    plain_latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def outputs():
        sigma = model.model.model_sampling.sigma(torch.tensor([500.0]))[0]
        return [x0_of(comfy, comfy.run_node("CFGGuider", model=start, positive=cond, negative=cond, cfg=1.0)[0],
                      latent, sigma)
                for start, cond, latent in ((mcdm[0], positive, edit_latent), (model, text, plain_latent))]

    before_training = outputs()
    for start in (mcdm[0], model):  # continue an MCDM; grow a 4-channel SD1.5
        name, before, after, _ = comfy.run_node(
            "LikenessTrainMCDM", model=start, mcdm=mcdm[1], clip=clip, vae=vae, folder="pairs_training", steps=8,
            learning_rate=1e-4, seed=0, filename_prefix="tiny_trained", batch_size=1)
        assert after < 0.98 * before, (before, after)  # 6% and 9% lower after 8 steps
        loaded, state = comfy.run_node("LikenessMCDMLoader", unet_name=name,
                                       adapter_name=name.replace(".safetensors", ".adapter.safetensors"),
                                       clip_vision_name=files["clip_vision"])
        assert loaded.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 8
        assert differs(state.adapter.vae2clip.weight, mcdm[1].adapter.vae2clip.weight)
    # the input models are untouched: the same outputs, bit for bit, and the same weights
    for after_training, before in zip(outputs(), before_training):
        assert torch.equal(after_training, before)
    fresh = comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                           clip_vision_name=files["clip_vision"])
    for (key, value), fresh_value in zip(mcdm[0].model.diffusion_model.state_dict().items(),
                                         fresh[0].model.diffusion_model.state_dict().values()):
        assert torch.equal(value, fresh_value), key
    assert torch.equal(mcdm[1].adapter.linear1.weight, fresh[1].adapter.linear1.weight)


def test_dropout_cases_and_identity_pairs_come_at_the_papers_rates(comfy):
    training = comfy.pack("attention.portrait_editing.mcdm_training")
    generator = torch.Generator().manual_seed(0)
    draws = [training.draw_case(generator) for _ in range(20000)]
    identity = sum(i for i, _ in draws) / len(draws)
    assert abs(identity - 0.05) < 0.01
    for case in training.DROPOUT_CASES:
        assert abs(sum(d == case for _, d in draws) / len(draws) - 0.05) < 0.01, case
    assert abs(sum(d is None for _, d in draws) / len(draws) - 0.80) < 0.015


def test_identity_pairs_learn_the_source_under_the_source_prompt(comfy, base_directory, sd15, mcdm, monkeypatch):
    """Sec. 3.3 and the released dataset.py: an identity draw is x_A → x_A under p_a; any other
    draw x_A → x_B under p_b. Spied on what the loss receives: step 0 an identity draw, step 1 not."""
    import numpy as np
    from PIL import Image

    model, clip, vae = sd15
    folder = base_directory / "input" / "pairs_identity"
    write_pairs(folder, [(50, 51)], prompt="a man in a suit of shining armour",
                source_prompt="a cartoon drawing of an old woman")
    training = comfy.pack("attention.portrait_editing.mcdm_training")
    seen, real_loss, draws = [], training.diffusion_loss, iter([(True, None), (False, None)])

    def spy(base, patched, target, cond, sigma, noise):
        if torch.is_grad_enabled():  # training steps (the validation loss runs without gradients)
            seen.append((target.detach().cpu().clone(), cond[0][0].detach().cpu().clone(),
                         cond[0][1]["concat_latent_image"].detach().cpu().clone()))
        return real_loss(base, patched, target, cond, sigma, noise)

    monkeypatch.setattr(training, "diffusion_loss", spy)
    monkeypatch.setattr(training, "draw_case", lambda generator: next(draws))
    comfy.run_node("LikenessTrainMCDM", model=mcdm[0], mcdm=mcdm[1], clip=clip, vae=vae, folder=folder.name, steps=2,
                   learning_rate=1e-4, seed=0, filename_prefix="identity_spy", batch_size=1)

    def latent_of(path):
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()[None] / 255
        with torch.inference_mode():
            return vae.encode(pixels) * 0.18215

    source, target = latent_of(folder / "pair_00000.source.png"), latent_of(folder / "pair_00000.png")
    source_prompt, target_prompt = (encode(comfy, clip, t)[0][0] for t in ("a cartoon drawing of an old woman",
                                                                            "a man in a suit of shining armour"))
    assert differs(target, source, floor=0.1) and differs(target_prompt, source_prompt, floor=0.1)
    assert len(seen) == 2
    for (learnt, tokens, c_s), expected, prompt in zip(seen, (source, target), (source_prompt, target_prompt)):
        assert torch.equal(learnt, expected)
        assert torch.equal(tokens[:, :77], prompt)
        assert torch.equal(c_s, source)  # the input is x_A either way


DROPPED = {None: (), "spatial": ("c_s",), "image": ("image",), "text": ("text",), "all": ("c_s", "image", "text")}


def test_each_dropout_case_drops_exactly_its_condition(comfy, base_directory, sd15, mcdm, monkeypatch):
    """Issue 17, item 8: the five draws (no dropout, then each released case) of one step, against
    conditionings built without the trainer: the text by CLIPTextEncode, the image tokens and c_s by
    MCDM Conditioning (its positive for the image, its negative for the null image: the released
    training's, proven against the reference tower above), the grey c_s by the VAE by hand. Each case
    replaces exactly its conditions by their nulls and leaves the rest and the target as they are."""
    model, clip, vae = sd15
    prompt = "a man in a suit of shining armour"
    write_pairs(base_directory / "input" / "pairs_dropout", [(90, 91)], prompt=prompt)
    training = comfy.pack("attention.portrait_editing.mcdm_training")
    seen, real_loss = [], training.diffusion_loss
    draws = iter([(False, case) for case in DROPPED])

    def spy(base, patched, target, cond, sigma, noise):
        if torch.is_grad_enabled():  # the training draws (the validation loss runs without gradients)
            seen.append((target.detach().cpu().clone(), cond[0][0].detach().cpu().clone(),
                         cond[0][1].get("concat_latent_image")))
        return real_loss(base, patched, target, cond, sigma, noise)

    monkeypatch.setattr(training, "diffusion_loss", spy)
    monkeypatch.setattr(training, "draw_case", lambda generator: next(draws))
    # one step of five: every draw reads the adapter before its first update
    comfy.run_node("LikenessTrainMCDM", model=mcdm[0], mcdm=mcdm[1], clip=clip, vae=vae, folder="pairs_dropout",
                   steps=1, learning_rate=1e-4, seed=0, filename_prefix="dropout_spy", batch_size=len(DROPPED))
    (source,) = comfy.run_node("LoadImage", image="pairs_dropout/pair_00000.source.png")[:1]
    (target,) = comfy.run_node("LoadImage", image="pairs_dropout/pair_00000.png")[:1]
    positive, negative, _ = conditionings(comfy, sd15, mcdm, source, prompt=prompt)
    full = {"text": encode(comfy, clip, prompt)[0][0], "image": positive[0][0][:, 77:],
            "c_s": positive[0][1]["concat_latent_image"]}
    with torch.no_grad():
        grey_c_s = vae.encode(torch.full_like(source, 0.5)) * 0.18215
        target_latent = vae.encode(target) * 0.18215
    null = {"text": encode(comfy, clip, "")[0][0], "image": negative[0][0][:, 77:],
            "c_s": negative[0][1]["concat_latent_image"]}
    assert torch.allclose(null["c_s"], grey_c_s, rtol=0, atol=1e-7)
    for name in full:  # each null is far from what it replaces: a case that drops the wrong one fails
        assert differs(full[name], null[name], floor=0.05), name
    assert len(seen) == len(DROPPED)
    for (learnt_target, tokens, c_s), (case, dropped) in zip(seen, DROPPED.items()):
        want = {name: (null if name in dropped else full)[name] for name in full}
        assert torch.allclose(learnt_target, target_latent, rtol=0, atol=1e-7), case
        assert torch.equal(tokens[:, :77], want["text"]), case
        assert (tokens[:, 77:] - want["image"]).abs().max() <= 1e-5 * want["image"].abs().max(), case
        assert torch.allclose(c_s.cpu(), want["c_s"], rtol=0, atol=1e-7), case


def test_a_pair_without_its_source_prompt_is_refused_by_name(comfy, base_directory, sd15, mcdm):
    _, clip, vae = sd15
    write_pairs(base_directory / "input" / "pairs_no_source_prompt", [(60, 61)], prompt="a man in a suit",
                source_prompt=None)
    with pytest.raises(ValueError, match=r"folder='pairs_no_source_prompt'.*pair_00000\.source\.txt"):
        comfy.run_node("LikenessTrainMCDM", model=mcdm[0], mcdm=mcdm[1], clip=clip, vae=vae,
                       folder="pairs_no_source_prompt", steps=1, learning_rate=1e-4, seed=0, filename_prefix="never")


def test_bf16_mcdm_follows_the_fp32_one(comfy, base_directory, files, mcdm, small_edit):
    """The low-precision path users run on GPUs: same files built in bfloat16."""
    module = comfy.pack("attention.portrait_editing.mcdm")
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
    training = comfy.pack("attention.portrait_editing.mcdm_training")
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
                       steps=50, learning_rate=1e-4, seed=0, filename_prefix="interrupted", batch_size=1)
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
