"""The MCDM's CLIP ViT-B/32 tower, built on ComfyUI's CLIP vision model: the hidden states
transformers' CLIPVisionModel and open_clip give, from files in either layout, whatever
transformers is installed (the whole file also runs under transformers 5, last test)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch

from harness.paths import REPO, TESTS, host_root
from tiny import tiny_mcdm


@pytest.fixture(scope="module")
def clip_b32(comfy):
    return comfy.pack("attention.portrait_editing.clip_b32")


@pytest.fixture(scope="module")
def tower():
    """transformers' CLIPVisionModel, the reference for a Hugging Face file."""
    return tiny_mcdm.clip_b32()


@pytest.fixture(scope="module")
def hf_file(tower):
    return tiny_mcdm.hugging_face_file(tower)


def random_pixels(batch: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def smooth_image(height: int, width: int, seed: int = 3) -> torch.Tensor:
    """(1, H, W, 3) in 0..1 on the 8-bit grid, as an image loaded from a file is."""
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").movedim(1, -1)
    return (image * 255).round() / 255


def post_layernorm(states: torch.Tensor, file: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tower's final LayerNorm from the file's own weights (what the adapter must NOT read)."""
    return torch.nn.functional.layer_norm(states, states.shape[-1:], file["vision_model.post_layernorm.weight"],
                                          file["vision_model.post_layernorm.bias"], eps=1e-5)


def clip_image_processor(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """transformers' CLIPImageProcessor (openai/clip-vit-base-patch32's preprocessor_config) on an IMAGE."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   do_center_crop=True, resample=3, do_convert_rgb=False)
    pixels = (image[0] * 255).round().to(torch.uint8).numpy()
    return torch.as_tensor(processor(images=pixels, return_tensors="pt")["pixel_values"])


def test_the_tiny_file_has_the_hugging_face_layout(tower, hf_file):
    """openai/clip-vit-base-patch32's layout, whichever transformers wrote it."""
    assert set(hf_file) == {k if k.startswith("vision_model.") else f"vision_model.{k}" for k in tower.state_dict()}
    assert all(k.startswith("vision_model.") for k in hf_file)
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in hf_file


def test_hugging_face_file_gives_clip_vision_models_last_hidden_state(clip_b32, tower, hf_file):
    """Every token, the class token included, before the post-LayerNorm."""
    pixels = random_pixels()
    encoder = clip_b32.ImageEncoder(hf_file, dtype=torch.float32)
    with torch.no_grad():
        expected = tower(pixel_values=pixels).last_hidden_state
    states = encoder.hidden_states(pixels)
    assert encoder.config["num_attention_heads"] == 1 and encoder.config["num_hidden_layers"] == 2
    assert states.shape == expected.shape == (2, 50, tiny_mcdm.WIDTH)
    assert (states - expected).abs().max() <= 1e-5
    # the post-LayerNorm output is something else: the adapter reads the states before it
    assert (states - post_layernorm(expected, hf_file)).abs().max() > 1e-2 * expected.abs().max()


def test_full_clip_model_file_and_transformers_5_names_give_the_same_tower(clip_b32, hf_file):
    """The tower inside a CLIPModel file (text half and projections ignored), and the bare
    names transformers 5 gives CLIPVisionModel's own state dict."""
    pixels = random_pixels(1)
    alone = clip_b32.ImageEncoder(hf_file, dtype=torch.float32).hidden_states(pixels)
    full = {**hf_file, "text_model.embeddings.token_embedding.weight": torch.randn(10, 64),
            "visual_projection.weight": torch.randn(16, 64), "text_projection.weight": torch.randn(16, 64),
            "logit_scale": torch.tensor(2.6592), "vision_model.embeddings.position_ids": torch.arange(50)[None]}
    bare = {k[len("vision_model."):]: v for k, v in hf_file.items()}
    for file in (full, {f"model.{k}": v for k, v in full.items()}, bare):
        assert torch.equal(clip_b32.ImageEncoder(file, dtype=torch.float32).hidden_states(pixels), alone)


def test_open_clip_file_gives_the_states_before_ln_post(clip_b32):
    """open_clip's VisionTransformer (QuickGELU, as OpenAI's weights), read by a hook before
    ln_post, from a full open_clip/OpenAI file of the same random weights."""
    import open_clip.model

    torch.manual_seed(11)
    visual = open_clip.model._build_vision_tower(
        embed_dim=16, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=tiny_mcdm.WIDTH, head_width=64, mlp_ratio=2.0,
                                                 patch_size=32, image_size=224)).eval()
    captured = {}
    visual.ln_post.register_forward_hook(lambda module, args, output: captured.setdefault("tokens", args[0]))
    pixels = random_pixels()
    with torch.no_grad():
        visual(pixels)
    expected = captured["tokens"]
    file = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    file.update({"token_embedding.weight": torch.randn(10, 64), "ln_final.weight": torch.ones(64),
                 "text_projection": torch.randn(64, 16), "logit_scale": torch.tensor(2.6592)})
    encoder = clip_b32.ImageEncoder(file, dtype=torch.float32)
    states = encoder.hidden_states(pixels)
    assert expected.shape == states.shape == (2, 50, tiny_mcdm.WIDTH)
    assert (states - expected).abs().max() <= 1e-5
    ln_post = {"vision_model.post_layernorm.weight": visual.ln_post.weight,
               "vision_model.post_layernorm.bias": visual.ln_post.bias}
    assert (states - post_layernorm(expected, ln_post)).abs().max() > 1e-2 * expected.abs().max()


