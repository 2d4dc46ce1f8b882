"""The trainers' recipes (issue 17, item 3): the papers' and released code's values, one source
for the nodes' inputs and jobs/train.py's options, and the optimiser step they configure computed
by hand: AdamW with decoupled weight decay after the step's gradient (all its examples, however
they are split into micro-steps) is clipped to a global norm over the clipped parameters only."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math

import pytest
import torch

from harness.paths import REPO
from harness.training_job import write_faces, write_identity_pairs
from test_infinite_id_node import clip_vision, parts  # noqa: F401  (fixtures)
from test_mcdm import write_pairs
from tiny import tiny_faceid, tiny_mcdm

# (learning rate, weight decay, gradient-norm clip (0: none), batch per device), from the sources the
# README's "Training recipes" tables cite: portrait editing supplementary 1.2 + the released
# utils/parse_args.py; Infinite-ID Sec. 4.1; Face Fusion Sec. 4.1 (batch 1 per GPU) + IP-Adapter's
# tutorial_train.py (lr 1e-4, weight decay 1e-2, no clipping).
PAPERS = {"mcdm": (5e-6, 1e-2, 1.0, 4), "id_adapter": (1e-4, 1e-2, 0.0, 4), "face_kv": (1e-4, 1e-2, 0.0, 1)}
NODES = {"mcdm": ("LikenessTrainMCDM", "MCDM_TRAINING"), "id_adapter": ("LikenessTrainIDAdapter", "ID_ADAPTER_TRAINING"),
         "face_kv": ("LikenessTrainFaceKV", "FACE_KV_TRAINING")}
OPTIMISER_INPUTS = ("learning_rate", "weight_decay", "max_grad_norm", "batch_size")


def job_module():
    spec = importlib.util.spec_from_file_location("likeness_train_job", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_defaults(trainer: str) -> dict:
    required = {"mcdm": ["--checkpoint", "c", "--clip-vision", "v", "--folder", "f"],
                "face_kv": ["--checkpoint", "c", "--folder", "f"],
                "id_adapter": ["--checkpoint", "c", "--adapter", "a", "--clip-vision", "v", "--insightface", "i",
                               "--folder", "f"]}[trainer]
    return vars(job_module().arguments([trainer, "--comfyui", "x", "--steps", "1", "--output", "o", *required]))


@pytest.mark.parametrize("trainer", sorted(PAPERS))
def test_node_inputs_and_job_options_default_to_the_papers_recipe(comfy, trainer):
    node_id, name = NODES[trainer]
    recipe = getattr(comfy.pack("attention.shared.recipes"), name)
    assert dataclasses.astuple(recipe) == PAPERS[trainer]
    schema = {i.id: getattr(i, "default", None) for i in comfy.node_class(node_id).GET_SCHEMA().inputs}
    signature = inspect.signature(comfy.node_class(node_id).execute).parameters
    node = [schema[key] for key in OPTIMISER_INPUTS]
    assert node == list(PAPERS[trainer]), node
    # an API prompt saved before the optional inputs existed runs with the same defaults
    assert [signature[key].default for key in OPTIMISER_INPUTS[1:]] == list(PAPERS[trainer][1:])
    job = job_defaults(trainer)
    assert [job[key] for key in ("learning_rate", "weight_decay", "max_grad_norm", "batch")] == list(PAPERS[trainer])
    assert job["accumulate"] == 1
    if trainer == "id_adapter":  # IP-Adapter's image dropout, and FaceID's LoRA as sampling's default applies it
        assert schema["identity_dropout"] == job["identity_dropout"] == signature["identity_dropout"].default == 0.05
        assert schema["lora_scale"] == job["lora_scale"] == signature["lora_scale"].default == 1.0


class Example:
    def __init__(self, a: float, b: list[list[float]]) -> None:
        self.a, self.b, self.target = a, torch.tensor(b, dtype=torch.float64), torch.zeros(1)


class Timesteps:
    """model_sampling's one method the loop calls."""

    @staticmethod
    def sigma(timestep: torch.Tensor) -> torch.Tensor:
        return timestep / 1000


EXAMPLES = [Example(1.0, [[0.3, -0.2], [0.1, 0.4]]), Example(3.0, [[-1.5, 0.5], [2.0, -0.1]]),
            Example(0.5, [[0.2, 0.9], [-0.7, 0.3]])]
