"""What IP-Adapter FaceID-PlusV2's model card computes for a photo, computed here through
insightface and IP-Adapter's authors' code (ip-adapterv), never through the pack:

    app = FaceAnalysis(name="buffalo_l"); app.prepare(ctx_id=0, det_size=(640, 640))
    faces = app.get(image)                                   # image: cv2's uint8 BGR
    faceid_embeds = faces[0].normed_embedding
    face_image = face_align.norm_crop(image, landmark=faces[0].kps, image_size=224)

and the pack's side of a model call, for comparing the two."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiny import tiny_faceid, tiny_models

STEP_TIMESTEP = 500.0
INFINITE_ID_WRAPPER = "likeness_infinite_id"


@dataclass(frozen=True)
class CardInputs:
    embedding: torch.Tensor  # (1, 512) faces[0].normed_embedding
    clip_image: torch.Tensor  # (1, 224, 224, 3) the norm_crop, RGB 0..1 (ComfyUI's IMAGE layout)


def model_card_inputs(pack_folder: Path, image_rgb: np.ndarray) -> CardInputs:
    """insightface's own FaceAnalysis on ``pack_folder`` and norm_crop at 224, as the model card runs them."""
    import warnings

    from insightface.app import FaceAnalysis
    from insightface.utils import face_align

    app = FaceAnalysis(name=str(Path(pack_folder).resolve()), root=str(Path(pack_folder).parent.parent),
                       allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    faces = app.get(bgr)
    assert len(faces) == 1, f"{len(faces)} faces found by insightface"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        crop = face_align.norm_crop(bgr, landmark=faces[0].kps, image_size=224)
    return CardInputs(torch.from_numpy(np.asarray(faces[0].normed_embedding, np.float32))[None],
                      torch.from_numpy(np.ascontiguousarray(crop[..., ::-1])).float()[None] / 255)


def write_float32_adapter(path: Path, kind: str, seed: int = 0) -> Path:
    """A tiny FaceID-PlusV2 file in float32 (the released ones are fp16): the pack and the authors'
    code then compute in the same precision, so they agree to 1e-5 rather than fp16's 1e-3."""
    state = {key: value.float() for key, value in tiny_faceid.state_dict(kind, seed).items()}
    path = Path(path)
    return (tiny_faceid.write_bin if path.suffix == ".bin" else tiny_faceid.write_safetensors)(path, state)


def proj_plus_model(kind: str, seed: int = 0):
    """The authors' ProjPlusModel with the tiny file's image_proj weights."""
    from ip_adapter.ip_adapter_faceid import ProjPlusModel

    state = tiny_faceid.state_dict(kind, seed)
    projection = ProjPlusModel(cross_attention_dim=tiny_faceid.KINDS[kind]["context"],
                               id_embeddings_dim=tiny_faceid.ID_DIM, clip_embeddings_dim=tiny_faceid.CLIP_DIM,
                               num_tokens=tiny_faceid.NUM_TOKENS)
    projection.load_state_dict({k[len("image_proj."):]: v.float() for k, v in state.items()
                                if k.startswith("image_proj.")})
    return projection.eval()


def hf_clip_vision(clip_vision):
    """transformers' CLIPVisionModelWithProjection with the tiny tower's weights (what IP-Adapter loads)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    settings = {k: v for k, v in tiny_models.TINY_CLIP_VISION.items() if k != "model_type"}
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**settings)).eval()
    state = {k: v.float() for k, v in clip_vision.get_sd().items()}
    expected = model.state_dict().keys()
    if not any(k.startswith("vision_model.") for k in expected):  # transformers 5 names the tower's keys bare
        state = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    return model


def authors_faceid_plus(clip_vision, kind: str, seed: int = 0):
    """IP-Adapter's IPAdapterFaceIDPlus with the tiny CLIP tower and the tiny file's projection,
    for its get_image_embeds (no UNet, no pipeline: only what that method reads)."""
    from ip_adapter.ip_adapter_faceid import IPAdapterFaceIDPlus
    from transformers import CLIPImageProcessor

    size = tiny_models.TINY_CLIP_VISION["image_size"]
    author = IPAdapterFaceIDPlus.__new__(IPAdapterFaceIDPlus)
    author.device, author.torch_dtype = "cpu", torch.float32
    author.image_encoder = hf_clip_vision(clip_vision)
    author.clip_image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                     crop_size={"height": size, "width": size})
    author.image_proj_model = proj_plus_model(kind, seed)
    return author


class RecordingClipVision:
    """A CLIP_VISION that keeps every image the node encodes and passes everything on."""

    def __init__(self, clip_vision) -> None:
        self._clip_vision = clip_vision
        self.encoded: list[torch.Tensor] = []

    def encode_image(self, image, *args, **kwargs):
        self.encoded.append(image.detach().clone())
        return self._clip_vision.encode_image(image, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._clip_vision, name)


def identities_of(patched) -> list:
    """The InfiniteID settings a patched model runs, one per identity."""
    import comfy.patcher_extension

    (wrapper,) = patched.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, INFINITE_ID_WRAPPER)
    return wrapper.identities


def one_model_call(comfy, model, patched, clip):
    """One batched cond+uncond call of ``patched`` at a mid timestep, as a sampler makes it."""
    from .sampling import encode

    training = comfy.pack("attention.shared.training_loop")
    positive, negative = encode(comfy, clip, "a portrait photo"), encode(comfy, clip, "blurry")
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([STEP_TIMESTEP]))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma
    with torch.no_grad():
        return training.denoised_predictions(model, patched, [positive, negative], noisy, sigma)
