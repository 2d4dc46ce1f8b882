"""The metric nodes: 1.0 for identical inputs, deterministic, local files only; and each metric per
image of a batch as its paper computes it, against insightface and open_clip called in the test."""

from __future__ import annotations

import json

import pytest
import torch

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_open_clip(base_directory):
    """A tiny open_clip model saved as a user's checkpoint, with its config beside it."""
    import open_clip
    from safetensors.torch import save_file

    folder = base_directory / "models" / "open_clip"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny_clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny_clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny_clip.safetensors"))
    return "tiny_clip.safetensors"


def photos(count=2, size=48):
    generator = torch.Generator().manual_seed(3)
    return torch.rand(count, size, size, 3, generator=generator)


def score(comfy, checkpoint, images, reference=None, text=""):
    return comfy.run_node("LikenessCLIPScore", checkpoint=checkpoint, architecture="ViT-H-14", images=images,
                          reference=reference, text=text)


def test_clip_i_of_identical_images_is_one(comfy, tiny_open_clip):
    images = photos(1)
    clip_i, clip_t, report = score(comfy, tiny_open_clip, images, reference=images)
    assert clip_i == pytest.approx(1.0, abs=1e-5)
    assert clip_t == 0.0 and "CLIP-I: cos, whole images (MagicStyle) 1.0000" in report


def test_scores_are_deterministic_and_discriminate(comfy, tiny_open_clip):
    images, other = photos(2), photos(1, size=40) * 0.2
    first = score(comfy, tiny_open_clip, images, reference=other, text="a portrait photo")
    second = score(comfy, tiny_open_clip, images, reference=other, text="a portrait photo")
    assert first == second
    clip_i, clip_t, _ = first
    assert -1.0 <= clip_t <= 1.0 and clip_i < 0.9999


def test_a_missing_checkpoint_is_named(comfy, tiny_open_clip):
    with pytest.raises(ValueError, match="checkpoint"):
        score(comfy, "missing.safetensors", photos(1))


# --- The metrics as their papers compute them, against insightface and open_clip called here ---------------------
# (harness/metric_oracles.py; never the pack's code). Per image of a batch, each against its own reference and
# prompt where asked. Tolerances cover alignment rounding (the pack warps with its own similarity transform, the
# oracle with insightface's norm_crop; measured 7e-7 for FaceSim, 2e-5 for CLIP-I on faces, 1e-7 on whole
# images): each check also asserts that the images' scores differ by far more.

CLIP = "open_clip_model.safetensors"  # the shipped name; the tests' file is a tiny open_clip model
FACE_TOLERANCE = 1e-4  # the pack aligns faces with its own transform, insightface with norm_crop
CLIP_TOLERANCE = 1e-5  # the same pixels through the same model
CROP_TOLERANCE = 2e-4  # faces cut by the pack's warp of the float image, by norm_crop of the uint8 one
PROMPTS = ["a portrait photo of an astronaut", "a cat on a sofa", "a cup of coffee on a table"]


@pytest.fixture(scope="module")
def scenes() -> dict:
    """512×512 uint8 RGB photos scikit-image ships, and variants of the astronaut."""
    import numpy as np
    from PIL import Image
    from skimage import data

    astronaut = data.astronaut()
    square = lambda photo: np.asarray(Image.fromarray(photo).resize((512, 512), Image.BICUBIC))  # noqa: E731
    return {"astronaut": astronaut, "mirrored": astronaut[:, ::-1].copy(), "shifted": np.roll(astronaut, 40, axis=0),
            "dimmed": (astronaut * 0.6).astype(np.uint8), "chelsea": square(data.chelsea()),
            "coffee": square(data.coffee())}


def image_batch(*arrays) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack(arrays)).float() / 255


@pytest.fixture(scope="module")
def oracles(shipped_model_files, base_directory):
    from harness.metric_oracles import OpenCLIP, insightface_app
    from harness.workflows import SHIPPED_FACE_PACK

    return (insightface_app(base_directory / "models" / "insightface" / "models" / SHIPPED_FACE_PACK),
            OpenCLIP(base_directory / "models" / "open_clip" / CLIP))


@pytest.fixture(scope="module")
def analysis(comfy, shipped_model_files):
    from harness.workflows import SHIPPED_FACE_PACK

    return comfy.run_node("LikenessFaceAnalysis", model_name=SHIPPED_FACE_PACK, provider="CPU")[0]


def spread(values) -> float:
    return float(max(values) - min(values))


@pytest.mark.parametrize("pairing", ["every reference", "one per image"])
def test_facesim_per_image_is_insightfaces_own_embeddings_cosine(comfy, scenes, oracles, analysis, pairing):
    import numpy as np

    from harness.metric_oracles import face_cosines

    app, _ = oracles
    generated = [scenes["astronaut"], scenes["mirrored"], scenes["shifted"]]
    references = [scenes["dimmed"], scenes["chelsea"]] + ([scenes["astronaut"]] if pairing == "one per image" else [])
    cosines = face_cosines(app, generated, references)
    expected = np.diag(cosines) if pairing == "one per image" else cosines.mean(1)
    assert spread(expected) > 50 * FACE_TOLERANCE, expected  # the images score apart: a mix-up would show
    face_similarity = comfy.pack("nodes.face_analysis").face_similarity
    mean, report, per_image = face_similarity(analysis, image_batch(*references), image_batch(*generated), "zero",
                                              pairing=pairing)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=FACE_TOLERANCE)
    for i, line in enumerate(report.splitlines()[:3]):
        assert line.startswith(f"image {i}: ") and abs(float(line.split()[2]) - expected[i]) < FACE_TOLERANCE
    # The node: the mean, and the scales the papers print.
    for scale, as_printed in (("cosine", expected.mean()), ("100 x cosine", 100 * expected.mean()),
                              ("1 - cosine", 1 - expected.mean())):
        got, node_report = comfy.run_node("LikenessFaceSimilarity", analysis=analysis,
                                          reference=image_batch(*references), images=image_batch(*generated),
                                          no_face="zero", pairing=pairing, scale=scale)
        assert got == pytest.approx(as_printed, abs=FACE_TOLERANCE * (100 if scale == "100 x cosine" else 1))
    assert "ID distance: 1 - ArcFace cos (Face Fusion Table 1)" in node_report


