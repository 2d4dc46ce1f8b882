"""The "At scale" page (docs/at-scale.md) followed as written, on this machine: its servers (two, each on
one CPU thread instead of a GPU), its pair job against both, its torchrun command with two
processes on the pairs that job made; the result loads in Likeness MCDM Loader.

The commands are read from its code blocks; only what cannot be the same here is
replaced: counts (4 pairs, 2 steps), the servers' addresses, the tiny models (the pair canvas and
steps, and the tiny-model registration wrapper around jobs/train.py)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.pairs_bench import pair_job_inputs, start_pair_server
from harness.paths import REPO
from harness.training_job import TINY_JOB, one_thread_each

pytestmark = pytest.mark.slow

PAIRS, STEPS = 4, 2


def readme_commands() -> list[list[list[str]]]:
    """The At scale page's bash blocks (docs/at-scale.md, which the README links), each a list of
    commands (argv lists)."""
    section = (REPO / "docs" / "at-scale.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [[shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            for block in blocks]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def replaced(argv: list[str], values: dict[str, str]) -> list[str]:
    argv = list(argv)
    for name, value in values.items():
        argv[argv.index(name) + 1] = value
    return argv


def test_the_at_scale_section_runs_as_written(host, comfy, base_directory, tiny_checkpoints, shipped_model_files,
                                              artifacts, tmp_path):
    servers_block, pairs_block, training_block = readme_commands()
    # 1. one server per GPU: distinct ports and CUDA devices, ComfyUI's own main.py
    assert all(argv[:2] == ["python", "main.py"] for argv in servers_block)
    assert sorted(int(option(argv, "--cuda-device")) for argv in servers_block) == list(range(len(servers_block)))
    assert len({option(argv, "--port") for argv in servers_block}) == len(servers_block) == 2
    checkpoints = {kind: base_directory / "models" / "checkpoints" / name for kind, name in tiny_checkpoints.items()}
    servers = [start_pair_server(host.comfyui, tmp_path, checkpoints, f"gpu{i}", artifacts, env=one_thread_each())
               for i in range(len(servers_block))]
    work = servers[0].base_directory  # "the ComfyUI folder": models/ with the shipped names, pairs/ beside it
    try:
        # 2. the pair job, against every server
        (job,) = pairs_block
        assert job[:2] == ["python", "custom_nodes/likeness/jobs/make_pairs.py"]
        identities, poses = pair_job_inputs(tmp_path / "inputs")
        urls = [f"http://127.0.0.1:{option(argv, '--port')}" for argv in servers_block]
        assert [job[i + 1] for i, word in enumerate(job) if word == "--server"] == urls
        here = dict(zip(urls, (server.url for server in servers), strict=True))  # the same servers, other ports
        job = [sys.executable, str(REPO / "jobs" / "make_pairs.py"), *(here.get(word, word) for word in job[2:])]
        job = replaced(job, {"--identities": str(identities), "--poses": str(poses), "--pairs": str(PAIRS)})
        job += ["--size", "128", "64", "--steps", "2", "--seed", "5"]
        made = subprocess.run(job, cwd=work, capture_output=True, text=True, timeout=1200)
        assert made.returncode == 0, made.stderr[-4000:]
        assert json.loads(made.stdout)["made"] == PAIRS
        pairs = work / option(pairs_block[0], "--output")
        manifests = sorted(pairs.glob("pair_*.json"))
        assert len(manifests) == PAIRS
        targets = {word for i, word in enumerate(pairs_block[0]) if i and pairs_block[0][i - 1] == "--target"}
        assert {json.loads(m.read_text())["target_domain"] for m in manifests} == targets  # 4 pairs, 4 directions
    finally:
        for server in servers:
            server.stop()

    # 3. torchrun with two processes on those pairs
    (training,) = training_block
    assert training[:3] == ["torchrun", "--nproc-per-node", "2"]
    assert training[3] == "custom_nodes/likeness/jobs/train.py" and training[4] == "mcdm"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(TINY_JOB), *training[4:]]
    command = replaced(command, {"--comfyui": str(host.comfyui), "--steps": str(STEPS), "--checkpoint-every": "1"})
    trained = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=1200, env=one_thread_each())
    assert trained.returncode == 0, trained.stderr[-4000:]
    output = work / option(training, "--output")
    assert (output / "checkpoints" / f"step_{STEPS:08d}.json").exists()

    # the page: copy both files into models/likeness/ for Likeness MCDM Loader
    likeness = base_directory / "models" / "likeness"
    likeness.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".adapter.safetensors"):
        (likeness / f"at_scale{suffix}").write_bytes((output / f"mcdm{suffix}").read_bytes())
    model, state = comfy.run_node("LikenessMCDMLoader", unet_name="at_scale.safetensors",
                                  adapter_name="at_scale.adapter.safetensors",
                                  clip_vision_name="clip-vit-base-patch32.safetensors")
    written = load_file(str(output / "mcdm.safetensors"))
    loaded = model.model.diffusion_model.state_dict()
    assert loaded["input_blocks.0.0.weight"].shape[1] == 8
    assert all(torch.equal(value.float(), written[key]) for key, value in loaded.items())
    adapter = load_file(str(output / "mcdm.adapter.safetensors"))
    assert all(torch.equal(value.float(), adapter[key]) for key, value in state.adapter.state_dict().items())
