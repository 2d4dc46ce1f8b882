"""Infinite-ID's text and identity streams in one model call (issue 21): the same picture as a
call per stream, one UNet call per step, ComfyUI's memory estimate counting the extra rows."""

from __future__ import annotations

import logging

import pytest
import torch

from harness import ipadapter_like
from harness.face_spies import UNetCalls, face_latent, fuse, relative_difference
from harness.other_wrappers import with_a_per_row_input
from harness.sampling import txt2img_latent
from tiny import tiny_faceid

STEPS = 3
TOKENS = 4


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints, base_directory):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / f"batched_faceid_{request.param}.safetensors",
                             request.param)
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    return request.param, model, clip, adapter.to(dtype=torch.float32)


def modules(comfy):
    return comfy.pack("attention.infinite_id.identity_streams"), comfy.pack("attention.infinite_id.stream_calls")


def identity(comfy, model, adapter, seed: int = 3, lora_scale: float = 1.0, references: int = 1, **settings):
    """An Infinite-ID identity with the tiny adapter's image K/V and FaceID LoRA, seeded tokens and
    "no face" tokens that differ from zero (so the uncond rows' tokens show)."""
    infinite_id, _ = modules(comfy)
    generator = torch.Generator().manual_seed(seed)
    width = adapter.cross_attention_dim
    tokens = torch.randn(1, TOKENS * references, width, generator=generator)
    uncond = torch.randn(1, TOKENS * references, width, generator=generator) * 0.5
    bias = None
    if references > 1:  # stacked references, unequal weights: A.7's log-weight bias
        bias = torch.tensor([0.7] * TOKENS + [0.3] * TOKENS).log()
    return infinite_id.InfiniteID(tokens=tokens, uncond_tokens=uncond, token_bias=bias, kv=adapter.kv_weights,
                                  lora=adapter.faceid_lora(model, lora_scale), **settings)


def with_identities(comfy, model, *identities):
    infinite_id, _ = modules(comfy)
    layers = comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    for settings in identities:
        model = infinite_id.apply_infinite_id(model, settings, keys)
    return model


def both_paths(comfy, monkeypatch, model, make_model, sample) -> tuple[torch.Tensor, torch.Tensor, UNetCalls]:
    """The final latent with the streams in one call (the default) and with a call per stream, and
    a spy on the batched run."""
    _, stream_calls = modules(comfy)
    spy = UNetCalls("likeness_face_pass").install(monkeypatch, model)
    batched = sample(make_model())
    unet_calls = spy.unet_calls
    monkeypatch.setattr(stream_calls, "BATCH_STREAMS", False)
    separate = sample(make_model())
    separate_calls = spy.unet_calls - unet_calls
    monkeypatch.setattr(stream_calls, "BATCH_STREAMS", True)
    spy.unet_calls = unet_calls  # what the batched run did
    spy.separate_calls = separate_calls
    return batched, separate, spy


