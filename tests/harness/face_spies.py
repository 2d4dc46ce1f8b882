"""Spies for the Face Fusion tests: what the real UNet and attention receive.

They record at ComfyUI's own seams (the UNet's ``_forward``, the dispatcher's
innermost attention, forward hooks on the real modules), so a test's expected
values come from the model's weights and ComfyUI, not from the pack's code.
"""

from __future__ import annotations

import torch

TEXT_TOKENS = 77  # CLIP's context length, SD1.5 and SDXL alike


def face_latent(count: int = 1, seed: int = 11, size: int = 8, height: int | None = None) -> dict:
    shape = (count, 4, height or size, size)
    return {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed))}


def fuse(comfy, model, face, **overrides):
    settings = dict(weight=1.0, kv="self-attention to_k/to_v (training-free)", start_percent=0.0,
                    end_percent=1.0, face_noise="noised", noise_seed=0, uncond=True)
    settings.update(overrides)
    return comfy.run_node("LikenessFaceFusion", model=model, face=face, **settings)[0]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


class UNetCalls:
    """Every call of the UNet (``_forward``, inside all DIFFUSION_MODEL wrappers): the face passes
    (their options carry the Face Fusion pass marker) and the image's own calls. A call that carries
    the face rows beside the image's (its options say where the image rows end) is recorded as what
    it holds: the face rows, then the image rows, each with its own x, timesteps, context and y."""

    FACE_ROWS = "likeness_face_rows"

    def __init__(self, face_pass_key: str):
        self.face_pass_key = face_pass_key
        self.calls: list[dict] = []
        self.unet_calls = 0  # calls of the UNet itself, however many parts each held

    def _record(self, face, x, timesteps, context, y, sigmas, cond_or_uncond, options):
        self.calls.append({
            "face": face, "x": x.detach().clone(), "timesteps": timesteps.detach().clone(),
            "context": context.detach().clone(), "y": None if y is None else y.detach().clone(),
            "sigma": None if sigmas is None else float(sigmas.flatten()[0]),
            "cond_or_uncond": list(cond_or_uncond), "options": options})

    def install(self, monkeypatch, model) -> "UNetCalls":
        unet = model.model.diffusion_model
        original = unet._forward

        def recording(x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
            self.unet_calls += 1
            sigmas = transformer_options.get("sigmas")
            options = dict(transformer_options)
            rows = transformer_options.get(self.FACE_ROWS)
            if rows is None:
                self._record(self.face_pass_key in transformer_options, x, timesteps, context, y, sigmas,
                             transformer_options.get("cond_or_uncond", []), options)
            else:
                n = rows.image_rows
                part = lambda t, face: None if t is None else (t[n:] if face else t[:n])  # noqa: E731
                self._record(True, part(x, True), part(timesteps, True), part(context, True), part(y, True),
                             sigmas, ["face rows"], options)
                self._record(False, part(x, False), part(timesteps, False), part(context, False), part(y, False),
                             sigmas, rows.image_chunks, options)
            return original(x, timesteps, context, y, control, transformer_options, **kwargs)

        monkeypatch.setattr(unet, "_forward", recording)
        return self

    @property
    def faces(self) -> list[dict]:
        return [c for c in self.calls if c["face"]]

    @property
    def images(self) -> list[dict]:
        return [c for c in self.calls if not c["face"]]


class AttentionRecorder:
    """Wraps the dispatcher's innermost attention: sees q, k, v, the mask and the output."""

    def __init__(self):
        self.calls: list[dict] = []

    def install(self, monkeypatch, dispatch) -> "AttentionRecorder":
        original = dispatch.default_attention

        def recording(q, k, v, extra_options, mask=None):
            out = original(q, k, v, extra_options, mask)
            key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
            self.calls.append({"key": key, "q": q, "k": k, "v": v, "mask": mask, "out": out,
                               "heads": extra_options["n_heads"], "shape": extra_options["original_shape"],
                               "cond_or_uncond": list(extra_options["cond_or_uncond"])})
            return out

        monkeypatch.setattr(dispatch, "default_attention", recording)
        return self


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)


def softmax_attention(q, k, v, heads: int, bias: torch.Tensor | None = None):
    """softmax(q·kᵀ/√d + bias)·v per head, in float64; (probabilities, output)."""
    qh, kh, vh = (split_heads(t.double(), heads) for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias.double().unsqueeze(1)
    probs = logits.softmax(-1)
    out = probs @ vh
    return probs, out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear layer's map written out from its weight (and bias)."""
    weight = module.weight.detach().double()
    out = x.detach().double() @ weight.T
    return out if module.bias is None else out + module.bias.detach().double()
