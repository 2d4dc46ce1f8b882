"""Face analysis nodes on the real host: insightface loading tiny packs, crops, masks, FaceSim.

The packs are written by tests/tiny/tiny_insightface.py in insightface's real
file layout and loaded by insightface's own FaceAnalysis and model zoo. The
alignment is checked on the astronaut photo against dlib, an independent
detector and recogniser whose weights ship in their wheels (test-only).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from harness import required
from tiny import tiny_insightface as tiny

W = 512  # skimage's astronaut is 512×512
SMALL_FACE = replace(tiny.TinyFace(), score=0.95).scaled(0.5, (0.75, 0.75))  # higher score, smaller


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(data.astronaut()).float().div(255)[None]


@pytest.fixture(scope="module")
def pack(comfy, base_directory):
    """buffalo_l in the user's folder, models/insightface/models/buffalo_l/: the astronaut's face and a smaller one."""
    return tiny.write_pack(base_directory / "models" / "insightface", "buffalo_l", (tiny.TinyFace(), SMALL_FACE))


@pytest.fixture(scope="module")
def analysis(comfy, pack):
    return comfy.run_node("LikenessFaceAnalysis", model_name="buffalo_l", provider="CPU")[0]


@pytest.fixture
def registered_root(comfy, base_directory, tmp_path, monkeypatch):
    """An "insightface" folder registered with ComfyUI (as extra_model_paths.yaml does), with an
    antelopev2 pack in the models folder (should another test place one there) set aside meanwhile."""
    import folder_paths

    shipped = base_directory / "models" / "insightface" / "models" / "antelopev2"
    aside = shipped.with_name("antelopev2.aside")
    if shipped.exists():
        shipped.rename(aside)
    root = tmp_path / "insightface"
    root.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(root)], set()))
    yield root
    if aside.exists():
        aside.rename(shipped)


def crop(comfy, analysis, image, index=0, crop_size=512, padding=0.0):
    return comfy.run_node("LikenessFaceCrop", analysis=analysis, image=image, index=index, crop_size=crop_size,
                          padding=padding)


def similarity(comfy, analysis, reference, images, no_face="zero"):
    return comfy.run_node("LikenessFaceSimilarity", analysis=analysis, reference=reference, images=images,
                          no_face=no_face)


def pixels(box) -> np.ndarray:
    return np.asarray(box) * W


def test_analysis_loads_the_pack_from_the_models_folder(analysis, pack, astronaut, comfy):
    backend = comfy.pack("attention.faces.insightface_backend")
    assert analysis.folder == pack
    assert set(analysis.app.models) == {"detection", "recognition", "genderage"}
    faces, tried = analysis.detect(backend.to_bgr_uint8(astronaut[0]))
    assert tried == [(640, 640)]
    assert len(faces) == 2
    np.testing.assert_allclose(faces[0].bbox, pixels(tiny.ASTRONAUT_BOX), atol=0.5)
    np.testing.assert_allclose(faces[0].kps, pixels(tiny.ASTRONAUT_KPS), atol=0.5)
    np.testing.assert_allclose(faces[1].bbox, pixels(SMALL_FACE.box), atol=0.5)


def test_crop_outputs_shapes_ranges_and_the_box_mask(comfy, analysis, astronaut):
    images = torch.cat([astronaut, astronaut.flip(2)])
    face, arcface, mask, embedding = crop(comfy, analysis, images, crop_size=256, padding=0.25)
    assert face.shape == (2, 256, 256, 3) and arcface.shape == (2, 112, 112, 3) and mask.shape == (2, W, W)
    assert embedding.shape == (2, 512) and embedding.dtype == torch.float32
    assert 0 <= face.min() and face.max() <= 1 and 0 <= arcface.min() and arcface.max() <= 1
    assert face.std() > 0.05 and arcface.std() > 0.05
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2))
    # a mirrored face is another crop: another embedding (cosine well below 1)
    assert float(embedding[0] @ embedding[1]) < 0.99
    x1, y1, x2, y2 = pixels(tiny.ASTRONAUT_BOX).round().astype(int)
    expected = torch.zeros(W, W)
    expected[y1:y2, x1:x2] = 1
    assert torch.equal(mask[0], expected) and torch.equal(mask[1], expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage deprecates what face_align calls
def test_crop_matches_what_insightface_itself_computes(comfy, analysis, astronaut):
    from insightface.utils import face_align

    backend = comfy.pack("attention.faces.insightface_backend")
    bgr = backend.to_bgr_uint8(astronaut[0])
    faces, _ = analysis.detect(bgr)
    _, arcface, _, embedding = crop(comfy, analysis, astronaut)
    theirs = face_align.norm_crop(bgr, faces[0].kps, 112)[..., ::-1] / 255.0
    assert np.abs(arcface[0].numpy() - theirs).max() <= 1.5 / 255  # same transform, rounding aside
    own = analysis.recogniser.get(bgr, insightface_face(faces[0]))
    cosine = float(np.dot(own / np.linalg.norm(own), embedding[0].numpy()))
    assert cosine > 0.999


def insightface_face(face):
    from insightface.app.common import Face

    return Face(bbox=face.bbox, kps=face.kps, det_score=face.score)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_alignment_is_insightface_norm_crop_transform(comfy):
    from insightface.utils import face_align

    backend = comfy.pack("attention.faces.insightface_backend")
    kps = pixels(tiny.ASTRONAUT_KPS)
    np.testing.assert_allclose(backend.similarity_transform(kps, backend.face_template(112)),
                               face_align.estimate_norm(kps.astype(np.float32), 112), atol=1e-4)
    # Landmarks that are a rotated, scaled, shifted template come back onto the template exactly.
    angle = math.radians(20)
    rotation = 1.7 * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = backend.face_template(112) @ rotation.T + [240, 85]
    target = backend.face_template(512, 0.5)
    matrix = backend.similarity_transform(moved, target)
    np.testing.assert_allclose(moved @ matrix[:, :2].T + matrix[:, 2], target, atol=1e-6)


def test_index_picks_faces_largest_first(comfy, analysis, astronaut):
    masks = [crop(comfy, analysis, astronaut, index=i)[2][0] for i in (0, 1)]
    for mask, box in zip(masks, (tiny.ASTRONAUT_BOX, SMALL_FACE.box), strict=True):
        x1, y1, x2, y2 = pixels(box)
        assert mask.sum() == pytest.approx((x2 - x1) * (y2 - y1), rel=0.03)
        assert mask[int((y1 + y2) / 2), int((x1 + x2) / 2)] == 1
    with pytest.raises(ValueError, match=r"index=2 .*2 face\(s\).*0\.\.1"):
        crop(comfy, analysis, astronaut, index=2)


def test_no_face_is_a_clear_error(comfy, analysis, astronaut):
    black = torch.zeros(1, 300, 400, 3)
    with pytest.raises(ValueError) as error:
        crop(comfy, analysis, torch.cat([astronaut[:, :300, :400], black]))
    message = str(error.value)
    assert message.startswith("image: no face found in image 1 of the batch of 2")
    assert "640, 512, 384, 256, 128" in message and "Expected an image showing a face" in message


def test_missing_pack_names_the_folder_and_files(comfy, base_directory, registered_root):
    with pytest.raises(ValueError) as error:
        comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")
    message = str(error.value)
    assert str(base_directory / "models" / "insightface" / "models" / "antelopev2") in message
    assert str(registered_root / "models" / "antelopev2") in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip" in message


def test_nested_unzip_is_named(comfy, registered_root):
    outer = tiny.write_nested_pack(registered_root, "antelopev2")
    with pytest.raises(ValueError, match="nested folder") as error:
        comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")
    assert f"{outer / 'antelopev2'}; move its .onnx files up into {outer}" in str(error.value)


def test_registered_folder_is_used(comfy, registered_root, astronaut):
    folder = tiny.write_pack(registered_root, "antelopev2")
    assert {p.name for p in folder.iterdir()} == {"scrfd_10g_bnkps.onnx", "glintr100.onnx", "genderage.onnx"}
    loaded = comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")[0]
    assert loaded.folder == folder
    assert crop(comfy, loaded, astronaut)[3].shape == (1, 512)


def test_pack_without_detector_or_recogniser_is_refused(comfy, registered_root):
    folder = tiny.write_pack(registered_root, "antelopev2", detector=False)
    with pytest.raises(ValueError, match=r"no face detector .*glintr100\.onnx.*expected scrfd_10g_bnkps\.onnx"):
        comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")
    (folder / "glintr100.onnx").unlink()
    tiny.write_pack(registered_root, "antelopev2", recognition=False)
    with pytest.raises(ValueError, match=r"no recognition model .*expected glintr100\.onnx"):
        comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")


def test_smaller_detection_sizes_are_tried(comfy, registered_root, astronaut):
    backend = comfy.pack("attention.faces.insightface_backend")
    tiny.write_pack(registered_root, "antelopev2", max_input=256)  # blind at 640, 512, 384
    loaded = comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")[0]
    faces, tried = loaded.detect(backend.to_bgr_uint8(astronaut[0]))
    assert tried == [(s, s) for s in (640, 512, 384, 256)] and len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, pixels(tiny.ASTRONAUT_BOX), atol=0.5)


def test_unavailable_provider_is_named(comfy, pack):
    import onnxruntime

    if "CoreMLExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CoreML")
    with pytest.raises(ValueError, match=r"provider='CoreML' cannot be used: this onnxruntime offers CPU"):
        comfy.run_node("LikenessFaceAnalysis", model_name="buffalo_l", provider="CoreML")


def test_similarity_of_identical_images_is_one_and_deterministic(comfy, analysis, astronaut):
    first = similarity(comfy, analysis, astronaut, astronaut)
    assert abs(first[0] - 1.0) < 1e-5
    assert similarity(comfy, analysis, astronaut, astronaut) == first
    assert first[1].splitlines()[0].startswith("image 0: 1.0000 (face 100×116 px at 172,62; 2 face(s) found)")


def test_similarity_of_other_images_is_lower(comfy, analysis, astronaut):
    other = astronaut.flip(2)
    (same_score, _), (other_score, _) = (similarity(comfy, analysis, astronaut, x) for x in (astronaut, other))
    assert other_score < 0.99
    both, report = similarity(comfy, analysis, astronaut, torch.cat([astronaut, other]))
    assert both == pytest.approx((same_score + other_score) / 2, abs=1e-6)
    assert report.splitlines()[-1].startswith("FaceSim: ArcFace cos (MagicStyle) (buffalo_l, 1 reference(s), "
                                              "every reference):")
    # Several references: each generated face against every reference.
    averaged, _ = similarity(comfy, analysis, torch.cat([astronaut, other]), astronaut)
    assert averaged == pytest.approx((same_score + other_score) / 2, abs=1e-6)


def test_similarity_images_without_a_face(comfy, analysis, astronaut):
    black = torch.zeros_like(astronaut)
    images = torch.cat([astronaut, black])
    zero, report = similarity(comfy, analysis, astronaut, images, "zero")
    assert zero == pytest.approx(0.5, abs=1e-5) and "image 1: no face, counted as 0" in report
    assert similarity(comfy, analysis, astronaut, images, "skip")[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="^images: no face found in image 1"):
        similarity(comfy, analysis, astronaut, images, "error")
    with pytest.raises(ValueError, match="^reference: no face found in image 0"):
        similarity(comfy, analysis, black, astronaut)


# dlib is an independent check (test-only): its HOG detector, 68/5-point
# landmarks and 128-d recogniser ship in dlib-bin and face-recognition-models.
def dlib_models():
    dlib = required.module("dlib", "dlib-bin (test-only) is installed by tests/run.py")
    models = required.installed("face_recognition_models",
                                "face-recognition-models (test-only) is installed by tests/run.py")

    # The package's __init__ needs pkg_resources, gone from recent setuptools: read its files directly.
    folder = models.submodule_search_locations[0] + "/models/"
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(folder + "shape_predictor_68_face_landmarks.dat"),
            dlib.shape_predictor(folder + "shape_predictor_5_face_landmarks.dat"),
            dlib.face_recognition_model_v1(folder + "dlib_face_recognition_resnet_model_v1.dat"))


def best_face(detector, image):
    rects, scores, _ = detector.run(image, 1, 0)
    assert len(rects), "dlib found no face"
    return rects[int(np.argmax(scores))]


@pytest.mark.parametrize("size,padding", [(512, 0.0), (512, 0.5), (256, 0.25)])
def test_alignment_agrees_with_an_independent_detector(comfy, size, padding):
    from skimage import data

    detector, landmarks68, landmarks5, recogniser = dlib_models()
    backend = comfy.pack("attention.faces.insightface_backend")
    photo = data.astronaut()
    face = best_face(detector, photo)
    points = np.array([[p.x, p.y] for p in landmarks68(photo, face).parts()], float)
    # ArcFace's 5 points from dlib's 68: eye centres, nose tip, mouth corners.
    kps = np.array([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
    aligned = np.ascontiguousarray(backend.align(photo, kps, size, padding))
    found = best_face(detector, aligned)
    # The face sits where the template puts the landmarks' centroid (below the centre, as in ArcFace crops).
    expected = backend.face_template(size, padding).mean(0)
    centre = found.center()
    assert abs(centre.x - expected[0]) < 0.06 * size and abs(centre.y - expected[1]) < 0.06 * size
    original = np.array(recogniser.compute_face_descriptor(photo, landmarks5(photo, face)))
    ours = np.array(recogniser.compute_face_descriptor(aligned, landmarks5(aligned, found)))
    assert np.linalg.norm(original - ours) < 0.2


def test_pair_prompts_read_the_gender_from_the_identity_photo(comfy, analysis, astronaut):
    """The supplement's recipe: [X] from insightface's gender-age model (here the tiny one, whose
    answer the test works out from insightface's own crop), [Y] and [Z] as given."""
    genders = []
    # the photo, and the photo with red and blue swapped: the tiny model reads one as each gender
    for photo in (astronaut, astronaut.flip(-1)):
        shared, source, target, gender = comfy.run_node(
            "LikenessPairPrompts", analysis=analysis, image=photo, source_domain="normal costume",
            target_domain="Santa Claus costume")
        pixels = (photo[0].numpy() * 255).round().astype(np.uint8)
        expected = tiny.expected_gender(pixels, tiny.TinyFace())
        assert gender == expected
        assert (shared, source, target) == (f"the same {expected} on the left and right",
                                             f"a {expected}, normal costume", f"a {expected}, Santa Claus costume")
        genders.append(gender)
    assert sorted(genders) == ["man", "woman"]


def test_a_pack_without_its_gender_age_model_is_named(comfy, registered_root, astronaut):
    tiny.write_pack(registered_root, "antelopev2", genderage=False)
    (analysis,) = comfy.run_node("LikenessFaceAnalysis", model_name="antelopev2", provider="CPU")
    with pytest.raises(ValueError, match="genderage.onnx"):
        comfy.run_node("LikenessPairPrompts", analysis=analysis, image=astronaut, source_domain="a",
                       target_domain="b")
