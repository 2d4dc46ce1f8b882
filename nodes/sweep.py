"""Choosing a setting by measurement: a sweep of one input and a grid that scores every run.

LikenessSweep emits its values as a ComfyUI list output, so everything downstream of it runs once
per value; LikenessSweepGrid gathers every run's images at once (an input-list node), lays them
out under their values, computes the pack's metrics for each (whichever are connected) with the
metric nodes' own code, and plots each metric against the swept value.
"""

from __future__ import annotations

import json
import math

from comfy_api.latest import io

from .common import OPEN_CLIP_FOLDER, require
from .face_analysis import FaceAnalysisType
from .metrics import CLIP_I_ON, CLIP_SCALES, PAIRING_TOOLTIP, PAIRINGS, metric_label

CATEGORY = "likeness/sweep"
NO_CHECKPOINT = "none"
MAX_VALUES = 64


def sweep_values(start: float, stop: float, count: int, listed: str = "") -> list[float]:
    """``count`` evenly spaced values from ``start`` to ``stop`` (both included), or the values of
    ``listed`` (comma-separated) when it is not empty."""
    if listed.strip():
        values = []
        for item in listed.split(","):
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(f"values={listed!r} cannot be used: {item.strip()!r} is not a number; expected "
                                 "numbers separated by commas, e.g. 0.5, 0.75, 1") from None
        require(all(math.isfinite(v) for v in values), "values", listed, "finite numbers")
        require(len(values) <= MAX_VALUES, "values", listed, f"at most {MAX_VALUES} values")
        return values
    require(1 <= count <= MAX_VALUES, "count", count, f"1 to {MAX_VALUES}")
    if count == 1:
        return [float(start)]
    # Rounded so that labels read 0.75 rather than 0.7500000000000001.
    return [round(start + (stop - start) * i / (count - 1), 10) for i in range(count)]


def sweep_choices(listed: str) -> list[str]:
    """The settings of a text or choice input to sweep, one per line (blank lines skipped)."""
    choices = [line.strip() for line in listed.splitlines() if line.strip()]
    require(len(choices) <= MAX_VALUES, "choices", listed, f"at most {MAX_VALUES} lines")
    return choices


class LikenessSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessSweep",
            display_name="Likeness Sweep",
            category=CATEGORY,
            description="Emits a list of values for one input: everything downstream runs once per value. "
                        "Connect 'values' (or 'ints', or 'one_minus' for a weight that pairs with it, such as "
                        "MagicStyle's β = 1 − α) to the swept input, and all three plus 'label' to Likeness "
                        "Sweep Grid.",
            inputs=[
                io.String.Input("label", default="alpha",
                                tooltip="The swept input's name, written on the grid and the plot."),
                io.Float.Input("start", default=0.5, min=-1e6, max=1e6, step=0.01,
                               tooltip="First value."),
                io.Float.Input("stop", default=1.0, min=-1e6, max=1e6, step=0.01,
                               tooltip="Last value (included)."),
                io.Int.Input("count", default=4, min=1, max=MAX_VALUES,
                             tooltip="How many evenly spaced values from start to stop."),
                io.String.Input("values", default="", optional=True,
                                tooltip="Comma-separated values to use instead of start/stop/count, "
                                        "e.g. 0.5, 0.7, 0.9, 1.0."),
                io.String.Input("choices", default="", multiline=True, optional=True,
                                tooltip="One setting per line, for a text or choice input (FFA's blocks or "
                                        "layers, e.g. 'double', 'single', 'd0, d5'): the sweep runs once per "
                                        "line; 'choices' gives the lines, 'values' their numbers 0, 1, 2, ..."),
            ],
            outputs=[
                io.Float.Output(display_name="values", is_output_list=True,
                                tooltip="The values, one run of the downstream graph each."),
                io.Int.Output(display_name="ints", is_output_list=True,
                              tooltip="The values rounded to whole numbers (steps, seeds, sizes)."),
                io.Float.Output(display_name="one_minus", is_output_list=True,
                                tooltip="1 − each value, for a paired weight (MagicStyle β = 1 − α)."),
                io.String.Output(display_name="label", tooltip="The label, for the grid."),
                io.String.Output(display_name="choices", is_output_list=True,
                                 tooltip="The lines of 'choices' (else the values as text), one run each; "
                                         "connect to the swept text input and to the grid's 'choices'."),
            ],
        )

    @classmethod
    def execute(cls, label: str, start: float, stop: float, count: int, values: str = "",
                choices: str = "") -> io.NodeOutput:
        lines = sweep_choices(choices or "")
        swept = [float(i) for i in range(len(lines))] if lines else sweep_values(start, stop, count, values or "")
        texts = lines or [f"{v:g}" for v in swept]
        return io.NodeOutput(swept, [int(round(v)) for v in swept], [round(1.0 - v, 10) for v in swept], label,
                             texts)


