"""jobs/train.py under torchrun (CPU, gloo, two processes) against itself in one process: the same
step on a split global batch, the same end after an interruption and --resume, and files that
Likeness MCDM Loader reads. The expected weights come from another run of the job, never from
the loop's own arithmetic: what is proven is that splitting and resuming change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from harness.training_job import (id_adapter_inputs, job_command, one_thread_each, run_job, step_losses,
                                  training_inputs)
from tiny import tiny_mcdm

pytestmark = pytest.mark.slow  # each job starts ComfyUI in every process: seconds, not milliseconds

LEARNING_RATE = 1e-3
# Float32 sums in another order (per process, then averaged): AdamW's first step divides by
# |gradient| + 1e-8, so a weight whose gradient is near 1e-8 moves by a slightly different fraction
# of lr (measured: up to 0.5% of lr on 1.7% of the weights with accumulation). Any wrong example,
# sigma, noise or dropout case moves weights by about lr itself.
SAME = 1e-2 * LEARNING_RATE


@pytest.fixture(scope="module")
def inputs(base_directory, tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("training-job")
    return training_inputs(root, base_directory / "models" / "checkpoints" / tiny_checkpoints["sd15"])


@pytest.fixture(scope="module")
def comfyui(host):
    return host.comfyui


@pytest.fixture(scope="module")
def one_step_runs(comfyui, inputs, tmp_path_factory):
    """One step of: two processes with a batch of 1; one process with a batch of 2 (the combined
    global batch); one process with a batch of 1 (position 0 alone); two processes accumulating two
    micro-steps of 1 and one process with a batch of 4 (the same global batch of 4)."""
    root = tmp_path_factory.mktemp("one-step")
    runs = {"two_processes": (2, 1, 1), "one_process_batch_2": (0, 2, 1), "position_0_alone": (0, 1, 1),
            "two_processes_accumulating": (2, 1, 2), "one_process_batch_4": (0, 4, 1)}
    for name, (processes, batch, accumulate) in runs.items():
        run_job(job_command(comfyui, inputs, root / name, processes=processes, steps=1, batch=batch,
                            accumulate=accumulate, learning_rate=LEARNING_RATE))
    return {name: root / name for name in runs}


def weights(output, name="mcdm"):
    return {**load_file(str(output / f"{name}.safetensors")),
            **{f"adapter.{k}": v for k, v in load_file(str(output / f"{name}.adapter.safetensors")).items()}}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_one_step_on_two_processes_equals_one_process_on_the_combined_batch(one_step_runs):
    two, combined, alone = (weights(one_step_runs[name]) for name in
                            ("two_processes", "one_process_batch_2", "position_0_alone"))
    # AdamW's first step moves a weight by about lr·sign(gradient): the split run must agree far
    # below that, and the run without rank 1's example must not.
    assert largest_difference(two, combined) < SAME
    assert largest_difference(two, alone) > 0.5 * LEARNING_RATE
    # the loss rank 0 reports is the mean over the whole global batch, not its own half
    losses = {name: step_losses(output)[1] for name, output in one_step_runs.items()}
    assert losses["two_processes"] == pytest.approx(losses["one_process_batch_2"], rel=1e-6)


def test_accumulated_micro_steps_on_two_processes_equal_one_process_on_the_whole_batch(one_step_runs):
    """Gradients averaged once per step (DDP's no_sync on the first micro-step), over all four
    positions: micro-step m of rank r holds position 2m + r."""
    accumulating, whole, two = (weights(one_step_runs[name]) for name in
                                ("two_processes_accumulating", "one_process_batch_4", "two_processes"))
    assert largest_difference(accumulating, whole) < SAME
    assert largest_difference(accumulating, two) > 0.5 * LEARNING_RATE  # positions 2 and 3 count
    losses = {name: step_losses(output)[1] for name, output in one_step_runs.items()}
    assert losses["two_processes_accumulating"] == pytest.approx(losses["one_process_batch_4"], rel=1e-6)


def test_an_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(comfyui, inputs, tmp_path):
    steps = 6
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_job(job_command(comfyui, inputs, whole, processes=2, steps=steps, checkpoint_every=3))
    # stopped (SIGTERM to torchrun and its workers) once the step-2 checkpoint is whole
    command = job_command(comfyui, inputs, broken, processes=2, steps=steps, checkpoint_every=1)
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread_each(),
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (broken / "checkpoints" / "step_00000002.json").exists():
            assert running.poll() is None, "the run ended before its step-2 checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(running.pid, signal.SIGTERM)
        running.wait(timeout=120)
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
    assert not (broken / "mcdm.safetensors").exists(), "the run finished before it was stopped"
    stopped_at = max(step_losses(broken))
    assert 2 <= stopped_at < steps
    # a resume must keep the global batch: refused by name, before any training
    refused = subprocess.run(job_command(comfyui, inputs, broken, processes=0, steps=steps, batch=3, resume=True),
                             capture_output=True, text=True, timeout=300, env=one_thread_each())
    assert refused.returncode != 0 and "global_batch was 2, now 3" in refused.stderr
    stdout = run_job(job_command(comfyui, inputs, broken, processes=2, steps=steps, checkpoint_every=1, resume=True))
    assert f"steps {stopped_at}..{steps}" in stdout  # it continued, it did not start again
    resumed, uninterrupted = weights(broken), weights(whole)
    start = weights(broken / "checkpoints", f"step_{stopped_at:08d}")
    assert largest_difference(resumed, start) > 0.5 * LEARNING_RATE  # the resumed steps did train
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert step_losses(broken)[steps] == step_losses(whole)[steps]
    optimiser = torch.load(broken / "checkpoints" / f"step_{steps:08d}.optimizer.pt", weights_only=True)
    assert len(optimiser["state"]) == len(uninterrupted)  # one AdamW state per trained tensor (UNet + adapter)


def test_the_written_files_load_in_the_mcdm_loader(comfy, base_directory, one_step_runs):
    files = tiny_mcdm.write(base_directory / "models")  # the B/32 tower in models/clip_vision/
    likeness = base_directory / "models" / "likeness"
    output = one_step_runs["two_processes"]
    for source, name in ((output / "mcdm", "distributed_final"),
                         (output / "checkpoints" / "step_00000001", "distributed_step_1")):
        for suffix in (".safetensors", ".adapter.safetensors"):
            link = likeness / f"{name}{suffix}"
            if not link.exists():
                link.symlink_to(f"{source}{suffix}")
        model, state = comfy.run_node("LikenessMCDMLoader", unet_name=f"{name}.safetensors",
                                      adapter_name=f"{name}.adapter.safetensors",
                                      clip_vision_name=files["clip_vision"])
        written = weights(output) if name == "distributed_final" else weights(output / "checkpoints", "step_00000001")
        loaded = model.model.diffusion_model.state_dict()
        assert loaded["input_blocks.0.0.weight"].shape[1] == 8
        for key, value in loaded.items():
            assert torch.equal(value.float(), written[key]), key
        for key, value in state.adapter.state_dict().items():
            assert torch.equal(value.float(), written[f"adapter.{key}"]), key


def test_face_kv_on_two_processes_equals_one_process_and_resumes_where_it_stopped(comfy, comfyui, inputs,
                                                                                  tmp_path):
    """jobs/train.py face_kv: the same loop for Face Fusion's Linear_kf / Linear_vf. A resume is
    tested from a copy of the two-process run with its last checkpoint and final file removed (the
    state a stop after step 1 leaves; the MCDM test above stops a real run)."""
    import shutil

    runs = {"two": (2, 1), "combined": (0, 2), "alone": (0, 1)}
    for name, (processes, batch) in runs.items():
        run_job(job_command(comfyui, inputs, tmp_path / name, processes=processes, steps=2, batch=batch,
                            learning_rate=LEARNING_RATE, trainer="face_kv"))
    final = {name: load_file(str(tmp_path / name / "face_kv.safetensors")) for name in runs}
    assert largest_difference(final["two"], final["combined"]) < SAME
    assert largest_difference(final["two"], final["alone"]) > 0.5 * LEARNING_RATE
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    for path in [tmp_path / "resumed" / "face_kv.safetensors",
                 *(tmp_path / "resumed" / "checkpoints").glob("step_00000002.*")]:
        path.unlink()
    stdout = run_job(job_command(comfyui, inputs, tmp_path / "resumed", processes=2, steps=2,
                                 learning_rate=LEARNING_RATE, trainer="face_kv", resume=True))
    assert "steps 1..2" in stdout
    resumed = load_file(str(tmp_path / "resumed" / "face_kv.safetensors"))
    for key in final["two"]:
        assert torch.equal(resumed[key], final["two"][key]), key
    # the files are the Face Fusion node's kv files: its own reader takes them, layer by layer
    face_kv = comfy.pack("attention.face_fusion.face_kv_files")
    for path in (tmp_path / "two" / "face_kv.safetensors",
                 tmp_path / "two" / "checkpoints" / "step_00000001.safetensors"):
        loaded = face_kv.load_face_kv_file(path)
        written = load_file(str(path))
        assert len(loaded) * 2 == len(written) > 0
        assert all(torch.equal(w, written[face_kv._name(key, "k")]) for key, (w, _) in loaded.items())


def test_id_adapter_on_two_processes_equals_one_process_and_its_files_load(comfy, comfyui, inputs, base_directory,
                                                                           tmp_path):
    """jobs/train.py id_adapter: the same loop for Infinite-ID's identity-enhanced training (the
    projection and every image K/V as one DDP module; pairs read lazily through the pack's face
    backend and ComfyUI's CLIP vision). The files are FaceID-PlusV2 files the loader node reads."""
    import shutil

    job_inputs = {**inputs, **id_adapter_inputs(tmp_path / "models")}
    runs = {"two": (2, 1), "combined": (0, 2), "alone": (0, 1)}
    for name, (processes, batch) in runs.items():
        run_job(job_command(comfyui, job_inputs, tmp_path / name, processes=processes, steps=2, batch=batch,
                            learning_rate=LEARNING_RATE, trainer="id_adapter"))
    final = {name: load_file(str(tmp_path / name / "id_adapter.safetensors")) for name in runs}
    start = load_file(str(job_inputs["id_adapter"]))
    assert final["two"].keys() == start.keys()  # the whole FaceID-PlusV2 layout, its LoRA too
    assert largest_difference(final["two"], final["combined"]) < SAME
    assert largest_difference(final["two"], final["alone"]) > 0.5 * LEARNING_RATE
    for part in ("image_proj.proj.0.weight", "image_proj.perceiver_resampler.proj_in.weight",
                 "ip_adapter.1.to_k_ip.weight", "ip_adapter.31.to_v_ip.weight"):
        # each trained part moved (two AdamW steps: about 2·lr); the frozen LoRA did not
        assert float((final["two"][part] - start[part].float()).abs().max()) > LEARNING_RATE, part
    lora = [key for key in start if "_lora." in key]
    assert lora and all(torch.equal(final["two"][key], start[key].float()) for key in lora)
    losses = {name: step_losses(tmp_path / name)[2] for name in ("two", "combined")}
    assert losses["two"] == pytest.approx(losses["combined"], rel=1e-6)
    # --resume from the state a stop after step 1 leaves ends where the uninterrupted run did
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    for path in [tmp_path / "resumed" / "id_adapter.safetensors",
                 *(tmp_path / "resumed" / "checkpoints").glob("step_00000002.*")]:
        path.unlink()
    stdout = run_job(job_command(comfyui, job_inputs, tmp_path / "resumed", processes=2, steps=2,
                                 learning_rate=LEARNING_RATE, trainer="id_adapter", resume=True))
    assert "steps 1..2" in stdout
    resumed = load_file(str(tmp_path / "resumed" / "id_adapter.safetensors"))
    assert all(torch.equal(resumed[key], final["two"][key]) for key in final["two"])
    # s_scale 0 never runs the resampler: DDP averages the rest and leaves it exactly as it was
    for name, (processes, batch) in (("shortcut", (2, 1)), ("shortcut_combined", (0, 2))):
        run_job(job_command(comfyui, job_inputs, tmp_path / name, processes=processes, steps=2, batch=batch,
                            learning_rate=LEARNING_RATE, trainer="id_adapter") + ["--shortcut-scale", "0"])
    shortcut = load_file(str(tmp_path / "shortcut" / "id_adapter.safetensors"))
    assert largest_difference(shortcut, load_file(str(tmp_path / "shortcut_combined" / "id_adapter.safetensors"))) \
        < SAME
    resampler = [key for key in start if ".perceiver_resampler." in key]
    assert resampler and all(torch.equal(shortcut[key], start[key].float()) for key in resampler)
    assert float((shortcut["image_proj.proj.0.weight"] - start["image_proj.proj.0.weight"].float()).abs().max()) \
        > 0.5 * LEARNING_RATE
    # the loader node reads the final file and a checkpoint: every tensor bit for bit, under the file's keys
    layout = comfy.pack("attention.infinite_id.id_adapter").FILE_LAYOUTS["sd15"]
    ipadapter = base_directory / "models" / "ipadapter"
    ipadapter.mkdir(parents=True, exist_ok=True)
    for source, name in ((tmp_path / "two" / "id_adapter.safetensors", "distributed_id_final.safetensors"),
                         (tmp_path / "two" / "checkpoints" / "step_00000001.safetensors",
                          "distributed_id_step_1.safetensors")):
        link = ipadapter / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
        (loaded,) = comfy.run_node("LikenessIDAdapterLoader", adapter_name=name)
        written = load_file(str(source))
        assert loaded.kind == "sd15" and len(loaded.kv_weights) == len(layout)
        projection = loaded.projection.state_dict()
        assert len(projection) + 2 * len(layout) + len(lora) == len(written)
        for key, value in projection.items():
            assert torch.equal(value, written[f"image_proj.{key}"]), key
        for n, key in enumerate(layout):
            w_k, w_v = loaded.kv_weights[key]
            assert torch.equal(w_k, written[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"]), key
            assert torch.equal(w_v, written[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"]), key
