"""Face Fusion on the real host: exactness at weight 0, masks (Eq. 7), chaining."""

from __future__ import annotations

import pytest
import torch

from harness.sampling import txt2img_latent

SEED_LATENT = 11


def face_latent(count=1, seed=SEED_LATENT, size=8):
    return {"samples": torch.randn(count, 4, size, size, generator=torch.Generator().manual_seed(seed))}


def fuse(comfy, model, face, **overrides):
    settings = dict(weight=1.0, kv="self-attention to_k/to_v (training-free)", start_percent=0.0,
                    end_percent=1.0, face_noise="noised", noise_seed=0, uncond=True)
    settings.update(overrides)
    return comfy.run_node("LikenessFaceFusion", model=model, face=face, **settings)[0]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, comfy, tiny_checkpoints):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints[request.param])
    return request.param, model, clip


def test_weight_zero_is_the_unpatched_model(comfy, family):
    _, model, clip = family
    plain = txt2img_latent(comfy, model, clip)
    assert torch.equal(txt2img_latent(comfy, fuse(comfy, model, face_latent(), weight=0.0), clip), plain)


def test_a_face_changes_the_output_and_leaves_the_model_alone(comfy, family):
    _, model, clip = family
    before = txt2img_latent(comfy, model, clip)
    fused = txt2img_latent(comfy, fuse(comfy, model, face_latent()), clip)
    assert torch.isfinite(fused).all()
    assert (fused - before).abs().max() > 1e-4
    assert torch.equal(txt2img_latent(comfy, model, clip), before)
    other = txt2img_latent(comfy, fuse(comfy, model, face_latent(seed=99)), clip)
    assert not torch.equal(other, fused), "a different face must give a different image"