START = (torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([[1.0, -0.5], [0.25, 2.0]],
                                                                         dtype=torch.float64))


def train_toy(comfy, recipe, batching, steps: int):
    """The loop on loss = a·|w1|² + Σ b∘w2 with only w1 clipped (as the MCDM's UNet is, its adapter
    not): the trained weights and the examples each step drew, in order."""
    training = comfy.pack("attention.shared.training_loop")
    w1, w2 = (torch.nn.Parameter(t.clone()) for t in START)
    drawn = []

    def loss_of(example, sigma, noise, generator):
        if torch.is_grad_enabled():  # the training examples (the validation loss runs without gradients)
            drawn.append(example)
        return example.a * (w1 ** 2).sum() + (example.b * w2).sum()

    training.optimise(EXAMPLES, loss_of, [w1, w2], model_sampling=Timesteps, steps=steps, recipe=recipe, seed=9,
                      batching=batching, clipped=[w1], validation=0)
    per_step = len(drawn) // steps
    return (w1.detach(), w2.detach()), [drawn[i * per_step:(i + 1) * per_step] for i in range(steps)]


def adamw_by_hand(steps: list[list[Example]], lr: float, weight_decay: float, max_norm: float):
    """torch.optim.AdamW's documented update (betas 0.9, 0.999, eps 1e-8), after clipping the step's
    mean gradient of w1 to a global norm of ``max_norm`` (clip_grad_norm_'s coefficient
    max_norm / (norm + 1e-6), at most 1; 0: no clipping)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    w = [t.clone() for t in START]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    for t, examples in enumerate(steps, start=1):
        g = [sum(2 * e.a * w[0] for e in examples) / len(examples), sum(e.b for e in examples) / len(examples)]
        if max_norm > 0:
            g[0] = g[0] * min(1.0, max_norm / (float(g[0].norm()) + 1e-6))
        for i in range(2):
            w[i] = w[i] * (1 - lr * weight_decay)
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            w[i] = w[i] - lr * (m[i] / (1 - beta1 ** t)) / ((v[i] / (1 - beta2 ** t)).sqrt() + eps)
    return w


@pytest.mark.parametrize("batch, accumulate", [(4, 1), (1, 4), (2, 2)])
def test_a_step_is_adamw_with_decay_after_clipping_the_whole_steps_gradient(comfy, batch, accumulate):
    """Two steps of four examples, one at a time or accumulated: the same as the hand computation
    over each step's four draws. The clip coefficient differs between the steps (the gradient of w1
    is 2a·w1), so clipping shows in the second step's AdamW update and not only in its scale."""
    recipes, training = comfy.pack("attention.shared.recipes"), comfy.pack("attention.shared.training_loop")
    recipe = recipes.Recipe(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0.5, batch=batch)
    (w1, w2), steps = train_toy(comfy, recipe, training.Batching(batch, accumulate), steps=2)
    assert [len(s) for s in steps] == [4, 4] and len({id(e) for s in steps for e in s}) > 1
    expected = adamw_by_hand(steps, 0.1, 0.5, 0.5)
    # the loop casts each loss to float32 before its backward: ~1e-7 relative in the gradients
    torch.testing.assert_close((w1, w2), tuple(expected), rtol=1e-5, atol=1e-8)
    # the hand computation can tell: without decay, or without clipping, it lands elsewhere
    for other in (adamw_by_hand(steps, 0.1, 0.0, 0.5), adamw_by_hand(steps, 0.1, 0.5, 0.0)):
        assert max(float((a - b).abs().max()) for a, b in zip(other, expected)) > 1e-3


def test_accumulated_batches_are_one_batch(comfy):
    """The node's batch_size of 4 (four examples, one at a time) and jobs/train.py's --batch 1
    --accumulate 4 train the same weights from the same draws (tests/test_distributed.py proves the
    same over processes)."""
    recipes, training = comfy.pack("attention.shared.recipes"), comfy.pack("attention.shared.training_loop")
    recipe = recipes.Recipe(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0.5, batch=4)
    whole, drawn_whole = train_toy(comfy, recipe, training.Batching(4, 1), steps=3)
    split, drawn_split = train_toy(comfy, recipe, training.Batching(1, 4), steps=3)
    assert drawn_whole == drawn_split
    assert all(torch.equal(a, b) for a, b in zip(whole, split))


