"""Sweep and Sweep Grid: a list of values runs the graph once per value, the grid scores every run.

Over the API: a 4-value cfg sweep of a tiny SD1.5 model saves 4 different images (one sampler run
per value, not one cached run), each equal to the graph run alone with that value; the grid has 4
labelled cells holding those images; the plotted points sit where the JSON's metrics put them.
In process: the grid's metrics equal Face Similarity and CLIP Score run alone on each run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from harness.workflows import SHIPPED_FACE_PACK, txt2img_prompt

CLIP = "open_clip_model.safetensors"  # the shipped name; the tests' file is a tiny open_clip model
CFGS = [2.0, 4.0, 6.0, 8.0]
SERIES_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44))  # attention/measuring/plots.py's first three, in order


def test_sweep_emits_evenly_spaced_values_or_a_list(comfy):
    values, ints, one_minus, label, texts = comfy.run_node("LikenessSweep", label="alpha", start=0.5, stop=1.0,
                                                           count=4)
    assert label == "alpha" and texts == [f"{v:g}" for v in values]
    assert values == pytest.approx([0.5, 0.5 + 0.5 / 3, 0.5 + 1.0 / 3, 1.0], abs=1e-9)
    assert one_minus == pytest.approx([0.5, 0.5 - 0.5 / 3, 0.5 - 1.0 / 3, 0.0], abs=1e-9)
    assert ints == [0, 1, 1, 1]  # round half to even: 0.5 -> 0
    listed = comfy.run_node("LikenessSweep", label="steps", start=0, stop=1, count=2, values=" 10, 20.6,30")
    assert listed[0] == [10.0, 20.6, 30.0] and listed[1] == [10, 21, 30]
    assert comfy.run_node("LikenessSweep", label="w", start=0.3, stop=9.0, count=1)[0] == [0.3]
    with pytest.raises(ValueError, match=r"values='1, x' cannot be used: 'x' is not a number"):
        comfy.run_node("LikenessSweep", label="w", start=0, stop=1, count=2, values="1, x")
    # A text or choice input: one run per line (blank lines skipped), numbered for the plot.
    lines = comfy.run_node("LikenessSweep", label="blocks", start=0, stop=1, count=2, values="5",
                           choices="d0\n\n d1, s1 \nall\n")
    assert lines[4] == ["d0", "d1, s1", "all"] and lines[0] == [0.0, 1.0, 2.0]


def sweep_prompt(ckpt: str) -> dict:
    prompt = txt2img_prompt(ckpt, 64, 64, seed=3, steps=2, prefix="sweep_cell")
    prompt["5"]["inputs"]["cfg"] = ["10", 0]
    prompt.update({
        "10": {"class_type": "LikenessSweep", "inputs": {"label": "cfg", "start": CFGS[0], "stop": CFGS[-1],
                                                         "count": len(CFGS), "values": ""}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "likeness_portrait.png"}},
        "12": {"class_type": "LoadImage", "inputs": {"image": "likeness_style.png"}},
        "13": {"class_type": "LikenessFaceAnalysis", "inputs": {"model_name": SHIPPED_FACE_PACK, "provider": "CPU"}},
        "14": {"class_type": "LikenessSweepGrid", "inputs": {
            "images": ["6", 0], "values": ["10", 0], "label": ["10", 3], "analysis": ["13", 0],
            "face_reference": ["11", 0], "no_face": "zero", "clip_checkpoint": CLIP, "architecture": "ViT-H-14",
            "clip_reference": ["12", 0], "prompt": "a portrait photo"}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "sweep_grid"}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["14", 1], "filename_prefix": "sweep_plot"}},
    })
    return prompt


def saved(server, result, node: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(server.base_directory / image.get("type", "output") / image.get("subfolder", "")
                                  / image["filename"]), dtype=np.int16) for image in result.outputs[node]["images"]]


def test_a_four_value_sweep_runs_once_per_value_and_the_grid_shows_and_plots_them(
        server, tiny_checkpoints, shipped_model_files):
    result = server.run_prompt(sweep_prompt(tiny_checkpoints["sd15"]))
    assert result.ok, result.error
    cells = saved(server, result, "7")
    # One sampler run per value: four images, each different from every other (a run cached into one
    # would repeat one picture); the floor is far above PNG rounding.
    assert len(cells) == 4
    for i in range(4):
        for j in range(i):
            assert np.abs(cells[i] - cells[j]).max() > 1e-2 * 255, (i, j)
    # ... and each is the graph run alone with that value.
    alone = txt2img_prompt(tiny_checkpoints["sd15"], 64, 64, seed=3, steps=2, prefix="sweep_alone")
    alone["5"]["inputs"]["cfg"] = CFGS[2]
    single = server.run_prompt(alone)
    assert single.ok, single.error
    assert np.array_equal(saved(server, single, "7")[0], cells[2])

    report = json.loads(result.outputs["14"]["text"][0])
    assert report["label"] == "cfg" and report["values"] == CFGS
    assert set(report["metrics"]) == {"FaceSim", "CLIP-I", "CLIP-T"}
    assert all(len(numbers) == 4 and all(np.isfinite(numbers)) for numbers in report["metrics"].values())

    # The grid: 4 labelled cells, each holding its run's image (rounding aside: SaveImage truncates).
    (grid,) = saved(server, result, "15")
    boxes = [column[0] for column in report["cells"]]
    assert [len(column) for column in report["cells"]] == [1, 1, 1, 1]
    strips = []
    for (x0, y0, x1, y1), cell in zip(boxes, cells):
        assert np.abs(grid[y0:y1, x0:x1] - cell).max() <= 1
        strip = grid[:y0, x0:x1]
        assert (strip.max(-1) < 128).sum() > 20, "no label text above the cell"
        strips.append(strip)
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(strips[i], strips[j]), "two cells carry the same label"

    # The plot: each metric's points where its numbers put them. One linear map takes every value to
    # its x and every score to its y (fitted on two points, checked on all), and the series' colour
    # is drawn there.
    (plot,) = saved(server, result, "16")
    points = [(value, score, xy, name) for name, numbers in report["metrics"].items()
              for value, score, xy in zip(report["values"], numbers, report["plot_points"][name])]
    assert len(points) == 12
    (v0, s0, (x0, y0), _), (_, s1, (x1, y1), _) = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
    x_scale = (report["plot_points"]["FaceSim"][-1][0] - report["plot_points"]["FaceSim"][0][0]) / (CFGS[-1] - CFGS[0])
    y_scale = (y1 - y0) / (s1 - s0)
    assert x_scale > 0 and y_scale < 0  # values grow rightwards, scores upwards
    colours = {name: SERIES_COLOURS[i] for i, name in enumerate(report["metrics"])}
    coloured = 0
    for value, score, (x, y), name in points:
        assert x == pytest.approx(x0 + (value - v0) * x_scale, abs=1e-6)
        assert y == pytest.approx(y0 + (score - s0) * y_scale, abs=1e-6)
        if all(abs(x - ox) + abs(y - oy) > 8 for _, _, (ox, oy), other in points if other != name):
            assert tuple(plot[int(round(y)), int(round(x))]) == colours[name], (name, value)
            coloured += 1
    assert coloured >= 4, "the series overlap everywhere: nothing checked"


@pytest.fixture(scope="module")
def runs() -> list[torch.Tensor]:
    """Four runs of two images each: the astronaut's face, dimmed, mirrored and shifted."""
    from skimage import data

    astronaut = torch.from_numpy(data.astronaut()).float().div(255)[None]
    variants = [astronaut, astronaut * 0.7, astronaut.flip(2), astronaut.roll(40, dims=1)]
    return [torch.cat([variant, variant.roll(7, dims=2)]) for variant in variants]