def test_tokens_of_an_image_follow_clip_image_processor(clip_b32, tower, hf_file):
    """At 224 pixels the preprocessing is exact (rescale, OpenAI mean/std); larger and
    non-square images are resized on the short side and centre-cropped as the processor
    does (ComfyUI's antialiased bicubic against PIL's: a small mean difference; a crop
    four pixels off or a squashed image is several times further)."""
    encoder = clip_b32.ImageEncoder(hf_file, dtype=torch.float32)
    image = smooth_image(224, 224)
    with torch.no_grad():
        expected = tower(pixel_values=clip_image_processor(image)).last_hidden_state
    assert (encoder.tokens(image) - expected).abs().max() <= 1e-5
    for height, width in ((512, 512), (640, 480), (300, 400)):
        image = smooth_image(height, width)
        reference = clip_image_processor(image)
        wrong_crop = encoder.preprocess(image[:, 4:, 4:])
        squashed = encoder.preprocess(torch.nn.functional.interpolate(
            image.movedim(-1, 1), size=(224, 224), mode="bicubic", antialias=True).movedim(1, -1))
        error = (encoder.preprocess(image) - reference).abs().mean()
        assert error <= 0.02, (height, width)
        assert (wrong_crop - reference).abs().mean() > 2 * error
        if height != width:
            assert (squashed - reference).abs().mean() > 2 * error


def test_default_dtype_and_devices_are_comfyuis_clip_vision_loaders(clip_b32, tower, hf_file, tmp_path):
    """Without a dtype, the encoder is what ComfyUI's own ClipVisionModel computes for the same
    tower (text-encoder device and dtype, a ModelPatcher, float32 states): bit-identical to it
    through a B/32 config file, and close to the float32 reference."""
    import comfy.clip_vision
    import comfy.model_management as management
    import comfy.model_patcher

    encoder = clip_b32.ImageEncoder(hf_file)
    assert encoder.dtype == management.text_encoder_dtype(management.text_encoder_device())
    assert isinstance(encoder.patcher, comfy.model_patcher.ModelPatcher)
    assert encoder.patcher.load_device == management.text_encoder_device()
    config = tmp_path / "clip_vision_config_b32.json"
    config.write_text(json.dumps({**tiny_mcdm.B32, "model_type": "clip_vision_model", "num_channels": 3,
                                  "projection_dim": 16, "image_mean": list(clip_b32.OPENAI_MEAN),
                                  "image_std": list(clip_b32.OPENAI_STD)}))
    comfy_own = comfy.clip_vision.ClipVisionModel(str(config))
    missing, unexpected = comfy_own.load_sd({**hf_file, "visual_projection.weight": torch.randn(16, 64)})
    assert not missing and not unexpected
    image = smooth_image(300, 400)
    with torch.inference_mode():
        states = encoder.tokens(image)
        expected = comfy_own.encode_image(image)["last_hidden_state"]
    assert states.dtype == torch.float32 and states.device == management.intermediate_device()
    assert torch.equal(states, expected)
    with torch.no_grad():
        full_precision = tower(pixel_values=encoder.preprocess(image)).last_hidden_state
    assert (states - full_precision).abs().max() <= 1e-2 * full_precision.abs().max()


