"""jobs/train.py's inputs and commands, for its tests and for the throughput figures of the README's
"At scale" (tests/tools/benchmark.py --training): a pairs folder of smooth random images, the tiny SD1.5
checkpoint, the tiny B/32 tower and MCDM adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .paths import REPO

JOB = REPO / "jobs" / "train.py"
TINY_JOB = Path(__file__).resolve().parent / "tiny_train_job.py"  # JOB, with the tiny model configs registered


def write_pairs(folder: Path, count: int, size: int = 64) -> Path:
    """pair_NNNNN.png / .source.png / .txt / .source.txt, each image a different smooth random one."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        for suffix, seed, text in (("", 2 * index, "a man in a suit"), (".source", 2 * index + 1, "a man")):
            coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0].movedim(0, -1)
            Image.fromarray((image * 255).byte().numpy()).save(folder / f"pair_{index:05d}{suffix}.png")
            (folder / f"pair_{index:05d}{suffix}.txt").write_text(text)
    return folder


def write_faces(folder: Path, count: int, size: int = 64) -> Path:
    """Face Fusion training examples: <name>.png, <name>.face.png (a crop of it, resized) and <name>.txt."""
    from PIL import Image

    write_pairs(folder, count, size)
    for index in range(count):
        name = f"pair_{index:05d}"
        with Image.open(folder / f"{name}.png") as image:
            image.crop((size // 4, size // 4, 3 * size // 4, 3 * size // 4)).resize((size, size)).save(
                folder / f"{name}.face.png")
        (folder / f"{name}.source.png").unlink()
        (folder / f"{name}.source.txt").unlink()
    return folder


def training_inputs(root: Path, sd15_checkpoint: Path, pairs: int = 6) -> dict[str, Path]:
    """Everything jobs/train.py mcdm reads, under ``root``."""
    from tiny import tiny_mcdm

    files = tiny_mcdm.write(root / "models")
    return {"checkpoint": Path(sd15_checkpoint), "clip_vision": root / "models" / "clip_vision" / files["clip_vision"],
            "adapter": root / "models" / "likeness" / files["adapter"], "folder": write_pairs(root / "pairs", pairs),
            "faces": write_faces(root / "faces", pairs)}


def write_identity_pairs(folder: Path, count: int, size: int = 64) -> Path:
    """Infinite-ID training pairs: <name>.png (a different crop of the astronaut each, resized) and
    <name>.id.png (the whole photo, where the tiny insightface pack finds its face)."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage.data.astronaut())
    for index in range(count):
        left, top = 24 * index % 192, 16 * index % 96
        photo.crop((left, top, left + 320, top + 320)).resize((size, size)).save(folder / f"pair_{index:05d}.png")
        photo.resize((256, 256)).save(folder / f"pair_{index:05d}.id.png")
    return folder


def id_adapter_inputs(root: Path, pairs: int = 4) -> dict[str, Path]:
    """What jobs/train.py id_adapter reads besides the checkpoint: a tiny SD1.5 FaceID-PlusV2 file,
    the tiny CLIP vision tower (ViT-H's stand-in), a tiny insightface pack and an identity folder.
    Needs ComfyUI importable (the tower is one of its CLIP vision models)."""
    from tiny import tiny_faceid, tiny_insightface, tiny_models

    from .workflows import TINY_FACE_PACK

    tiny_insightface.write_pack(root / "insightface", TINY_FACE_PACK)
    return {"id_adapter": tiny_faceid.write(root / "ipadapter" / "tiny_faceid_sd15.safetensors", "sd15"),
            "id_clip_vision": tiny_models.write_clip_vision(root / "clip_vision"),
            "insightface": root / "insightface", "face_model": Path(TINY_FACE_PACK),
            "identities": write_identity_pairs(root / "identities", pairs)}


def job_command(comfyui: Path, inputs: dict[str, Path], output: Path, *, processes: int, steps: int, batch: int = 1,
                accumulate: int = 1, checkpoint_every: int = 1, learning_rate: float = 1e-3, seed: int = 7,
                validation: int = 2, resume: bool = False, trainer: str = "mcdm") -> list[str]:
    """torchrun with ``processes`` processes on this machine; 0: plain python, no torchrun.
    ``trainer`` face_kv trains on inputs["faces"] (training_inputs writes it too); id_adapter on
    inputs["identities"] with the files id_adapter_inputs writes."""
    launcher = [sys.executable] if processes == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    # Only the chosen trainer's inputs are read: each test writes only those.
    models = {
        "mcdm": lambda: ["--adapter", str(inputs["adapter"]), "--clip-vision", str(inputs["clip_vision"]),
                         "--folder", str(inputs["folder"])],
        "face_kv": lambda: ["--folder", str(inputs["faces"])],
        "id_adapter": lambda: ["--adapter", str(inputs["id_adapter"]), "--clip-vision", str(inputs["id_clip_vision"]),
                               "--insightface", str(inputs["insightface"]), "--face-model", str(inputs["face_model"]),
                               "--folder", str(inputs["identities"])],
    }[trainer]()
    command = [*launcher, str(TINY_JOB), trainer, "--comfyui", str(comfyui), "--checkpoint", str(inputs["checkpoint"]),
               *models, "--steps", str(steps), "--batch", str(batch),
               "--accumulate", str(accumulate), "--checkpoint-every", str(checkpoint_every),
               "--learning-rate", str(learning_rate), "--seed", str(seed), "--validation", str(validation),
               "--output", str(output)]
    return command + (["--resume"] if resume else [])


def one_thread_each() -> dict[str, str]:
    """Each process held to one CPU thread, as each would hold one GPU."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_job(command: list[str], timeout: float = 900, env: dict | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or one_thread_each())
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                             f"{done.stderr[-8000:]}")
    return done.stdout


def step_losses(output: Path) -> dict[int, float]:
    """The global batch loss of each checkpointed step (rank 0's .json files)."""
    return {json.loads(path.read_text())["step"]: json.loads(path.read_text())["loss"]
            for path in sorted((output / "checkpoints").glob("step_*.json"))}


def steps_per_second(comfyui: Path, inputs: dict[str, Path], root: Path, processes: int, steps: int = 12,
                     batch: int = 1) -> float:
    """Optimiser steps per second of one job (a global batch of processes × batch pairs), from rank
    0's own progress lines: the loading before step 1 and the first step (pairs read, first calls)
    are not counted."""
    output = root / f"rate-{processes}-{batch}-{time.monotonic_ns()}"
    stdout = run_job(job_command(comfyui, inputs, output, processes=processes, steps=steps, batch=batch,
                                 checkpoint_every=steps, validation=0))
    # "step k/N loss L m s/step": m is the mean since the loop began, so k·m is the time at step k
    at = {int(line.split()[1].split("/")[0]): float(line.split()[4]) for line in stdout.splitlines()
          if line.startswith("step ")}
    at = {k: k * mean for k, mean in at.items()}
    return (steps - 2) / (at[steps] - at[2])
