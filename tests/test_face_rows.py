"""Face Fusion's face rows inside the image's own model call (issue 21): the same picture as a
separate face call, one UNet call per step, ComfyUI's memory estimate counting the extra rows."""

from __future__ import annotations

import logging

import pytest
import torch

from harness import ipadapter_like
from harness.face_spies import UNetCalls, face_latent, fuse
from harness.other_wrappers import with_a_per_row_input
from harness.sampling import txt2img_latent

STEPS = 3


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def face_pass_module(comfy):
    return comfy.pack("attention.face_fusion.face_pass")


def both_paths(comfy, monkeypatch, make_model, clip, **sampling) -> tuple[torch.Tensor, torch.Tensor, UNetCalls]:
    """The final latent with the face rows batched (the default) and with a separate face call,
    and a spy on the batched run."""
    face_pass = face_pass_module(comfy)
    model = make_model()
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(
        monkeypatch, model)
    batched = txt2img_latent(comfy, model, clip, steps=STEPS, **sampling)
    recorded, unet_calls = list(spy.calls), spy.unet_calls
    monkeypatch.setattr(face_pass, "BATCH_FACE_ROWS", False)
    separate = txt2img_latent(comfy, make_model(), clip, steps=STEPS, **sampling)
    monkeypatch.setattr(face_pass, "BATCH_FACE_ROWS", True)
    spy.calls, spy.unet_calls = recorded, unet_calls  # what the batched run did
    return batched, separate, spy


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def left_and_right(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    left, right = torch.zeros(size, size), torch.zeros(size, size)
    left[:, :36], right[:, 28:] = 1.0, 1.0
    return left, right


CASES = {
    "one reference": lambda comfy, model: fuse(comfy, model, face_latent()),
    "two references": lambda comfy, model: fuse(comfy, model, face_latent(count=2)),
    "weight 0.5": lambda comfy, model: fuse(comfy, model, face_latent(), weight=0.5),
    "two people in masks": lambda comfy, model: fuse(
        comfy, fuse(comfy, model, face_latent(seed=1), mask=left_and_right()[0], weight=0.5),
        face_latent(seed=2), mask=left_and_right()[1], weight=2.0),
    "uncond off, clean face": lambda comfy, model: fuse(comfy, model, face_latent(), uncond=False,
                                                        face_noise="clean"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_face_rows_give_the_separate_calls_picture_in_one_call_per_step(comfy, family, monkeypatch, case):
    name, model, clip = family
    batched, separate, spy = both_paths(comfy, monkeypatch, lambda: CASES[case](comfy, model), clip)
    assert relative(batched, separate) < 1e-5, (name, case)
    # cond and uncond in one call, the face rows with them: one UNet call per step (two with a face call).
    assert spy.unet_calls == STEPS, spy.unet_calls
    assert relative(batched, txt2img_latent(comfy, model, clip, steps=STEPS)) > 1e-2, "the face must act"


@pytest.mark.parametrize("references", [1, 2])
def test_when_comfyui_splits_cond_and_uncond_each_call_carries_the_face_rows(comfy, family, monkeypatch,
                                                                            references):
    """memory_required forcing one cond/uncond chunk per call, with room for the face rows: two
    calls per step, each batched, the same picture as separate face calls."""
    name, model, clip = family
    monkeypatch.setattr(model.model, "memory_required",
                        lambda shape, cond_shapes={}: float("inf") if shape[0] > 1 + references else 0.0)
    batched, separate, spy = both_paths(comfy, monkeypatch,
                                        lambda: fuse(comfy, model, face_latent(count=references)), clip)
    assert relative(batched, separate) < 1e-5, name
    assert spy.unet_calls == 2 * STEPS
    assert sorted(c["cond_or_uncond"] for c in spy.images[:2]) == [[0], [1]]
    assert all(c["face"] for c in spy.calls[::2]), "each image call carries its face rows"


def test_beside_another_packs_attention_patch_the_paths_agree(comfy, family, monkeypatch):
    name, model, clip = family
    layers = comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))

    def patched():
        return fuse(comfy, ipadapter_like.apply(model, keys, two_part=name == "sd15", weight=0.7), face_latent(),
                    weight=0.5)

    batched, separate, spy = both_paths(comfy, monkeypatch, patched, clip)
    assert relative(batched, separate) < 1e-5
    assert spy.unet_calls == STEPS


def test_comfyuis_memory_estimates_count_the_face_rows(comfy, tiny_checkpoints, monkeypatch):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    asked = []
    real = model.model.memory_required

    def recording(shape, cond_shapes={}):
        asked.append(int(shape[0]))
        return real(shape, cond_shapes=cond_shapes)

    monkeypatch.setattr(model.model, "memory_required", recording)
    txt2img_latent(comfy, fuse(comfy, model, face_latent(count=2)), clip, steps=1)
    # The estimate before loading asks for 2 rows (cond + uncond) and 1 (the smallest call); each
    # step's sizing asks for the 2 rows of one call: each with the 2 face rows added.
    assert sorted(set(asked)) == [3, 4], asked
    asked.clear()
    txt2img_latent(comfy, model, clip, steps=1)
    assert sorted(set(asked)) == [1, 2], "the unpatched model's estimates are its own"


def test_references_of_another_size_take_a_separate_call_and_the_log_says_so_once(comfy, tiny_checkpoints,
                                                                                 monkeypatch, caplog):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    fused = fuse(comfy, model, face_latent(size=6))
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    with caplog.at_level(logging.INFO, logger="likeness"):
        txt2img_latent(comfy, fused, clip, steps=STEPS)
    assert spy.unet_calls == 2 * STEPS and len(spy.faces) == STEPS
    said = [r.getMessage() for r in caplog.records if "Face Fusion" in r.getMessage()]
    assert said == ["Likeness Face Fusion: a separate face call each step (references of another size than the "
                    "image)"], said


def test_beside_ffa_the_face_pass_stays_a_call_of_its_own(comfy, tiny_checkpoints, monkeypatch, caplog):
    """FFA acts on whole image calls: with it on the model, the faces keep their own call."""
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from harness.sampling import encode

    _, bank = comfy.run_node("LikenessInvert", model=model, conditioning=encode(comfy, clip, ""),
                             latent={"samples": latents}, steps=STEPS, capture="qkv", layers="all",
                             cache_on="device")
    (ffa,) = comfy.run_node("LikenessFeatureFusionAttention", model=model, content=bank.select(0, 1),
                            style=bank.select(1, 1), alpha=0.8, beta=0.2, temperature=1.0, layers="all",
                            style_index=0, start_percent=0.0, end_percent=1.0)
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    with caplog.at_level(logging.INFO, logger="likeness"):
        comfy.run_node("KSamplerAdvanced", model=fuse(comfy, ffa, face_latent()), add_noise="disable", noise_seed=0,
                       steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="ddim_uniform",
                       positive=encode(comfy, clip, "a portrait"), negative=encode(comfy, clip, ""),
                       latent_image={"samples": latents[:1]}, start_at_step=0, end_at_step=10000,
                       return_with_leftover_noise="disable")
    assert spy.unet_calls == 2 * STEPS
    assert any("another Likeness patch acts in the same call (FFAProcessor)" in r.getMessage()
               for r in caplog.records)


def test_with_a_controlnet_the_face_rows_get_no_control_and_the_paths_agree(comfy, tiny_checkpoints, base_directory,
                                                                            monkeypatch):
    """ControlNet residuals are the image rows'; the face rows get zeros, as a separate face call
    gets no control."""
    from harness.sampling import controlled_sampler

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    sample = controlled_sampler(comfy, clip, base_directory / "models" / "controlnet", steps=STEPS)

    face_pass = face_pass_module(comfy)
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    batched = sample(fuse(comfy, model, face_latent()))
    assert spy.unet_calls == STEPS
    monkeypatch.setattr(face_pass, "BATCH_FACE_ROWS", False)
    separate = sample(fuse(comfy, model, face_latent()))
    assert relative(batched, separate) < 1e-5
    assert relative(batched, sample(model)) > 1e-2
    unpatched_uncontrolled = txt2img_latent(comfy, model, clip, steps=STEPS)
    assert relative(sample(model), unpatched_uncontrolled) > 1e-2, "the ControlNet must act"


def test_a_call_with_per_row_inputs_takes_a_separate_face_call_and_the_picture_is_the_same(
        comfy, tiny_checkpoints, monkeypatch, caplog):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    spy = UNetCalls(comfy.pack("attention.face_fusion.face_kv_attention").FACE_PASS).install(monkeypatch, model)
    batched = txt2img_latent(comfy, fuse(comfy, model, face_latent(), weight=0.5), clip, steps=STEPS)
    assert spy.unet_calls == STEPS
    spy.unet_calls = 0
    with caplog.at_level(logging.INFO, logger="likeness"):
        separate = txt2img_latent(comfy, fuse(comfy, with_a_per_row_input(model), face_latent(), weight=0.5), clip,
                                  steps=STEPS)
    assert spy.unet_calls == 2 * STEPS
    assert any("a separate face call each step (the model call has per-row inputs of its own)" in r.getMessage()
               for r in caplog.records)
    assert relative(batched, separate) < 1e-5
