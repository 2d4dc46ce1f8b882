"""Tiny insightface model packs, written with ``onnx.helper``: test-only.

insightface does not care about file names; ``FaceAnalysis`` loads every
``*.onnx`` of a pack folder and its model zoo routes each by shape
(``model_zoo.ModelRouter``): a model with >= 5 outputs is an SCRFD detector,
a square input of 112 (a multiple of 16, >= 112) is an ArcFace recogniser.
We keep the real packs' file names anyway, so the folder looks like a user's.

- The detector has SCRFD's 9-output layout (strides 8/16/32, 2 anchors per
  cell, with key points): outputs 0-2 are the scores (N, 1), 3-5 the box
  distances (N, 4), 6-8 the key-point offsets (N, 10), N = (H/s)·(W/s)·2 for
  stride s, all in units of the stride, decoded around the anchor centres
  (x·s, y·s) exactly as ``scrfd.SCRFD.forward`` does. Its input is dynamic
  (1×3×H×W). It reports each configured face at a fixed place *relative to
  its input* (so on a square photo, at a known place in the photo), with a
  score that grows with the input's spread: an all-black image has no face.
  ``max_input`` makes it blind above an input size, to test the retries.
- The recogniser maps 1×3×112×112 to 1×512 with a fixed random projection of
  8×8-pooled pixels: identical crops give identical embeddings, different
  crops different ones. Each pack's recogniser has its own projection
  (RECOGNITION_SEEDS), as glintr100 and w600k_r50 embed one face differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 20261126

# The astronaut's face in skimage.data.astronaut() (512×512), as fractions of
# the image: a box from forehead to chin, and insightface's 5 key points
# (eye centres, nose tip, mouth corners) measured once with dlib's 68 points.
ASTRONAUT_BOX = (172 / 512, 62 / 512, 272 / 512, 178 / 512)
ASTRONAUT_KPS = ((203.2 / 512, 101.5 / 512), (246.5 / 512, 104.2 / 512), (225.0 / 512, 127.0 / 512),
                 (201.0 / 512, 139.0 / 512), (246.0 / 512, 141.0 / 512))

# The file names of the real packs (detector, recogniser).
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
# Two recognition networks, two embedding spaces: the projection's seed per recogniser file.
RECOGNITION_SEEDS = {"w600k_r50.onnx": SEED, "glintr100.onnx": SEED + 1}


@dataclass(frozen=True)
class TinyFace:
    """One face the tiny detector reports: fractions of its input's width/height."""

    box: tuple[float, float, float, float] = ASTRONAUT_BOX
    kps: tuple[tuple[float, float], ...] = ASTRONAUT_KPS
    score: float = 0.9

    def scaled(self, factor: float, centre: tuple[float, float]) -> TinyFace:
        """The same face shrunk/grown about a new centre (a second, other-sized face)."""
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

        def move(x: float, y: float) -> tuple[float, float]:
            return centre[0] + (x - cx) * factor, centre[1] + (y - cy) * factor

        x1, y1 = move(self.box[0], self.box[1])
        x2, y2 = move(self.box[2], self.box[3])
        return TinyFace((x1, y1, x2, y2), tuple(move(x, y) for x, y in self.kps), self.score)


STRIDES = (32, 16, 8)  # face i is reported by every anchor of STRIDES[i]


