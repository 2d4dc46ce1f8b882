"""jobs/make_pairs.py against two real ComfyUI servers on 127.0.0.1 with the tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.pairs_bench import JOB, job_command, pair_job_inputs, start_pair_server
from harness.server import ComfyServer

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def job_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("likeness_make_pairs", JOB)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def start_server(host, root: Path, checkpoints: dict[str, Path], name: str, artifacts: Path) -> ComfyServer:
    return start_pair_server(host.comfyui, root, checkpoints, name, artifacts)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return pair_job_inputs(tmp_path_factory.mktemp("pair-job-inputs"))


def done_stems(output: Path) -> list[str]:
    return sorted(p.stem for p in output.glob("pair_*.json") if (output / f"{p.stem}.png").exists())


def check_pairs(job_module, inputs, output: Path, count: int) -> None:
    """Every pair once, in the Save Pairs layout, matching its manifest and the job's recipe."""
    from PIL import Image

    identities, poses = inputs
    expected = [f"pair_{i:05d}" for i in range(1, count + 1)]
    assert done_stems(output) == expected
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted(f"{stem}{suffix}" for stem in expected
                           for suffix in (".png", ".source.png", ".txt", ".source.txt", ".json"))
    for index, stem in enumerate(expected, 1):
        manifest = json.loads((output / f"{stem}.json").read_text())
        plan = job_module.plan(index, 5, sorted(p.name for p in identities.iterdir()),
                               sorted(p.name for p in poses.iterdir()), "normal costume",
                               ["Santa Claus costume", "cute flower costume"])
        assert {k: manifest[k] for k in ("index", "seed", "identity", "pose", "source_domain", "target_domain")} \
            == {"index": plan.index, "seed": plan.seed, "identity": plan.identity, "pose": plan.pose,
                "source_domain": plan.source_domain, "target_domain": plan.target_domain}
        gender = manifest["gender"]
        assert manifest["prompts"] == {"shared": f"the same {gender} on the left and right",
                                       "source": f"a {gender}, normal costume",
                                       "target": f"a {gender}, {plan.target_domain}"}
        assert (output / f"{stem}.txt").read_text() == manifest["prompts"]["target"]
        assert (output / f"{stem}.source.txt").read_text() == manifest["prompts"]["source"]
        for suffix in (".png", ".source.png"):
            with Image.open(output / f"{stem}{suffix}") as image:
                assert image.size == (64, 64)


def test_pairs_on_two_servers_survive_a_server_dying_and_a_restarted_client(host, tiny_checkpoints, base_directory,
                                                                            artifacts, inputs, job_module,
                                                                            tmp_path):
    checkpoints = {kind: base_directory / "models" / "checkpoints" / name for kind, name in tiny_checkpoints.items()}
    first = start_server(host, tmp_path, checkpoints, "a", artifacts)
    second = start_server(host, tmp_path, checkpoints, "b", artifacts)
    try:
        # 12 pairs on both servers; the second dies once two pairs exist.
        output = tmp_path / "pairs"
        job = subprocess.Popen(job_command(inputs, output, 12, [first.url, second.url]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while len(done_stems(output)) < 2:
            assert job.poll() is None and time.monotonic() < deadline, (job.stdout.read() + job.stderr.read()
                                                                        if job.poll() is not None else "slow")
            time.sleep(0.2)
        os.kill(second.process.pid, signal.SIGKILL)
        out, err = job.communicate(timeout=900)
        assert job.returncode == 0, out[-4000:] + err[-4000:]
        result = json.loads(out)
        assert result["made"] == 12 and not result["failed"] and not result["servers"][second.url]["alive"], out + err
        check_pairs(job_module, inputs, output, 12)

        # A client killed mid-run, run again: the pairs it made are kept as they were, the rest made.
        resumed = tmp_path / "resumed"
        job = subprocess.Popen(job_command(inputs, resumed, 8, [first.url]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        while len(done_stems(resumed)) < 3:
            assert job.poll() is None and time.monotonic() < deadline + 600, job.stderr.read()
            time.sleep(0.1)
        job.kill()
        job.wait()
        kept = {p.name: p.stat().st_mtime_ns for p in resumed.iterdir()
                if p.stem.split(".")[0] in done_stems(resumed)}
        again = subprocess.run(job_command(inputs, resumed, 8, [first.url]), capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
        assert json.loads(again.stdout)["kept"] == len({name.split(".")[0] for name in kept})
        assert {name: (resumed / name).stat().st_mtime_ns for name in kept} == kept, "nothing made twice"
        check_pairs(job_module, inputs, resumed, 8)

        # The same pair asked for twice: the second prompt comes whole from the server's cache
        # (ComfyUI then skips every node upstream of a cached output), and still yields the pair.
        for folder in ("once", "twice"):
            same = subprocess.run(job_command(inputs, tmp_path / folder, 1, [first.url]), capture_output=True,
                                  text=True, timeout=900)
            assert same.returncode == 0, same.stdout[-4000:] + same.stderr[-4000:]
        check_pairs(job_module, inputs, tmp_path / "twice", 1)
    finally:
        first.stop()
        second.stop()