def test_the_grids_metrics_equal_the_metric_nodes_run_alone(comfy, shipped_model_files, runs):
    analysis = comfy.run_node("LikenessFaceAnalysis", model_name=SHIPPED_FACE_PACK, provider="CPU")[0]
    face, style = runs[0][:1], runs[1][:1].flip(1)
    values = [0.5, 0.6, 0.8, 1.0]
    grid, plot, text = comfy.run_node(
        "LikenessSweepGrid", images=runs, values=values, label=["alpha"], analysis=[analysis],
        face_reference=[face], no_face=["zero"], clip_checkpoint=[CLIP], architecture=["ViT-H-14"],
        clip_reference=[style], prompt=["a portrait photo"])
    report = json.loads(text)
    for i, run in enumerate(runs):
        face_sim, _ = comfy.run_node("LikenessFaceSimilarity", analysis=analysis, reference=face, images=run,
                                     no_face="zero")
        clip_i, clip_t, _ = comfy.run_node("LikenessCLIPScore", checkpoint=CLIP, architecture="ViT-H-14",
                                           images=run, reference=style, text="a portrait photo")
        assert report["metrics"]["FaceSim"][i] == face_sim
        assert report["metrics"]["CLIP-I"][i] == clip_i and report["metrics"]["CLIP-T"][i] == clip_t
    # The scores tell the runs apart (else this proves little), and each run's two images are a column.
    assert max(report["metrics"]["FaceSim"]) - min(report["metrics"]["FaceSim"]) > 1e-2
    assert [len(column) for column in report["cells"]] == [2, 2, 2, 2]
    pixels = (grid[0].numpy() * 255).round()
    for column, run in zip(report["cells"], runs):
        for (x0, y0, x1, y1), image in zip(column, run):
            assert np.array_equal(pixels[y0:y1, x0:x1], (image.numpy() * 255).round())
    assert plot.shape[-1] == 3 and list(report["plot_points"]) == ["FaceSim", "CLIP-I", "CLIP-T"]


