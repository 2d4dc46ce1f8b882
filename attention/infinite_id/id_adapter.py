"""Infinite-ID's identity stream in the IP-Adapter FaceID-PlusV2 file layout.

FaceID-PlusV2 maps an ArcFace embedding (512) to ``num_tokens`` tokens
through an MLP and a LayerNorm, refines them with a Perceiver resampler
that attends over CLIP ViT-H's penultimate hidden states, and keeps the
MLP tokens as a shortcut (V2):

    x   = LayerNorm(MLP(id)).reshape(B, num_tokens, C)
    out = x + s_scale · Resampler(x, clip_hidden)

Every cross-attention layer then has its own image key/value projections
(``to_k_ip``/``to_v_ip``: C → the layer's inner width). Infinite-ID's
identity stream has exactly this structure, so files users already have in
``models/ipadapter/`` load here, and a trained adapter saves back to it.

File layout (tencent-ailab/IP-Adapter ``ip_adapter_faceid.py`` and
``resampler.py``; cubiq/ComfyUI_IPAdapter_plus ``IPAdapterPlus.py``):

- ``image_proj.``: ``proj.0`` / ``proj.2`` (the MLP, GELU at 1), ``norm``,
  ``perceiver_resampler.{proj_in, proj_out, norm_out}`` and
  ``perceiver_resampler.layers.<i>.0.{norm1, norm2, to_q, to_kv, to_out}``
  (attention, no biases, 64-wide heads) and ``layers.<i>.1.{0, 1, 3}``
  (LayerNorm, Linear, GELU, Linear feed-forward).
- ``ip_adapter.``: one entry per attention processor of the diffusers UNet
  (self- and cross-attention alternate), so the image projections sit at
  the odd numbers ``2n+1``; FaceID files also carry a LoRA at every
  processor (``<i>.to_{q,k,v,out}_lora.{down,up}.weight``), which the identity
  stream applies (attention/infinite_id/faceid_lora.py).

The face mapper reads one recognition network's 512-d space: buffalo_l's
w600k_r50 for the public files (their model card); a file Likeness writes
records its network in the safetensors metadata (FaceRecognition below).

Which layer is which: diffusers registers ``down_blocks`` and ``up_blocks``
before ``mid_block``, so processors run down blocks, up blocks, then the
middle block — not forward order. In ComfyUI's keys that is every "input"
block, every "output" block, then "middle" (IPAdapter_plus numbers its
patches the same way: input ids, output ids, middle; key ``number*2+1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..shared.atomic_files import atomic_path
from ..shared.layer_table import BlockKey
from .faceid_projection import FaceIDPlusProjection, ProjectionShape

IMAGE_PROJ = "image_proj."
IP_ADAPTER = "ip_adapter."
LORA_PARTS = tuple(f"to_{which}_lora.{side}.weight" for which in ("q", "k", "v", "out") for side in ("down", "up"))

RECOGNITION_MODEL_KEY = "likeness.face_recognition_model"
RECOGNITION_PACK_KEY = "likeness.face_recognition_pack"

_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_STAGE_RANK = {"input": 0, "output": 1, "middle": 2}


def _expand(blocks: list[tuple[str, int, int]]) -> tuple[BlockKey, ...]:
    return tuple((name, number, index) for name, number, depth in blocks for index in range(depth))


# ComfyUI block keys in the file's order (n-th entry ↔ file number 2n+1).
FILE_LAYOUTS: dict[str, tuple[BlockKey, ...]] = {
    "sd15": _expand([("input", n, 1) for n in (1, 2, 4, 5, 7, 8)]
                    + [("output", n, 1) for n in range(3, 12)] + [("middle", 0, 1)]),
    "sdxl": _expand([("input", 4, 2), ("input", 5, 2), ("input", 7, 10), ("input", 8, 10)]
                    + [("output", n, 10) for n in (0, 1, 2)] + [("output", n, 2) for n in (3, 4, 5)]
                    + [("middle", 0, 10)]),
}
KIND_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def file_order(keys: list[BlockKey]) -> list[BlockKey]:
    """A UNet's block keys (forward order) in diffusers' processor order: input, output, middle."""
    return sorted(keys, key=lambda key: _STAGE_RANK[key[0]])  # stable: forward order within a stage


@dataclass(frozen=True)
class FaceRecognition:
    """The insightface recognition network an adapter's face mapper was trained on; in a file's
    metadata under RECOGNITION_MODEL_KEY / RECOGNITION_PACK_KEY; a file without them means buffalo_l."""

    model: str  # the network, by its .onnx file's name: w600k_r50, glintr100
    pack: str = ""  # the insightface pack that ships it: buffalo_l, antelopev2

    def __str__(self) -> str:
        return f"{self.model} (insightface {self.pack})" if self.pack else self.model


# h94/IP-Adapter-FaceID's model card: FaceAnalysis(name="buffalo_l"), whose recogniser is w600k_r50.
FACEID_RECOGNITION = FaceRecognition("w600k_r50", "buffalo_l")


# --- the adapter --------------------------------------------------------------------------------

class IDAdapter:
    """A loaded FaceID-PlusV2-format adapter: the projection and per-layer image K/V weights."""

    def __init__(self, kind: str, projection: FaceIDPlusProjection,
                 kv_weights: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]],
                 lora: dict[str, torch.Tensor] | None = None, source: str = "",
                 face_recognition: FaceRecognition = FACEID_RECOGNITION) -> None:
        self.kind = kind
        self.projection = projection
        self.kv_weights = kv_weights
        self.lora = dict(lora or {})  # FaceID's LoRA in the file's own keys (without the prefix)
        self.source = source
        self.face_recognition = face_recognition  # whose embeddings the face mapper reads
        # A separately released LoRA file (``*_lora.safetensors``), used where the adapter carries none.
        self.lora_file: dict[str, torch.Tensor] | None = None
        self.lora_file_name = ""
        self.use_file_lora = True  # the LoRA this adapter file carries, if any

    def with_lora(self, state: dict[str, torch.Tensor] | None, name: str) -> IDAdapter:
        """A copy whose identity stream uses ``state`` (a separate LoRA file) instead of the LoRA the
        adapter file carries; ``state`` None: no LoRA at all. The file's own tensors are kept (saved)."""
        twin = IDAdapter(self.kind, self.projection, self.kv_weights, self.lora, self.source, self.face_recognition)
        twin.lora_file, twin.lora_file_name, twin.use_file_lora = state, name, False
        return twin

    def faceid_lora(self, model=None, scale: float = 1.0):
        """The FaceID LoRA for the identity rows (attention.infinite_id.faceid_lora.FaceIDLoRA), or None.
        A separate LoRA file is placed on ``model``'s layers through ComfyUI's key map."""
        from . import faceid_lora

        if self.use_file_lora and self.lora:
            return faceid_lora.from_adapter_file(self.lora, FILE_LAYOUTS[self.kind], scale, self.source)
        if self.lora_file is not None:
            if model is None:
                raise ValueError("a separate LoRA file needs the model it is placed on")
            return faceid_lora.from_lora_file(self.lora_file, model, self.lora_file_name, scale)
        return None

    @property
    def num_tokens(self) -> int:
        return self.projection.shape.num_tokens

    @property
    def cross_attention_dim(self) -> int:
        return self.projection.shape.width

    @property
    def clip_dim(self) -> int:
        return self.projection.shape.clip_dim

    @property
    def layer_count(self) -> int:
        return len(self.kv_weights)

    @property
    def dtype(self) -> torch.dtype:
        return self.projection.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projection.norm.weight.device

    def image_tokens(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
        """(B, num_tokens, cross_attention_dim) from ArcFace (B, 512) and CLIP's penultimate
        hidden states (B, T, clip_dim); ``scale`` is FaceID-PlusV2's s_scale (0 = MLP tokens only)."""
        shape = self.projection.shape
        face_embeds = face_embeds.reshape(-1, face_embeds.shape[-1]) if face_embeds.dim() != 2 else face_embeds
        if face_embeds.shape[-1] != shape.id_dim:
            raise ValueError(f"face embeddings are {face_embeds.shape[-1]} wide; this adapter takes "
                             f"{shape.id_dim} (an ArcFace embedding)")
        if clip_hidden.dim() != 3 or clip_hidden.shape[-1] != shape.clip_dim:
            raise ValueError(f"CLIP hidden states have shape {tuple(clip_hidden.shape)}; this adapter takes "
                             f"(batch, tokens, {shape.clip_dim}): the penultimate hidden states of CLIP ViT-H")
        batch = max(face_embeds.shape[0], clip_hidden.shape[0])
        if {face_embeds.shape[0], clip_hidden.shape[0]} - {1, batch}:
            raise ValueError(f"{face_embeds.shape[0]} face embeddings but {clip_hidden.shape[0]} CLIP images; "
                             "give as many of each (or one of either)")
        face_embeds = face_embeds.to(self.device, self.dtype).expand(batch, -1)
        clip_hidden = clip_hidden.to(self.device, self.dtype).expand(batch, -1, -1)
        return self.projection(face_embeds, clip_hidden, scale)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IDAdapter:
        """A copy on ``device`` in ``dtype``; this one stays as it is (ComfyUI may hand it to other nodes).
        Always a copy, also where device and dtype are already these: a trainer changes the copy's
        tensors in place, and tensors the server loaded under inference mode cannot be trained."""
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=True)

        projection = _empty_projection(self.projection.shape)
        projection.load_state_dict({k: move(v) for k, v in self.projection.state_dict().items()}, assign=True)
        moved = IDAdapter(self.kind, projection, {key: (move(k), move(v)) for key, (k, v) in self.kv_weights.items()},
                          {key: move(value) for key, value in self.lora.items()}, self.source, self.face_recognition)
        moved.lora_file, moved.lora_file_name, moved.use_file_lora = (self.lora_file, self.lora_file_name,
                                                                       self.use_file_lora)
        return moved

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the file's keys (``image_proj.…``, ``ip_adapter.…``)."""
        tensors = {IMAGE_PROJ + key: value for key, value in self.projection.state_dict().items()}
        for n, key in enumerate(FILE_LAYOUTS[self.kind]):
            w_k, w_v = self.kv_weights[key]
            tensors[f"{IP_ADAPTER}{2 * n + 1}.to_k_ip.weight"] = w_k
            tensors[f"{IP_ADAPTER}{2 * n + 1}.to_v_ip.weight"] = w_v
        tensors.update({IP_ADAPTER + key: value for key, value in self.lora.items()})
        return tensors