@pytest.mark.parametrize("pairing", ["every reference", "one per image"])
def test_clip_i_and_clip_t_per_image_are_open_clips_own_cosines(comfy, scenes, oracles, pairing):
    import numpy as np

    _, clip = oracles
    generated = [scenes["astronaut"], scenes["chelsea"], scenes["coffee"]]
    paired = pairing == "one per image"
    references = [scenes["mirrored"], scenes["coffee"]] + ([scenes["chelsea"]] if paired else [])
    prompts = PROMPTS if paired else PROMPTS[:1]
    image_cosines, text_cosines = clip.image_cosines(generated, references), clip.text_cosines(generated, prompts)
    expected_i = np.diag(image_cosines) if paired else image_cosines.mean(1)
    expected_t = np.diag(text_cosines) if paired else text_cosines[:, 0]
    assert spread(expected_i) > 100 * CLIP_TOLERANCE and spread(expected_t) > 100 * CLIP_TOLERANCE
    text = "\n".join(prompts)
    scores = comfy.pack("nodes.metrics").clip_scores(CLIP, "ViT-H-14", image_batch(*generated),
                                                     image_batch(*references), text, pairing=pairing)
    np.testing.assert_allclose(scores.clip_i, expected_i, rtol=0, atol=CLIP_TOLERANCE)
    np.testing.assert_allclose(scores.clip_t, expected_t, rtol=0, atol=CLIP_TOLERANCE)
    clip_i, clip_t, report = comfy.run_node("LikenessCLIPScore", checkpoint=CLIP, architecture="ViT-H-14",
                                            images=image_batch(*generated), reference=image_batch(*references),
                                            text=text, pairing=pairing, scale="100 x cosine")
    assert clip_i == pytest.approx(100 * expected_i.mean(), abs=100 * CLIP_TOLERANCE)
    assert clip_t == pytest.approx(100 * expected_t.mean(), abs=100 * CLIP_TOLERANCE)
    assert report.splitlines()[1].startswith("image 1: CLIP-I: 100·cos, whole images (MagicStyle Table I) ")
    assert "CLIP Score: 100·cos image-prompt (Face Fusion Table 2)" in report


def test_clip_i_on_face_crops_is_infinite_ids_eq9(comfy, scenes, oracles, analysis):
    """Both sides' largest face, aligned (insightface's norm_crop at 224 here), then CLIP-I."""
    import numpy as np

    from harness.metric_oracles import face_crop

    app, clip = oracles
    generated = [scenes["astronaut"], scenes["mirrored"], scenes["chelsea"]]
    references = [scenes["dimmed"], scenes["shifted"], scenes["astronaut"]]
    expected = np.diag(clip.image_cosines([face_crop(app, p) for p in generated],
                                          [face_crop(app, r) for r in references]))
    whole = np.diag(clip.image_cosines(generated, references))
    assert spread(expected) > 10 * CROP_TOLERANCE and np.abs(expected - whole).max() > 10 * CROP_TOLERANCE
    scores = comfy.pack("nodes.metrics").clip_scores(CLIP, "ViT-H-14", image_batch(*generated),
                                                     image_batch(*references), "", clip_i_on="face crops",
                                                     analysis=analysis, pairing="one per image")
    np.testing.assert_allclose(scores.clip_i, expected, rtol=0, atol=CROP_TOLERANCE)
    assert scores.clip_t is None and "CLIP-I: cos, face crops (Infinite-ID Eq. 9)" in scores.lines[0]
    with pytest.raises(ValueError, match="analysis=None cannot be used"):
        comfy.run_node("LikenessCLIPScore", checkpoint=CLIP, architecture="ViT-H-14", images=image_batch(*generated),
                       reference=image_batch(*references), clip_i_on="face crops")


def test_pairing_one_per_image_needs_as_many_references_and_prompts_as_images(comfy, scenes, shipped_model_files):
    generated = image_batch(scenes["astronaut"], scenes["chelsea"])
    with pytest.raises(ValueError, match=r"reference='1 image\(s\)' cannot be used: expected one reference per image"):
        comfy.run_node("LikenessCLIPScore", checkpoint=CLIP, architecture="ViT-H-14", images=generated,
                       reference=generated[:1], pairing="one per image")
    with pytest.raises(ValueError, match=r"text='3 line\(s\)' cannot be used: expected one prompt per line"):
        comfy.run_node("LikenessCLIPScore", checkpoint=CLIP, architecture="ViT-H-14", images=generated,
                       text="\n".join(PROMPTS), pairing="one per image")