def test_only_connected_metrics_are_computed_and_mismatched_inputs_are_named(comfy, runs):
    _, _, text = comfy.run_node("LikenessSweepGrid", images=runs[:2], values=[1.0, 2.0], label=["w"])
    report = json.loads(text)
    assert report["metrics"] == {} and report["values"] == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"values='3 value\(s\)' cannot be used: expected one value per run"):
        comfy.run_node("LikenessSweepGrid", images=runs[:2], values=[1.0, 2.0, 3.0], label=["w"])
    with pytest.raises(ValueError, match="face_reference=None cannot be used"):
        comfy.run_node("LikenessSweepGrid", images=runs[:2], values=[1.0, 2.0], label=["w"], analysis=[object()])


def test_the_grids_metrics_are_the_papers_metrics_computed_here(comfy, shipped_model_files, base_directory):
    """Each run's FaceSim, CLIP-I on face crops and CLIP Score, image i against reference i and prompt i, as
    100·cos: insightface and open_clip called here (harness/metric_oracles.py), never the pack's code; and
    the grid names each metric as its paper does."""
    from PIL import Image
    from skimage import data

    from harness.metric_oracles import OpenCLIP, face_cosines, face_crop, insightface_app

    astronaut = data.astronaut()
    square = lambda photo: np.asarray(Image.fromarray(photo).resize((512, 512), Image.BICUBIC))  # noqa: E731
    runs = [[astronaut, astronaut[:, ::-1].copy()],
            [np.roll(astronaut, 40, axis=0), (astronaut * 0.6).astype(np.uint8)],
            [square(data.chelsea()), square(data.coffee())]]
    faces, styles = [astronaut, square(data.chelsea())], [square(data.coffee()), astronaut[:, ::-1].copy()]
    prompts = ["a portrait photo of an astronaut", "a cat on a sofa"]
    batch = lambda photos: torch.from_numpy(np.stack(photos)).float() / 255  # noqa: E731
    analysis = comfy.run_node("LikenessFaceAnalysis", model_name=SHIPPED_FACE_PACK, provider="CPU")[0]
    _, _, text = comfy.run_node(
        "LikenessSweepGrid", images=[batch(run) for run in runs], values=[1.0, 2.0, 3.0], label=["w"],
        analysis=[analysis], face_reference=[batch(faces)], no_face=["zero"], clip_checkpoint=[CLIP],
        architecture=["ViT-H-14"], clip_reference=[batch(styles)], prompt=["\n".join(prompts)],
        clip_i_on=["face crops"], pairing=["one per image"], scale=["100 x cosine"])
    report = json.loads(text)

    app = insightface_app(base_directory / "models" / "insightface" / "models" / SHIPPED_FACE_PACK)
    clip = OpenCLIP(base_directory / "models" / "open_clip" / CLIP)
    expected = {
        "FaceSim": [100 * np.diag(face_cosines(app, run, faces)).mean() for run in runs],
        "CLIP-I": [100 * np.diag(clip.image_cosines([face_crop(app, p) for p in run],
                                                    [face_crop(app, s) for s in styles])).mean() for run in runs],
        "CLIP-T": [100 * np.diag(clip.text_cosines(run, prompts)).mean() for run in runs]}
    tolerance = {"FaceSim": 1e-2, "CLIP-I": 2e-2, "CLIP-T": 1e-3}  # 100× the metric tests' (test_metrics.py)
    for name, numbers in expected.items():
        assert max(numbers) - min(numbers) > 10 * tolerance[name], (name, numbers)
        np.testing.assert_allclose(report["metrics"][name], numbers, rtol=0, atol=tolerance[name], err_msg=name)
    assert report["names"] == {"FaceSim": "FaceSim: 100·ArcFace cos (MagicStyle Table I)",
                               "CLIP-I": "CLIP-I: 100·cos, face crops (Infinite-ID Eq. 9)",
                               "CLIP-T": "CLIP Score: 100·cos image-prompt (Face Fusion Table 2)"}
    assert (report["scale"], report["pairing"], report["clip_i_on"]) == ("100 x cosine", "one per image", "face crops")
