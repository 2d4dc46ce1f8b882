"""jobs/make_pairs.py's inputs and servers for its test, and its throughput with one and with two
servers for the README's "At scale" figures (tests/tools/benchmark.py --pairs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .base import make_base_directory
from .paths import REPO, load_installer
from .server import ComfyServer
from .workflows import place_tiny_models

JOB = REPO / "jobs" / "make_pairs.py"
SOURCE, TARGETS = "normal costume", ("Santa Claus costume", "cute flower costume")


def pair_job_inputs(root: Path) -> tuple[Path, Path]:
    """Two identity photos and a pose bank of two poses, from the example pictures."""
    from PIL import Image

    examples = load_installer().EXAMPLES_DIR
    identities, poses = root / "identities", root / "poses"
    identities.mkdir(parents=True)
    poses.mkdir(parents=True)
    for name in ("likeness_portrait.png", "likeness_portrait_2.png"):
        shutil.copyfile(examples / name, identities / name)
    with Image.open(examples / "likeness_pose_pair.png") as pair:
        left = pair.crop((0, 0, pair.width // 2, pair.height))
        left.save(poses / "pose_a.png")
        left.transpose(Image.FLIP_LEFT_RIGHT).save(poses / "pose_b.png")
    return identities, poses


def start_pair_server(comfyui: Path, root: Path, checkpoints: dict[str, Path], name: str, log_folder: Path,
                      env: dict[str, str] | None = None) -> ComfyServer:
    """A server of its own (base directory, examples, tiny models under the shipped names)."""
    base = make_base_directory(root / name)
    load_installer().copy_examples(base / "input")
    place_tiny_models(base / "models", checkpoints)
    server = ComfyServer(Path(sys.executable), comfyui, base, log_folder / f"pairs-{name}.log", env=env)
    server.wait_ready()
    return server


def job_command(inputs: tuple[Path, Path], output: Path, pairs: int, urls: list[str], *,
                size: tuple[int, int] = (128, 64), steps: int = 2, seed: int = 5) -> list[str]:
    identities, poses = inputs
    command = [sys.executable, str(JOB), "--identities", str(identities), "--poses", str(poses),
               "--source", SOURCE, "--pairs", str(pairs), "--output", str(output),
               "--size", str(size[0]), str(size[1]), "--steps", str(steps), "--seed", str(seed)]
    for target in TARGETS:
        command += ["--target", target]
    for url in urls:
        command += ["--server", url]
    return command


def pair_throughput(comfyui: Path, checkpoints: dict[str, Path], pairs: int = 12, size: tuple[int, int] = (256, 128),
                    steps: int = 8) -> dict:
    """Pairs per minute with one server and with two, each server held to one CPU thread (as one
    server holds one GPU), over the same pairs; each time is the whole command's wall time, as a
    user sees it."""
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    figures: dict = {"pairs": pairs, "size": list(size), "steps": steps, "threads_per_server": 1}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        inputs = pair_job_inputs(root / "inputs")
        servers = [start_pair_server(comfyui, root, checkpoints, name, root, env=one_thread) for name in ("a", "b")]
        try:
            # a first pair on each server loads the models: not part of the rate
            for server in servers:
                subprocess.run(job_command(inputs, root / f"warm-{server.port}", 1, [server.url], size=size,
                                           steps=steps), check=True, capture_output=True, timeout=900)
            for count in (1, 2):
                urls = [server.url for server in servers[:count]]
                start = time.perf_counter()
                run = subprocess.run(job_command(inputs, root / f"run-{count}", pairs, urls, size=size, steps=steps),
                                     capture_output=True, text=True, timeout=3600)
                seconds = time.perf_counter() - start
                if run.returncode != 0:
                    raise RuntimeError(run.stderr[-4000:])
                made = json.loads(run.stdout)["made"]
                figures[f"{count}_server"] = {"seconds": round(seconds, 2), "made": made,
                                              "pairs_per_minute": round(60 * made / seconds, 2)}
        finally:
            for server in servers:
                server.stop()
    figures["two_over_one"] = round(figures["2_server"]["pairs_per_minute"] / figures["1_server"]["pairs_per_minute"],
                                    3)
    return figures