class Captured(Exception):
    """Raised by the spy in place of training: what the node handed the loop is all that is needed."""


def spy_on_the_loop(monkeypatch, module) -> dict:
    seen = {}

    def spy(examples, loss_of, parameters, **kwargs):
        seen.update(kwargs, parameters=parameters)
        raise Captured

    monkeypatch.setattr(module, "optimise", spy)
    return seen


CHOSEN = {"learning_rate": 2e-3, "weight_decay": 0.3, "max_grad_norm": 0.7, "batch_size": 3}


@pytest.mark.parametrize("given", [{}, CHOSEN], ids=["defaults", "chosen"])
def test_each_trainer_node_hands_its_recipe_to_the_loop(comfy, tiny_checkpoints, base_directory, parts,
                                                        monkeypatch, given):
    """The nodes' inputs (or, absent, the recipe) reach the loop as its recipe and batch, and the
    MCDM clips its UNet's gradient only (the released train.py clips unet.parameters())."""
    recipes, training = comfy.pack("attention.shared.recipes"), comfy.pack("attention.shared.training_loop")
    model, clip, vae = comfy.load_checkpoint(tiny_checkpoints["sd15"])
    analysis, clip_vision_model, _ = parts
    root = base_directory / "input"
    suffix = "chosen" if given else "defaults"
    write_faces(root / f"recipe_faces_{suffix}", 1)
    write_identity_pairs(root / f"recipe_ids_{suffix}", 1)
    write_pairs(root / f"recipe_pairs_{suffix}", [(80, 81)], prompt="a man in a suit")
    files = tiny_mcdm.write(base_directory / "models")
    mcdm = comfy.run_node("LikenessMCDMLoader", unet_name=files["unet"], adapter_name=files["adapter"],
                          clip_vision_name=files["clip_vision"])
    adapter_file = tiny_faceid.write(base_directory / "models" / "ipadapter" / "tiny_faceid_recipe.safetensors", "sd15")
    (adapter,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=adapter_file.name)
    runs = {
        "FACE_KV_TRAINING": ("attention.face_fusion.face_kv_training", "LikenessTrainFaceKV",
                    dict(model=model, clip=clip, vae=vae, folder=f"recipe_faces_{suffix}")),
        "ID_ADAPTER_TRAINING": ("attention.infinite_id.id_adapter_training", "LikenessTrainIDAdapter",
                       dict(model=model, clip=clip, vae=vae, id_adapter=adapter, analysis=analysis,
                            clip_vision=clip_vision_model, folder=f"recipe_ids_{suffix}", shortcut_scale=1.0)),
        "MCDM_TRAINING": ("attention.portrait_editing.mcdm_training", "LikenessTrainMCDM",
                 dict(model=mcdm[0], mcdm=mcdm[1], clip=clip, vae=vae, folder=f"recipe_pairs_{suffix}")),
    }
    for name, (module, node_id, node_inputs) in runs.items():
        default = getattr(recipes, name)
        seen = spy_on_the_loop(monkeypatch, comfy.pack(module))
        # learning_rate is a required input; the others are optional and left out for the defaults
        chosen = {"steps": 1, "seed": 0, "learning_rate": default.learning_rate, **given}
        with pytest.raises(Captured):
            comfy.run_node(node_id, filename_prefix="never", **node_inputs, **chosen)
        expected = recipes.Recipe(*(given.get(k, getattr(default, f)) for k, f in
                                    zip(OPTIMISER_INPUTS, ("learning_rate", "weight_decay", "max_grad_norm", "batch"))))
        assert seen["recipe"] == expected, name
        assert seen["batching"] == training.Batching(expected.batch, 1), name
        if name == "MCDM_TRAINING":
            unet = {id(p) for p in seen["clipped"]}
            assert unet and unet < {id(p) for p in seen["parameters"]}
            assert len(seen["parameters"]) - len(unet) == 4  # the adapter's four tensors, not clipped
        else:
            assert seen.get("clipped") is None  # no clipping by default: all parameters if any
    assert math.isclose(recipes.ID_ADAPTER_IDENTITY_DROPOUT, 0.05)