def _first(value, default=None):
    """An input-list node receives every input as a list; a single-valued input is its first item."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def checkpoint_options() -> list[str]:
    from .metrics import checkpoint_choices

    return [NO_CHECKPOINT, *checkpoint_choices()]


class LikenessSweepGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LikenessSweepGrid",
            display_name="Likeness Sweep Grid",
            category=CATEGORY,
            description="Every run of a sweep: the images in a grid, one column per value under its label; the "
                        "connected metrics per value (FaceSim against a reference face, CLIP-I against a "
                        "reference image, CLIP-T against a prompt; each the mean over that run's images, as "
                        "the metric nodes compute it, and named as they name it: whose metric, on what, at "
                        "which scale); a plot of each metric against the value; the numbers as JSON.",
            is_input_list=True,
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The swept run's images (one run per value)."),
                io.Float.Input("values", force_input=True, tooltip="Likeness Sweep's values."),
                io.String.Input("label", default="value", tooltip="The swept input's name (Likeness Sweep's label)."),
                io.String.Input("choices", optional=True, force_input=True,
                                tooltip="Likeness Sweep's choices, when it swept the lines of a text or choice "
                                        "input: each column is labelled with its line, the plot runs over their "
                                        "numbers."),
                FaceAnalysisType.Input("analysis", optional=True,
                                       tooltip="Likeness Face Analysis: with face_reference, scores FaceSim."),
                io.Image.Input("face_reference", optional=True, tooltip="The person's photo for FaceSim."),
                io.Combo.Input("no_face", options=["zero", "skip", "error"], default="zero", optional=True,
                               tooltip="An image without a face scores 0, is left out, or stops the run (as "
                                       "in Likeness Face Similarity)."),
                io.Combo.Input("clip_checkpoint", options=checkpoint_options(), default=NO_CHECKPOINT,
                               optional=True,
                               tooltip=f"An open_clip checkpoint in models/{OPEN_CLIP_FOLDER}/ for CLIP-I "
                                       "(with clip_reference) and CLIP-T (with prompt); none: no CLIP score."),
                io.String.Input("architecture", default="ViT-H-14", optional=True,
                                tooltip="open_clip architecture of the checkpoint (a .json config beside it wins)."),
                io.Image.Input("clip_reference", optional=True,
                               tooltip="The style or reference image for CLIP-I."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="The prompt for CLIP-T (empty: no CLIP-T; with pairing 'one per image', "
                                        "one prompt per line)."),
                io.Combo.Input("clip_i_on", options=list(CLIP_I_ON), default=CLIP_I_ON[0], optional=True,
                               tooltip="whole image: MagicStyle's CLIP-I. face crops: Infinite-ID's (Eq. 9), "
                                       "each image's and the reference's aligned face; needs 'analysis'."),
                io.Combo.Input("pairing", options=list(PAIRINGS), default=PAIRINGS[0], optional=True,
                               tooltip=PAIRING_TOOLTIP + " Within each run."),
                io.Combo.Input("scale", options=list(CLIP_SCALES), default=CLIP_SCALES[0], optional=True,
                               tooltip="cosine: as Infinite-ID reports. 100 x cosine: as MagicStyle's Table I "
                                       "and Face Fusion's Table 2 print them."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="The images under their values and scores."),
                io.Image.Output(display_name="plot", tooltip="Each metric against the swept value."),
                io.String.Output(display_name="json", tooltip="Values, metrics per value and the plot's points."),
            ],
        )

    @classmethod
    def validate_inputs(cls, clip_checkpoint=None) -> bool | str:
        from .metrics import checkpoint_choices
        from .model_files import missing_file

        return missing_file(OPEN_CLIP_FOLDER, "clip_checkpoint", _first(clip_checkpoint, NO_CHECKPOINT),
                            checkpoint_choices(), (NO_CHECKPOINT,))

    @classmethod
    def fingerprint_inputs(cls, clip_checkpoint=None, **_) -> tuple:
        from .metrics import checkpoint_fingerprint

        checkpoint = _first(clip_checkpoint, NO_CHECKPOINT)
        return checkpoint_fingerprint(checkpoint) if checkpoint != NO_CHECKPOINT else ()

    @classmethod
    def execute(cls, images: list, values: list, label: list, choices=None, analysis=None, face_reference=None,
                no_face=None, clip_checkpoint=None, architecture=None, clip_reference=None, prompt=None,
                clip_i_on=None, pairing=None, scale=None) -> io.NodeOutput:
        from ..attention.measuring import plots

        label = _first(label, "value")
        require(len(images) == len(values), "values", f"{len(values)} value(s)",
                f"one value per run of images ({len(images)} run(s)): connect the sweep's values")
        settings = dict(clip_i_on=_first(clip_i_on, CLIP_I_ON[0]), pairing=_first(pairing, PAIRINGS[0]),
                        scale=_first(scale, CLIP_SCALES[0]))
        scores = measure(images, analysis=_first(analysis), face_reference=_first(face_reference),
                         no_face=_first(no_face, "zero"), clip_checkpoint=_first(clip_checkpoint, NO_CHECKPOINT),
                         architecture=_first(architecture, "ViT-H-14"), clip_reference=_first(clip_reference),
                         prompt=_first(prompt, "") or "", **settings)
        names = {metric: metric_label(metric, settings["scale"], settings["clip_i_on"]) for metric in scores}
        columns = []
        if choices:
            require(len(choices) == len(values), "choices", f"{len(choices)} line(s)",
                    f"one per value ({len(values)}): connect the same sweep's choices and values")
        for i, (value, run) in enumerate(zip(values, images)):
            shown = choices[i] if choices else f"{value:.4g}"
            lines = [f"{label} = {shown}"] + [f"{names[metric]}  {numbers[i]:.3f}"
                                                  for metric, numbers in scores.items()]
            columns.append(("\n".join(lines), list(run)))
        grid, boxes = plots.labelled_grid(columns)
        series = {names[metric]: list(zip(values, numbers)) for metric, numbers in scores.items()}
        x_label = f"{label} (line number)" if choices else label
        plot, drawn = plots.line_plot(series, title=f"metrics against {label}", x_label=x_label,
                                      y_label=y_label(settings["scale"]))
        report = {"label": label, "values": list(values), "choices": list(choices or []), "metrics": scores, "names": names, **settings,
                  "cells": [[list(box) for box in column] for column in boxes],
                  "plot_points": {metric: [list(p) for p in drawn[names[metric]]] for metric in scores}}
        text = json.dumps(report)
        return io.NodeOutput(grid, plot, text, ui={"text": [text]})


def y_label(scale: str) -> str:
    return "score (100·cos)" if scale == "100 x cosine" else "score (cos)"


def measure(images: list, *, analysis=None, face_reference=None, no_face: str = "zero",
            clip_checkpoint: str = NO_CHECKPOINT, architecture: str = "ViT-H-14", clip_reference=None,
            prompt: str = "", clip_i_on: str = CLIP_I_ON[0], pairing: str = PAIRINGS[0],
            scale: str = CLIP_SCALES[0]) -> dict[str, list[float]]:
    """Per run (a batch of images), each connected metric as its metric node computes it."""
    scores: dict[str, list[float]] = {}
    clip_i_on_faces = clip_i_on == CLIP_I_ON[1] and clip_reference is not None
    if face_reference is not None and analysis is None:
        raise ValueError("analysis=None cannot be used: FaceSim against face_reference needs a Likeness Face "
                         "Analysis")
    if analysis is not None and face_reference is None and not clip_i_on_faces:
        raise ValueError("face_reference=None cannot be used: FaceSim needs both analysis and face_reference "
                         "(or neither; analysis alone serves CLIP-I on face crops)")
    if face_reference is not None:
        from .face_analysis import face_similarity

        scores["FaceSim"] = [face_similarity(analysis, face_reference, run, no_face, pairing=pairing, scale=scale)[0]
                             for run in images]
    if clip_checkpoint != NO_CHECKPOINT and (clip_reference is not None or prompt):
        from .metrics import clip_scores

        results = [clip_scores(clip_checkpoint, architecture, run, clip_reference, prompt, "clip_checkpoint",
                               clip_i_on=clip_i_on, analysis=analysis, pairing=pairing, scale=scale).means()
                   for run in images]
        if clip_reference is not None:
            scores["CLIP-I"] = [clip_i for clip_i, _ in results]
        if prompt:
            scores["CLIP-T"] = [clip_t for _, clip_t in results]
    return scores


NODES = [LikenessSweep, LikenessSweepGrid]