def _empty_projection(shape: ProjectionShape) -> FaceIDPlusProjection:
    # On the meta device: no memory and no random init for weights the file replaces anyway.
    with torch.device("meta"):
        return FaceIDPlusProjection(shape)


# --- reading and writing files ------------------------------------------------------------------

def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _listing(keys: set[str], first: int = 5) -> str:
    ordered = sorted(keys, key=_natural)
    more = f" … and {len(ordered) - first} more" if len(ordered) > first else ""
    return ", ".join(ordered[:first]) + more


def _refuse(name: str, missing: set[str], unexpected: set[str], expected: str) -> ValueError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    return ValueError(f"{name} is not a complete IP-Adapter FaceID-PlusV2 file ({expected}): {'; '.join(parts)}. "
                      "Expected ip-adapter-faceid-plusv2_sd15 or _sdxl (.bin or .safetensors) from "
                      "h94/IP-Adapter-FaceID, or a file saved by Likeness")


def read_sections(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The ``image_proj`` and ``ip_adapter`` sections of a .safetensors or .bin file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"{path.name} could not be read as safetensors ({error}); the file may be "
                             "truncated: download it again") from error
        image_proj = {k[len(IMAGE_PROJ):]: v for k, v in flat.items() if k.startswith(IMAGE_PROJ)}
        ip_adapter = {k[len(IP_ADAPTER):]: v for k, v in flat.items() if k.startswith(IP_ADAPTER)}
        stray = {k for k in flat if not k.startswith((IMAGE_PROJ, IP_ADAPTER))}
        if stray:
            raise _refuse(path.name, set(), stray, "every key starts with image_proj. or ip_adapter.")
        return image_proj, ip_adapter
    if path.suffix.lower() in (".bin", ".pt", ".pth"):
        try:
            # Only tensors and plain containers: a pickle that wants to run code is refused.
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path.name} could not be loaded as a weights-only torch file ({error}); "
                             "it may be truncated or hold more than tensors") from error
        if not (isinstance(loaded, dict) and isinstance(loaded.get("image_proj"), dict)
                and isinstance(loaded.get("ip_adapter"), dict)):
            found = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
            raise ValueError(f"{path.name} holds {found}; an IP-Adapter .bin holds a dict with 'image_proj' "
                             "and 'ip_adapter' state dicts")
        return dict(loaded["image_proj"]), dict(loaded["ip_adapter"])
    raise ValueError(f"{path.name}: expected a .safetensors or .bin IP-Adapter file")


