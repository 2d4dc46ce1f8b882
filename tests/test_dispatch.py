"""The patch dispatcher on the real host: clone-only, chaining, keys, rows."""

from __future__ import annotations

import pytest
import torch

from harness.sampling import encode, txt2img_latent


# One patched layer of sixteen moves the sampled latent by 0.1-1% of its largest value; batch-size
# rounding moves it by ~1e-5 of it. A floor of 1e-3 sits a hundred times above the rounding.
ONE_LAYER = 1e-3


def differs(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-2) -> bool:
    """a and b differ by more than ``floor`` of b's largest value: far above batch-size rounding."""
    return bool((a - b).abs().max() > floor * b.abs().max())


class Recorder:
    """A processor that records what it sees and leaves the result alone."""

    order = 100

    def __init__(self, log: list):
        self.log = log

    def __call__(self, q, k, v, extra_options, attend):
        self.log.append({"block": extra_options["block"], "index": extra_options["block_index"],
                         "cond_or_uncond": list(extra_options["cond_or_uncond"]), "batch": q.shape[0]})
        return attend(q, k, v, extra_options)


class ScaleQuery:
    """A processor that changes what the layer computes."""

    order = 100

    def __init__(self, factor: float, tag: str | None = None, log: list | None = None):
        self.factor, self.tag, self.log = factor, tag, log

    def __call__(self, q, k, v, extra_options, attend):
        if self.log is not None:
            self.log.append(self.tag)
        return attend(q * self.factor, k, v, extra_options)


@pytest.fixture(scope="module")
def sd15(comfy, tiny_checkpoints):
    return comfy.load_checkpoint(tiny_checkpoints["sd15"])


@pytest.fixture(scope="module")
def sdxl(comfy, tiny_checkpoints):
    return comfy.load_checkpoint(tiny_checkpoints["sdxl"])


def all_placements(comfy, model, processor_for):
    layers = comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    return [(kind, key, processor_for(kind, key)) for kind in ("attn1", "attn2") for key in keys]