def halves(height: int = 64, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    left = torch.zeros(height, width)
    left[:, : width * 9 // 16] = 1.0
    right = torch.zeros(height, width)
    right[:, width * 7 // 16:] = 1.0
    return left, right


CASES = {
    "one identity with LoRA": lambda c, m, a: [identity(c, m, a)],
    "weight 0.5": lambda c, m, a: [identity(c, m, a, weight=0.5)],
    "mixed off, merge off, AdaIN on": lambda c, m, a: [
        identity(c, m, a, mixed_attention=False, cross_attention_merge=False, adain_mean=True)],
    "mixed on, merge off, AdaIN on, weight 0.8": lambda c, m, a: [
        identity(c, m, a, cross_attention_merge=False, adain_mean=True, weight=0.8)],
    "two chained identities in masks, stacked references": lambda c, m, a: [
        identity(c, m, a, seed=4, mask=halves()[0], weight=0.7),
        identity(c, m, a, seed=5, mask=halves()[1], weight=1.2, lora_scale=0.5, references=2)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_streams_in_one_call_give_the_separate_calls_picture_in_one_call_per_step(comfy, family, monkeypatch, case):
    name, model, clip, adapter = family
    identities = CASES[case](comfy, model, adapter)
    sample = lambda patched: txt2img_latent(comfy, patched, clip, steps=STEPS)  # noqa: E731
    batched, separate, spy = both_paths(comfy, monkeypatch, model, lambda: with_identities(comfy, model, *identities),
                                        sample)
    assert relative_difference(batched, separate) < 1e-5, (name, case)
    # cond and uncond in one call, every stream's rows with them: one UNet call per step, against
    # one per stream with a call each.
    assert spy.unet_calls == STEPS, spy.unet_calls
    assert spy.separate_calls == (1 + len(identities)) * STEPS, spy.separate_calls
    assert relative_difference(batched, txt2img_latent(comfy, model, clip, steps=STEPS)) > 1e-2, "Infinite-ID must act"


def test_the_identity_rows_really_differ_from_the_text_rows(comfy, family, monkeypatch):
    """A call holding both streams: the identity rows' output is not the text rows' (each block
    computes its own stream), and ε = ε_text + w·(ε_id − ε_text) of the two blocks."""
    import comfy.patcher_extension as extension

    _, model, clip, adapter = family
    patched = with_identities(comfy, model, identity(comfy, model, adapter, weight=0.5))
    seen = []

    def spy(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append((args[5].get("likeness_infinite_id_stream_rows"), out))
        return out

    patched.add_wrapper_with_key(extension.WrappersMP.DIFFUSION_MODEL, "zz_test_spy", spy)
    txt2img_latent(comfy, patched, clip, steps=1)
    (rows, out), = seen
    assert rows is not None and out.shape[0] == 2 * rows.text_rows == 4
    text, identity_rows = out[:2], out[2:]
    assert (identity_rows - text).abs().max() > 1e-2 * text.abs().max()


def test_when_comfyui_splits_cond_and_uncond_each_call_carries_the_identity_rows(comfy, family, monkeypatch):
    """memory_required forcing one cond/uncond chunk per call, with room for its identity rows: two
    calls per step, each holding both streams, the same picture as a call per stream."""
    name, model, clip, adapter = family
    monkeypatch.setattr(model.model, "memory_required",
                        lambda shape, cond_shapes={}: float("inf") if shape[0] > 2 else 0.0)
    settings = identity(comfy, model, adapter, weight=0.8)
    sample = lambda patched: txt2img_latent(comfy, patched, clip, steps=STEPS)  # noqa: E731
    batched, separate, spy = both_paths(comfy, monkeypatch, model, lambda: with_identities(comfy, model, settings),
                                        sample)
    assert relative_difference(batched, separate) < 1e-5, name
    assert spy.unet_calls == 2 * STEPS
    # A call per stream counts no extra rows, so cond and uncond fit in one call there.
    assert spy.separate_calls == 2 * STEPS
    assert sorted(c["cond_or_uncond"] for c in spy.calls[:2]) == [[0, 0], [1, 1]], "one chunk and its identity rows"


def test_beside_another_packs_attention_patch_the_paths_agree(comfy, family, monkeypatch):
    name, model, clip, adapter = family
    layers = comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    settings = identity(comfy, model, adapter, weight=0.8)

    def patched():
        return with_identities(comfy, ipadapter_like.apply(model, keys, two_part=name == "sd15", weight=0.7), settings)

    sample = lambda m: txt2img_latent(comfy, m, clip, steps=STEPS)  # noqa: E731
    batched, separate, spy = both_paths(comfy, monkeypatch, model, patched, sample)
    assert relative_difference(batched, separate) < 1e-5
    assert spy.unet_calls == STEPS
    alone = txt2img_latent(comfy, with_identities(comfy, model, settings), clip, steps=STEPS)
    assert relative_difference(batched, alone) > 1e-2, "the other pack's patch must act"


def test_with_a_controlnet_every_stream_gets_the_control_and_the_paths_agree(comfy, tiny_checkpoints, base_directory,
                                                                            monkeypatch):
    from harness.sampling import controlled_sampler

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "batched_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    settings = identity(comfy, model, adapter.to(dtype=torch.float32))
    sample = controlled_sampler(comfy, clip, base_directory / "models" / "controlnet", steps=STEPS)

    unet = model.model.diffusion_model
    forward, residuals = unet._forward, []

    def counting_residuals(x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        if control is not None:
            residuals.append((x.shape[0], [c.shape[0] for c in control["output"] if c is not None]))
        return forward(x, timesteps, context, y, control, transformer_options, **kwargs)

    monkeypatch.setattr(unet, "_forward", counting_residuals)
    batched, separate, spy = both_paths(comfy, monkeypatch, model, lambda: with_identities(comfy, model, settings),
                                        sample)
    assert spy.unet_calls == STEPS
    assert relative_difference(batched, separate) < 1e-5
    # Every call, batched (4 rows) or each stream's own (2 rows), gets the residuals of all its rows.
    assert len(residuals) == 3 * STEPS and {rows for rows, _ in residuals} == {2, 4}
    assert all(found and set(found) == {rows} for rows, found in residuals), residuals
    uncontrolled = txt2img_latent(comfy, with_identities(comfy, model, settings), clip, steps=STEPS)
    assert relative_difference(batched, uncontrolled) > 1e-2, "the ControlNet must act"


def test_comfyuis_memory_estimates_count_the_identity_rows(comfy, family, monkeypatch):
    _, model, clip, adapter = family
    asked = []
    real = model.model.memory_required

    def recording(shape, cond_shapes={}):
        asked.append(int(shape[0]))
        return real(shape, cond_shapes=cond_shapes)

    monkeypatch.setattr(model.model, "memory_required", recording)
    txt2img_latent(comfy, with_identities(comfy, model, identity(comfy, model, adapter)), clip, steps=1)
    # The estimate before loading asks for 2 rows (cond + uncond) and 1 (the smallest call); each
    # step's sizing asks for the 2 rows of one call: each doubled by the identity stream's rows.
    assert sorted(set(asked)) == [2, 4], asked
    asked.clear()
    txt2img_latent(comfy, model, clip, steps=1)
    assert sorted(set(asked)) == [1, 2], "the unpatched model's estimates are its own"


def test_beside_face_fusion_each_stream_keeps_a_call_and_the_log_says_so_once(comfy, family, monkeypatch, caplog):
    _, model, clip, adapter = family
    both = fuse(comfy, with_identities(comfy, model, identity(comfy, model, adapter)), face_latent())
    spy = UNetCalls("likeness_face_pass").install(monkeypatch, model)
    with caplog.at_level(logging.INFO, logger="likeness"):
        txt2img_latent(comfy, both, clip, steps=STEPS)
    # A face call, then the text stream's and the identity stream's, each step.
    assert spy.unet_calls == 3 * STEPS, spy.unet_calls
    said = [r.getMessage() for r in caplog.records if "Infinite-ID" in r.getMessage()]
    assert said == ["Likeness Infinite-ID: a model call per stream (another Likeness patch acts in the same call "
                    "(FaceFusionProcessor))"], said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="likeness"):
        txt2img_latent(comfy, with_identities(comfy, model, identity(comfy, model, adapter)), clip, steps=STEPS)
    said = [r.getMessage() for r in caplog.records if "Infinite-ID" in r.getMessage()]
    assert said == ["Likeness Infinite-ID: the text and identity streams share one model call"], said


def test_where_even_one_chunk_with_its_identity_rows_would_not_fit_each_stream_keeps_a_call(comfy, tiny_checkpoints,
                                                                                           base_directory, monkeypatch,
                                                                                           caplog):
    """memory_required refusing anything above one row: ComfyUI calls each chunk alone, and those
    calls take a call per stream (2 chunks x 2 streams per step), saying why once."""
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    path = tiny_faceid.write(base_directory / "models" / "ipadapter" / "batched_faceid_sd15.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=path.name)
    monkeypatch.setattr(model.model, "memory_required",
                        lambda shape, cond_shapes={}: float("inf") if shape[0] > 1 else 0.0)
    patched = with_identities(comfy, model, identity(comfy, model, adapter.to(dtype=torch.float32)))
    spy = UNetCalls("likeness_face_pass").install(monkeypatch, model)
    with caplog.at_level(logging.INFO, logger="likeness"):
        txt2img_latent(comfy, patched, clip, steps=STEPS)
    assert spy.unet_calls == 4 * STEPS and all(c["x"].shape[0] == 1 for c in spy.calls)
    said = [r.getMessage() for r in caplog.records if "Infinite-ID" in r.getMessage()]
    assert said == ["Likeness Infinite-ID: a model call per stream (the larger batch would not fit in free memory)"]


def test_a_call_with_per_row_inputs_keeps_a_call_per_stream_and_the_picture_is_the_same(comfy, family, monkeypatch,
                                                                                        caplog):
    _, model, clip, adapter = family
    settings = identity(comfy, model, adapter, weight=0.5)
    spy = UNetCalls("likeness_face_pass").install(monkeypatch, model)
    batched = txt2img_latent(comfy, with_identities(comfy, model, settings), clip, steps=STEPS)
    assert spy.unet_calls == STEPS
    spy.unet_calls = 0
    with caplog.at_level(logging.INFO, logger="likeness"):
        separate = txt2img_latent(comfy, with_identities(comfy, with_a_per_row_input(model), settings), clip,
                                  steps=STEPS)
    assert spy.unet_calls == 2 * STEPS  # the text stream's call and the identity stream's, each step
    assert any("a model call per stream (the model call has per-row inputs of its own)" in r.getMessage()
               for r in caplog.records)
    assert relative_difference(separate, batched) < 1e-5