def _projection_shape(name: str, image_proj: dict[str, torch.Tensor]) -> ProjectionShape:
    needed = ("norm.weight", "proj.0.weight", "proj.2.weight", "perceiver_resampler.proj_in.weight",
              "perceiver_resampler.layers.0.0.to_q.weight", "perceiver_resampler.layers.0.1.1.weight")
    missing = {IMAGE_PROJ + key for key in needed if key not in image_proj}
    if missing:
        raise _refuse(name, missing, set(), "an image_proj with an MLP and a perceiver resampler")
    width = image_proj["norm.weight"].shape[0]
    hidden, id_dim = image_proj["proj.0.weight"].shape
    if image_proj["proj.2.weight"].shape[0] % width:
        raise ValueError(f"{name}: image_proj.proj.2.weight has {image_proj['proj.2.weight'].shape[0]} rows, "
                         f"not a whole number of {width}-wide tokens")
    depth = 1 + max(int(match.group(1)) for key in image_proj
                    if (match := re.match(r"perceiver_resampler\.layers\.(\d+)\.", key)))
    return ProjectionShape(
        id_dim=id_dim, hidden=hidden, num_tokens=image_proj["proj.2.weight"].shape[0] // width, width=width,
        clip_dim=image_proj["perceiver_resampler.proj_in.weight"].shape[1], depth=depth,
        inner=image_proj["perceiver_resampler.layers.0.0.to_q.weight"].shape[0],
        ff_inner=image_proj["perceiver_resampler.layers.0.1.1.weight"].shape[0])