def detector_model(faces: tuple[TinyFace, ...] = (TinyFace(),), max_input: int | None = None):
    """An SCRFD-shaped ``onnx.ModelProto`` reporting ``faces`` (at most 3)."""
    from onnx import TensorProto, helper

    assert len(faces) <= len(STRIDES)
    nodes, inits = [], []

    def const(name: str, value, dtype=np.float32) -> str:
        inits.append(helper.make_tensor(name, TensorProto.FLOAT if dtype == np.float32 else TensorProto.INT64,
                                        np.shape(value), np.asarray(value, dtype).ravel().tolist()))
        return name

    def op(kind: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [output], name=f"{kind.lower()}_{output}", **attrs))
        return output

    op("Shape", ["input.1"], "shape")
    for axis, name in ((2, "h"), (3, "w")):
        op("Gather", ["shape", const(f"axis{axis}", axis, np.int64)], f"{name}_i", axis=0)
        op("Cast", [f"{name}_i"], f"{name}_f", to=TensorProto.FLOAT)
    # An all-black input has no face: the score grows with the input's spread.
    op("ReduceMean", ["input.1"], "mean", keepdims=1)
    op("Sub", ["input.1", "mean"], "centred")
    op("Mul", ["centred", "centred"], "squared")
    op("ReduceMean", ["squared"], "variance", keepdims=0)
    op("Sqrt", ["variance"], "spread")
    op("Mul", ["spread", const("spread_gain", 50.0)], "spread_gained")
    op("Min", ["spread_gained", const("one", 1.0)], "presence")
    if max_input is not None:
        op("LessOrEqual", ["h_f", const("max_input", float(max_input))], "small_enough")
        op("Cast", ["small_enough"], "small_f", to=TensorProto.FLOAT)
        op("Mul", ["presence", "small_f"], "presence_gated")
        presence = "presence_gated"
    else:
        presence = "presence"

    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in sorted(STRIDES):
        p = f"s{stride}"
        stride_i = const(f"{p}_stride_i", stride, np.int64)
        stride_f = const(f"{p}_stride_f", float(stride))
        op("Div", ["h_i", stride_i], f"{p}_rows")
        op("Div", ["w_i", stride_i], f"{p}_cols")
        zero, step = const(f"{p}_zero", 0, np.int64), const(f"{p}_step", 1, np.int64)
        for axis, count in (("x", f"{p}_cols"), ("y", f"{p}_rows")):
            op("Range", [zero, count, step], f"{p}_{axis}_i")
            op("Cast", [f"{p}_{axis}_i"], f"{p}_{axis}_f", to=TensorProto.FLOAT)
            op("Mul", [f"{p}_{axis}_f", stride_f], f"{p}_{axis}_px")
        # Anchor centres in SCRFD's order: row-major cells, each cell twice (2 anchors).
        axis0 = const(f"{p}_ax0", [0], np.int64)
        op("Unsqueeze", [f"{p}_rows", axis0], f"{p}_rows1")
        op("Unsqueeze", [f"{p}_cols", axis0], f"{p}_cols1")
        op("Concat", [f"{p}_rows1", f"{p}_cols1"], f"{p}_grid_shape", axis=0)
        op("Unsqueeze", [f"{p}_x_px", axis0], f"{p}_x_row")
        op("Unsqueeze", [f"{p}_y_px", const(f"{p}_ax1", [1], np.int64)], f"{p}_y_col")
        flat = const(f"{p}_flat", [-1, 1], np.int64)
        for axis, source in (("x", f"{p}_x_row"), ("y", f"{p}_y_col")):
            op("Expand", [source, f"{p}_grid_shape"], f"{p}_{axis}_grid")
            op("Reshape", [f"{p}_{axis}_grid", flat], f"{p}_{axis}_cell")
            op("Concat", [f"{p}_{axis}_cell", f"{p}_{axis}_cell"], f"{p}_{axis}_pair", axis=1)
            op("Reshape", [f"{p}_{axis}_pair", flat], f"{p}_{axis}_anchor")
        face_index = STRIDES.index(stride)
        face = faces[face_index] if face_index < len(faces) else None
        # Every anchor of this level decodes to the same face, so NMS keeps one.
        box = face.box if face else (0.0, 0.0, 0.0, 0.0)
        kps = face.kps if face else ((0.0, 0.0),) * 5
        coords = [("x", box[0]), ("y", box[1]), ("x", box[2]), ("y", box[3])]
        coords += [(axis, v) for point in kps for axis, v in zip(("x", "y"), point, strict=True)]
        pieces = []
        for j, (axis, fraction) in enumerate(coords):
            size = "w_f" if axis == "x" else "h_f"
            target = op("Mul", [size, const(f"{p}_c{j}", fraction)], f"{p}_target{j}")
            # Boxes: (left, top) = anchor - corner, (right, bottom) = corner - anchor; key points: point - anchor.
            first, second = ((f"{p}_{axis}_anchor", target) if j < 2 else (target, f"{p}_{axis}_anchor"))
            op("Sub", [first, second], f"{p}_px{j}")
            pieces.append(op("Div", [f"{p}_px{j}", stride_f], f"{p}_d{j}"))
        outputs["bbox"].append(op("Concat", pieces[:4], f"bbox_{stride}", axis=1))
        outputs["kps"].append(op("Concat", pieces[4:], f"kps_{stride}", axis=1))
        score = face.score if face else 0.0
        op("Mul", [presence, const(f"{p}_score", score)], f"{p}_score_value")
        op("Mul", [f"{p}_x_anchor", const(f"{p}_zero_s", 0.0)], f"{p}_zeros")
        outputs["score"].append(op("Add", [f"{p}_zeros", f"{p}_score_value"], f"score_{stride}"))

    dims = {"score": 1, "bbox": 4, "kps": 10}
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name.split('_')[1]}", dims[kind]])
                     for kind in ("score", "bbox", "kps") for name in outputs[kind]]
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                             [1, 3, "height", "width"])],
                              graph_outputs, initializer=inits)
    return _finish(graph)