class AttentionRecorder:
    """Wraps the dispatcher's default attention to see keys and masks."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch, dispatch):
        original = dispatch.default_attention

        def recording(q, k, v, extra_options, mask=None):
            key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
            self.calls.append({"key": key, "q": q, "k": k, "mask": mask, "heads": extra_options["n_heads"],
                               "shape": extra_options["original_shape"],
                               "cond_or_uncond": list(extra_options["cond_or_uncond"])})
            return original(q, k, v, extra_options, mask)

        monkeypatch.setattr(dispatch, "default_attention", recording)


def attention_probabilities(call):
    q, k, mask, heads = call["q"].float(), call["k"].float(), call["mask"], call["heads"]
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / d ** 0.5 + mask.float().unsqueeze(1)
    return logits.softmax(-1)


def test_every_cross_attention_layer_gets_the_face_keys(comfy, family, monkeypatch):
    name, model, clip = family
    dispatch, layers = comfy.pack("attention.dispatch"), comfy.pack("attention.unet_layers")
    recorder = AttentionRecorder()
    recorder.install(monkeypatch, dispatch)
    fused = fuse(comfy, model, face_latent(count=2))  # two references of one person
    txt2img_latent(comfy, fused, clip, steps=1)
    with_faces = [c for c in recorder.calls if c["k"].shape[1] > 77]
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    assert {c["key"] for c in with_faces} == set(keys)
    assert all(c["mask"] is None for c in with_faces), "one person needs no mask: fused attention stays fast"
    for call in with_faces:
        image_tokens = call["q"].shape[1]
        face_tokens = call["k"].shape[1] - 77
        # same size face latent: each reference brings as many tokens as the image has queries
        assert face_tokens == 2 * image_tokens


def test_two_people_with_masks_never_see_each_other(comfy, tiny_checkpoints, monkeypatch):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    dispatch = comfy.pack("attention.dispatch")
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :24] = 1.0
    right[:, 40:] = 1.0  # the middle columns belong to nobody
    fused = fuse(comfy, model, face_latent(seed=1), mask=left)
    fused = fuse(comfy, fused, face_latent(seed=2), mask=right)
    recorder = AttentionRecorder()
    recorder.install(monkeypatch, dispatch)
    txt2img_latent(comfy, fused, clip, steps=1, size=64)
    call = next(c for c in recorder.calls if c["mask"] is not None and c["q"].shape[1] == 64)  # the 8×8 layers
    probs = attention_probabilities(call)
    text, face = 77, 64
    person = {0: slice(text, text + face), 1: slice(text + face, text + 2 * face)}
    grid = torch.arange(64).reshape(8, 8) % 8  # column of each query token
    in_left, in_right = (grid < 3).flatten(), (grid >= 5).flatten()
    nobody = ~(in_left | in_right)
    assert probs[:, :, in_left][..., person[1]].max() == 0
    assert probs[:, :, in_right][..., person[0]].max() == 0
    assert probs[:, :, in_left][..., person[0]].sum(-1).min() > 0
    assert probs[:, :, in_right][..., person[1]].sum(-1).min() > 0
    assert probs[:, :, nobody][..., person[0]].sum(-1).min() > 0
    assert probs[:, :, nobody][..., person[1]].sum(-1).min() > 0


def test_chaining_adds_people_to_one_patch(comfy, tiny_checkpoints):
    import comfy.patcher_extension as extension

    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    face_fusion = comfy.pack("attention.face_fusion")
    one = fuse(comfy, model, face_latent(seed=1))
    two = fuse(comfy, one, face_latent(seed=2))
    wrappers = two.get_wrappers(extension.WrappersMP.DIFFUSION_MODEL, face_fusion.WRAPPER_KEY)
    assert len(wrappers) == 1 and len(wrappers[0].fusion.identities) == 2
    (first,) = one.get_wrappers(extension.WrappersMP.DIFFUSION_MODEL, face_fusion.WRAPPER_KEY)
    assert len(first.fusion.identities) == 1, "chaining must not change the first patched model"
    assert not torch.equal(txt2img_latent(comfy, two, clip), txt2img_latent(comfy, one, clip))


def test_uncond_rows_can_be_kept_off_the_face(comfy, tiny_checkpoints, monkeypatch):
    model, clip, _ = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    dispatch = comfy.pack("attention.dispatch")
    recorder = AttentionRecorder()
    recorder.install(monkeypatch, dispatch)
    txt2img_latent(comfy, fuse(comfy, model, face_latent(), uncond=False), clip, steps=1)
    call = next(c for c in recorder.calls if c["mask"] is not None)
    probs = attention_probabilities(call)
    kinds = comfy.pack("attention.rows").row_kinds(call["cond_or_uncond"], probs.shape[0])
    for row, kind in enumerate(kinds):
        face_share = probs[row][..., 77:].sum(-1)
        assert (face_share.max() == 0) if kind == 1 else (face_share.min() > 0)


def write_dataset(folder, count=2):
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage.data.astronaut())
    for index in range(count):
        box = (60 + 20 * index, 0, 380 + 20 * index, 320)
        photo.crop(box).resize((64, 64)).save(folder / f"shot{index}.png")
        photo.crop((150, 40, 270, 160)).resize((64, 64)).save(folder / f"shot{index}.face.png")
        (folder / f"shot{index}.txt").write_text("a photo of an astronaut")


def test_trainer_lowers_the_loss_and_its_weights_load(comfy, tiny_checkpoints, base_directory):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    write_dataset(base_directory / "input" / "face_kv_test")
    name, before, after = comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae,
                                         folder="face_kv_test", steps=8, learning_rate=1e-3, seed=0,
                                         filename_prefix="face_kv_test")
    assert after < before, (before, after)
    path = base_directory / "models" / "likeness" / name
    assert path.exists()
    free = txt2img_latent(comfy, fuse(comfy, model, face_latent()), clip)
    trained = txt2img_latent(comfy, fuse(comfy, model, face_latent(), kv=name), clip)
    assert not torch.equal(free, trained)
    # the base model was frozen: unpatched output unchanged by training
    plain_again = txt2img_latent(comfy, model, clip)
    assert torch.equal(plain_again, txt2img_latent(comfy, fuse(comfy, model, face_latent(), weight=0.0, kv=name), clip))


def test_trainer_names_what_a_bad_folder_lacks(comfy, tiny_checkpoints, base_directory):
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    folder = base_directory / "input" / "face_kv_bad"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(folder / "lonely.png")
    with pytest.raises(ValueError, match="lonely.face.png"):
        comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae, folder="face_kv_bad", steps=1,
                       learning_rate=1e-3, seed=0, filename_prefix="x")


def test_trainer_can_be_interrupted_and_writes_nothing(comfy, tiny_checkpoints, base_directory, monkeypatch):
    import comfy.model_management as model_management

    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    write_dataset(base_directory / "input" / "face_kv_interrupt")
    steps_seen = []
    original = model_management.throw_exception_if_processing_interrupted

    def interrupt_after_two_steps(*args, **kwargs):
        if len(steps_seen) >= 2:
            raise model_management.InterruptProcessingException()
        return original(*args, **kwargs)

    training = comfy.pack("attention.face_kv_training")
    real_train = training.train_face_kv

    def counting_train(*args, on_step=None, **kwargs):
        def step(index, loss):
            steps_seen.append(index)
            on_step(index, loss)
        return real_train(*args, on_step=step, **kwargs)

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt_after_two_steps)
    monkeypatch.setattr(training, "train_face_kv", counting_train)
    before = set((base_directory / "models" / "likeness").glob("interrupted*"))
    with pytest.raises(model_management.InterruptProcessingException):
        comfy.run_node("LikenessTrainFaceKV", model=model, clip=clip, vae=vae, folder="face_kv_interrupt",
                       steps=50, learning_rate=1e-3, seed=0, filename_prefix="interrupted")
    assert len(steps_seen) == 2
    assert set((base_directory / "models" / "likeness").glob("interrupted*")) == before