def _expected_ip_keys(kind: str, lora: bool) -> set[str]:
    count = len(FILE_LAYOUTS[kind])
    keys = {f"{2 * n + 1}.to_{which}_ip.weight" for n in range(count) for which in "kv"}
    if lora:  # FaceID's LoRA is all there (every processor, attn1 and attn2) or not at all
        keys |= {f"{i}.{part}" for i in range(2 * count) for part in LORA_PARTS}
    return keys


def build_id_adapter(image_proj: dict[str, torch.Tensor], ip_adapter: dict[str, torch.Tensor],
                     name: str = "the adapter") -> IDAdapter:
    """Strictly check both sections against the FaceID-PlusV2 layout and build the adapter."""
    shape = _projection_shape(name, image_proj)
    projection = _empty_projection(shape)

    if not any(_IP_KEY.match(key) for key in ip_adapter):
        raise _refuse(name, {IP_ADAPTER + "1.to_k_ip.weight", IP_ADAPTER + "1.to_v_ip.weight"}, set(),
                      "image key/value projections N.to_k_ip/N.to_v_ip")
    has_lora = any(_LORA_KEY.match(key) for key in ip_adapter)
    # SD1.5 or SDXL: the layout the file's keys differ least from, so a damaged file is
    # reported against the layout it was meant to have.
    kind = min(FILE_LAYOUTS, key=lambda k: len(_expected_ip_keys(k, has_lora) ^ ip_adapter.keys()))
    layout = FILE_LAYOUTS[kind]
    expected_ip = _expected_ip_keys(kind, has_lora)

    missing = ({IMAGE_PROJ + k for k in projection.state_dict().keys() - image_proj.keys()}
               | {IP_ADAPTER + k for k in expected_ip - ip_adapter.keys()})
    unexpected = ({IMAGE_PROJ + k for k in image_proj.keys() - projection.state_dict().keys()}
                  | {IP_ADAPTER + k for k in ip_adapter.keys() - expected_ip})
    if missing or unexpected:
        raise _refuse(name, missing, unexpected, f"{KIND_NAMES[kind]} layout, {len(layout)} image "
                      "cross-attention layers")
    try:
        projection.load_state_dict(image_proj, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{name}: image_proj tensors do not fit one FaceID-PlusV2 projection: {error}") from error

    kv_weights = {}
    for n, key in enumerate(layout):
        w_k, w_v = ip_adapter[f"{2 * n + 1}.to_k_ip.weight"], ip_adapter[f"{2 * n + 1}.to_v_ip.weight"]
        if w_k.dim() != 2 or w_k.shape[1] != shape.width or w_v.shape != w_k.shape:
            raise ValueError(f"{name}: ip_adapter.{2 * n + 1}.to_k_ip/to_v_ip have shapes {tuple(w_k.shape)} and "
                             f"{tuple(w_v.shape)}; expected (layer width, {shape.width}) for both")
        kv_weights[key] = (w_k, w_v)
    lora = {key: value for key, value in ip_adapter.items() if _LORA_KEY.match(key)}
    return IDAdapter(kind, projection, kv_weights, lora, source=name)


def read_face_recognition(path: str | Path) -> FaceRecognition:
    """The recognition network a file records (safetensors metadata); FaceID's own (buffalo_l) where
    it records none, as h94's files and every .bin."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return FACEID_RECOGNITION
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata() or {}
    if not metadata.get(RECOGNITION_MODEL_KEY):
        return FACEID_RECOGNITION
    return FaceRecognition(metadata[RECOGNITION_MODEL_KEY], metadata.get(RECOGNITION_PACK_KEY, ""))


def load_id_adapter(path: str | Path) -> IDAdapter:
    """Load an IP-Adapter FaceID-PlusV2 file (SD1.5 or SDXL); a wrong or incomplete file is a ValueError."""
    image_proj, ip_adapter = read_sections(path)
    adapter = build_id_adapter(image_proj, ip_adapter, Path(path).name)
    adapter.face_recognition = read_face_recognition(path)
    return adapter


def save_id_adapter(adapter: IDAdapter, path: str | Path) -> None:
    """Write the adapter as safetensors in the FaceID-PlusV2 layout (loads back with load_id_adapter),
    with the recognition network it reads in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in adapter.state_dict().items()}
    metadata = {"format": "pt", "likeness_id_adapter": adapter.kind,
                RECOGNITION_MODEL_KEY: adapter.face_recognition.model,
                RECOGNITION_PACK_KEY: adapter.face_recognition.pack}
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)