def recognition_model(seed: int = SEED):
    """An ArcFace-shaped ``onnx.ModelProto``: (N, 3, 112, 112) → (N, 512)."""
    from onnx import TensorProto, helper

    projection = np.random.default_rng(seed).standard_normal((3 * 14 * 14, 512)).astype(np.float32)
    # Node names must not start with Sub/Mul: ArcFaceONNX reads those as an
    # mxnet model with its own normalisation.
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8],
                              strides=[8, 8]),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
             helper.make_node("MatMul", ["flat", "projection"], ["683"], name="project")]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
        initializer=[helper.make_tensor("projection", TensorProto.FLOAT, projection.shape,
                                        projection.ravel().tolist())])
    return _finish(graph)


GENDERAGE_FILE = "genderage.onnx"  # the same name in antelopev2 and buffalo_l
GENDERAGE_AGE = 0.3  # insightface reads age as round(output · 100)


def genderage_model():
    """insightface's gender-age model's shape: (1, 3, 96, 96) → (1, 3) = [female, male, age/100].
    Tiny rule: the input's mean red channel above its mean blue one reads as male (the blob is RGB)."""
    from onnx import TensorProto, helper

    weights = np.array([[-1, 1, 0], [0, 0, 0], [1, -1, 0]], dtype=np.float32)  # rows r, g, b → female, male, age
    bias = np.array([0, 0, GENDERAGE_AGE], dtype=np.float32)
    # Names must not start with Sub/Mul (insightface would read an mxnet model's normalisation).
    nodes = [helper.make_node("ReduceMean", ["data"], ["means"], name="channel_means", axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["means", "weights"], ["scores"], name="project"),
             helper.make_node("Add", ["scores", "bias"], ["fc1"], name="offset")]
    graph = helper.make_graph(
        nodes, "tiny_genderage",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])],
        initializer=[helper.make_tensor("weights", TensorProto.FLOAT, weights.shape, weights.ravel().tolist()),
                     helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias.tolist())])
    return _finish(graph)


def expected_gender(image_rgb, face: TinyFace) -> str:
    """What the tiny gender-age model says of ``face`` in an (H, W, 3) uint8 RGB image, worked out
    here from insightface's own crop (its Attribute model's transform) and the rule above."""
    from insightface.utils import face_align

    height, width = image_rgb.shape[:2]
    x1, y1, x2, y2 = (face.box[0] * width, face.box[1] * height, face.box[2] * width, face.box[3] * height)
    scale = 96 / (max(x2 - x1, y2 - y1) * 1.5)
    crop, _ = face_align.transform(image_rgb[..., ::-1].copy(), ((x1 + x2) / 2, (y1 + y2) / 2), 96, scale, 0)
    blob = (crop[..., ::-1].astype(np.float32) - 127.5) / 128.0  # back to RGB, insightface's normalisation
    red, blue = blob[..., 0].mean(), blob[..., 2].mean()
    return "man" if red > blue else "woman"


def _finish(graph):
    import onnx
    from onnx import helper

    # IR 8 / opset 13: loadable by every onnxruntime insightface runs on.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def write_pack(root: Path, name: str, faces: tuple[TinyFace, ...] = (TinyFace(),), *,
               detector: bool = True, recognition: bool = True, max_input: int | None = None,
               genderage: bool = True) -> Path:
    """Write ``<root>/models/<name>/`` with a tiny detector, recogniser and gender-age model."""
    return _write_files(Path(root) / "models" / name, name, faces, detector, recognition, max_input, genderage)


def write_nested_pack(root: Path, name: str) -> Path:
    """The usual unzip mistake, ``<root>/models/<name>/<name>/*.onnx``; returns the outer folder."""
    outer = Path(root) / "models" / name
    _write_files(outer / name, name, (TinyFace(),), True, True, None, True)
    return outer


def _write_files(folder: Path, name: str, faces: tuple[TinyFace, ...], detector: bool, recognition: bool,
                 max_input: int | None, genderage: bool) -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    det_file, rec_file = PACK_FILES.get(name, PACK_FILES["buffalo_l"])
    if detector:
        onnx.save(detector_model(faces, max_input), str(folder / det_file))
    if recognition:
        onnx.save(recognition_model(RECOGNITION_SEEDS[rec_file]), str(folder / rec_file))
    if genderage:
        onnx.save(genderage_model(), str(folder / GENDERAGE_FILE))
    return folder