SD15_KEYS = ([("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
             + [("output", n, 0) for n in range(3, 12)])


def test_sd15_keys_reached_are_exactly_the_sixteen(comfy, sd15):
    model, clip, _ = sd15
    dispatch = comfy.pack("attention.shared.dispatch")
    seen = []
    patched = dispatch.patched_clone(model, all_placements(comfy, model, lambda kind, key: Recorder(seen)))
    txt2img_latent(comfy, patched, clip, steps=1)
    reached = {(s["block"][0], s["block"][1], s["index"]) for s in seen}
    assert sorted(reached) == sorted(SD15_KEYS)
    assert len(seen) == 2 * len(SD15_KEYS)  # attn1 and attn2 once each for the one cond+uncond call


def test_sdxl_all_seventy_keys_reached(comfy, sdxl):
    model, clip, _ = sdxl
    dispatch, layers = comfy.pack("attention.shared.dispatch"), comfy.pack("attention.shared.layer_table")
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    assert len(keys) == 70
    seen = []
    patched = dispatch.patched_clone(model, all_placements(comfy, model, lambda kind, key: Recorder(seen)))
    txt2img_latent(comfy, patched, clip, steps=1)
    reached = {(s["block"][0], s["block"][1], s["index"]) for s in seen}
    assert reached == set(keys)
    assert {k[0] for k in keys} == {"input", "middle", "output"}


def test_patched_run_leaves_the_input_model_bit_identical(comfy, sd15):
    model, clip, _ = sd15
    dispatch = comfy.pack("attention.shared.dispatch")
    before = txt2img_latent(comfy, model, clip)
    patched = dispatch.patched_clone(model, all_placements(comfy, model, lambda kind, key: ScaleQuery(1.7)))
    changed = txt2img_latent(comfy, patched, clip)
    after = txt2img_latent(comfy, model, clip)
    assert differs(changed, before), "the processor must change the output for this test to mean anything"
    assert torch.equal(before, after)
    assert not list(dispatch.dispatchers(model)), "the input MODEL must not carry a dispatcher"


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
@pytest.mark.parametrize("foreign_key_parts", [2, 3])
def test_foreign_replace_patch_still_runs_and_contributes(comfy, sd15, kind, foreign_key_parts):
    model, clip, _ = sd15
    dispatch = comfy.pack("attention.shared.dispatch")
    key = ("output", 5, 0)
    calls = []

    def foreign(q, k, v, extra_options):  # another pack's patch: halves the attention output
        calls.append(extra_options["block"])
        return dispatch.default_attention(q, k, v, extra_options) * 0.5

    with_foreign = model.clone()
    with_foreign.set_model_patch_replace(foreign, kind, *key[:foreign_key_parts])
    plain = txt2img_latent(comfy, model, clip)
    foreign_only = txt2img_latent(comfy, with_foreign, clip)
    assert calls and differs(foreign_only, plain, ONE_LAYER)

    calls.clear()
    passthrough = dispatch.patched_clone(with_foreign, [(kind, key, Recorder([]))])
    assert torch.equal(txt2img_latent(comfy, passthrough, clip), foreign_only)
    assert calls, "the foreign patch must run inside the dispatcher"

    calls.clear()
    both = dispatch.patched_clone(with_foreign, [(kind, key, ScaleQuery(2.0))])
    both_out = txt2img_latent(comfy, both, clip)
    assert calls
    assert differs(both_out, foreign_only, ONE_LAYER)
    ours_only = txt2img_latent(comfy, dispatch.patched_clone(model, [(kind, key, ScaleQuery(2.0))]), clip)
    assert differs(both_out, ours_only, ONE_LAYER), "the foreign patch must still contribute"


def test_likeness_processors_compose_in_order(comfy, sd15):
    model, clip, _ = sd15
    dispatch = comfy.pack("attention.shared.dispatch")
    order_log = []
    key = ("middle", 0, 0)
    late, early = ScaleQuery(1.0, "late", order_log), ScaleQuery(1.0, "early", order_log)
    late.order, early.order = 200, 10
    first = dispatch.patched_clone(model, [("attn1", key, late)])
    second = dispatch.patched_clone(first, [("attn1", key, early)])
    txt2img_latent(comfy, second, clip, steps=1, cfg=1.0)
    assert order_log == ["early", "late"]
    # Adding to the second clone left the first one's dispatcher alone.
    (first_dispatcher,) = list(dispatch.dispatchers(first))
    assert [p.tag for p in first_dispatcher.processors] == ["late"]


class ContextRows:
    """An attn2_patch seeing the raw text context of each row."""

    def __init__(self):
        self.calls = []

    def __call__(self, n, context, value, extra_options):
        self.calls.append((list(extra_options["cond_or_uncond"]), context.clone()))
        return n, context, value


@pytest.mark.parametrize("mode", ["cfg1_cond_only", "one_call", "separate_calls"])
def test_row_helpers_pick_cond_and_uncond_rows(comfy, sd15, monkeypatch, mode):
    model, clip, _ = sd15
    rows = comfy.pack("attention.shared.rows")
    positive, negative = encode(comfy, clip, "a portrait photo"), encode(comfy, clip, "blurry")
    cond_context, uncond_context = positive[0][0][0], negative[0][0][0]
    recorder = ContextRows()
    recording = model.clone()
    recording.set_model_attn2_patch(recorder)
    if mode == "separate_calls":
        # What ComfyUI does when cond and uncond together do not fit in memory.
        monkeypatch.setattr(model.model, "memory_required", lambda *a, **k: float("inf"))
    cfg = 1.0 if mode == "cfg1_cond_only" else 5.0
    txt2img_latent(comfy, recording, clip, cfg=cfg, steps=1, batch=2)

    layouts = {tuple(c) for c, _ in recorder.calls}
    expected = {"cfg1_cond_only": {(0,)}, "one_call": {(1, 0), (0, 1)}, "separate_calls": {(0,), (1,)}}[mode]
    assert layouts <= expected and layouts, layouts
    if mode == "separate_calls":
        assert layouts == {(0,), (1,)}
    for cond_or_uncond, context in recorder.calls:
        batch = context.shape[0]
        cond_rows = rows.rows_of(rows.COND, cond_or_uncond, batch)
        uncond_rows = rows.rows_of(rows.UNCOND, cond_or_uncond, batch)
        assert sorted(cond_rows + uncond_rows) == list(range(batch))
        for row in cond_rows:
            assert torch.equal(context[row], cond_context.to(context))
        for row in uncond_rows:
            assert torch.equal(context[row], uncond_context.to(context))
        assert rows.sample_index(cond_or_uncond, batch) == [r % 2 for r in range(batch)]


class WithRunState(Recorder):
    """A processor with per-run state that must be freed when sampling ends."""

    def __init__(self):
        super().__init__([])
        self.cleanups = 0

    def cleanup(self):
        self.cleanups += 1


def test_per_run_state_is_freed_once_when_sampling_ends(comfy, sd15):
    model, clip, _ = sd15
    dispatch = comfy.pack("attention.shared.dispatch")
    first, second = WithRunState(), WithRunState()
    patched = dispatch.patched_clone(model, [("attn1", ("middle", 0, 0), first)])
    patched = dispatch.patched_clone(patched, [("attn2", ("middle", 0, 0), second)])
    txt2img_latent(comfy, patched, clip, steps=2)
    assert (first.cleanups, second.cleanups) == (1, 1)
    assert first.log and second.log


def test_per_run_state_is_freed_when_sampling_is_interrupted(comfy, sd15, monkeypatch):
    import comfy.model_management as model_management

    model, clip, _ = sd15
    dispatch = comfy.pack("attention.shared.dispatch")
    processor = WithRunState()
    patched = dispatch.patched_clone(model, [("attn1", ("middle", 0, 0), processor)])

    def interrupt(*args, **kwargs):  # ComfyUI checks this in every op: stop once the patch has run
        if processor.log:
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(model_management.InterruptProcessingException):
        txt2img_latent(comfy, patched, clip, steps=3)
    assert processor.log, "the interrupt must come after the patch ran"
    assert processor.cleanups == 1