def test_low_precision_weights_give_the_rounded_towers_states(clip_b32, tower, hf_file):
    """bfloat16 and float16 storage: the float32 reference with its weights rounded the same
    way (ComfyUI keeps the two tower-wide LayerNorms in float32), and measurably not the
    float32 states."""
    pixels = random_pixels(1)
    with torch.no_grad():
        exact = tower(pixel_values=pixels).last_hidden_state
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad():
            expected = tiny_mcdm.clip_b32(stored_as=dtype)(pixel_values=pixels).last_hidden_state
        states = clip_b32.ImageEncoder(hf_file, dtype=dtype).hidden_states(pixels)
        assert (states - expected).abs().max() <= 1e-5, dtype
        assert (states - exact).abs().max() > 1e-4, dtype  # the rounding is really there


@pytest.mark.parametrize("change, message", [
    (lambda f: {**f, "vision_model.encoder.layers.0.self_attn.extra.weight": torch.zeros(1)},
     r"unexpected \['vision_model.encoder.layers.0.self_attn.extra.weight'\].*accepted: vision_model"),
    (lambda f: {k: v for k, v in f.items() if "layers.1.mlp.fc2.bias" not in k},
     r"missing \['vision_model.encoder.layers.1.mlp.fc2.bias'\].*accepted: vision_model"),
    (lambda f: {**f, "vision_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(100, 64)},
     r"do not fit one CLIP ViT: size mismatch for vision_model.encoder.layers.1.mlp.fc1.weight.*accepted"),
    (lambda f: {k: v for k, v in f.items() if "position_embedding" not in k},
     r"no vision_model.embeddings.position_embedding.weight"),
    (lambda f: {**f, "vision_model.embeddings.position_embedding.weight": torch.zeros(48, 64)},
     r"48 position embeddings.*square grid"),
    (lambda f: {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 64)},
     r"not a CLIP ViT image tower: expected vision_model.\* keys.*visual.\* keys"),
])
def test_a_file_that_is_not_the_tower_is_refused_naming_what_is_accepted(clip_b32, hf_file, change, message):
    with pytest.raises(ValueError, match=message):
        clip_b32.ImageEncoder(change(hf_file), dtype=torch.float32)


def test_open_clip_keys_that_are_not_a_vit_are_refused(clip_b32, hf_file):
    visual = {"visual.class_embedding": torch.zeros(64), "visual.conv1.weight": torch.zeros(64, 3, 32, 32),
              "visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"keys a CLIP ViT does not: \['visual.transformer.resblocks.0.ls_1.gamma'\]"
                                         r".*accepted under 'visual.'"):
        clip_b32.ImageEncoder(visual, dtype=torch.float32)


def test_the_module_never_imports_transformers():
    """Not even lazily: the tower must not depend on transformers' class layout."""
    tree = ast.parse((REPO / "attention" / "portrait_editing" / "clip_b32.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and not any(name.split(".")[0] in ("transformers", "open_clip") for name in imported), imported


@pytest.mark.slow
def test_the_tests_above_pass_under_transformers_5(tmp_path):
    """Issue 10, deviation 6: the same file, run by an interpreter whose transformers is 5.x
    (tests/harness/transformers5.py), with the main host's ComfyUI, torch and open_clip."""
    from harness import transformers5

    python, built = transformers5.environment()
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert version.startswith("5."), version
    report = tmp_path / "junit.xml"
    run = subprocess.run(
        [str(python), "-m", "pytest", str(TESTS / "test_clip_b32.py"), "-q", "-p", "no:cacheprovider",
         "-k", "not under_transformers_5", f"--junitxml={report}", f"--basetemp={tmp_path / 'basetemp'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "LIKENESS_HOST": str(host_root()), "PYTHONDONTWRITEBYTECODE": "1"})
    print(f"transformers {version} environment: {built['build_seconds']} s to build, {built['installed']}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 12 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    assert sys.executable != str(python)
