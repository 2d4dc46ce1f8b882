"""Distributed MCDM training: the Likeness Train MCDM node's code, run headless by torchrun.

    torchrun --nproc-per-node 2 jobs/train.py mcdm --comfyui ~/ComfyUI \\
        --checkpoint ~/ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --clip-vision ~/ComfyUI/models/clip_vision/clip-vit-base-patch32.safetensors \\
        --folder pairs --steps 200000 --batch 2 --accumulate 1 --checkpoint-every 1000 --output runs/outfit

One process per GPU (or per CPU worker: gloo); multi-node through torchrun's own --nnodes and
rendezvous options. Each process loads the base model, CLIP, VAE, the B/32 tower and the adapter
through ComfyUI as a library (comfy.sd and the pack's loaders in attention/), reads and encodes
only the pairs it draws, and trains the same float32 UNet + adapter copy as the node, as
DistributedDataParallel. A step's global batch is processes × --batch × --accumulate pairs, each
drawn from (--seed, step, position), so the result does not depend on how many processes share it.

Only rank 0 writes: every --checkpoint-every steps <output>/checkpoints/step_NNNNNNNN.safetensors
(UNet, ComfyUI's LDM layout) + .adapter.safetensors (the loader's layout) + .optimizer.pt
(torch.load(weights_only=True)) + .json (step, config, loss; written last: a checkpoint counts
once its .json exists); at the end <output>/<name>.safetensors + <name>.adapter.safetensors, for
models/likeness/ and Likeness MCDM Loader. --resume continues from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK = "likeness_pack"  # the repository imported as a package under this name (ComfyUI has its own `nodes`)
CHECKPOINT_PREFIX = "step_"


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="trainer", required=True)
    mcdm = commands.add_parser("mcdm", help="fine-tune an 8-channel MCDM UNet + embedding adapter on a pairs folder")
    mcdm.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder (its main.py) to use as a library")
    mcdm.add_argument("--checkpoint", type=Path, required=True,
                      help="SD1.5 checkpoint: CLIP, VAE, and the UNet to grow to 8 channels unless --unet is given")
    mcdm.add_argument("--unet", type=Path, help="an MCDM UNet to continue (unet.pth or a trained .safetensors)")
    mcdm.add_argument("--adapter", type=Path, help="its adapter (adapter.pth or .adapter.safetensors); "
                      "without one a new adapter starts as the identity on the CLIP tokens")
    mcdm.add_argument("--clip-vision", type=Path, required=True, help="CLIP ViT-B/32 (the adapter's image tower)")
    mcdm.add_argument("--folder", type=Path, required=True, help="a Likeness Save Pairs / jobs/make_pairs.py folder")
    mcdm.add_argument("--steps", type=int, required=True, help="optimiser steps in all (a resumed run continues to it)")
    mcdm.add_argument("--batch", type=int, default=1, help="pairs per process per micro-step (default 1)")
    mcdm.add_argument("--accumulate", type=int, default=1, help="micro-steps per optimiser step (default 1)")
    mcdm.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    mcdm.add_argument("--seed", type=int, default=0)
    mcdm.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    mcdm.add_argument("--validation", type=int, default=4,
                      help="pairs in the fixed validation set, evaluated before and after (default 4; 0: none)")
    mcdm.add_argument("--output", type=Path, required=True)
    mcdm.add_argument("--name", default="mcdm", help="final file name: <name>.safetensors + <name>.adapter.safetensors")
    mcdm.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parsed = parser.parse_args(argv)
    for name in ("steps", "batch", "accumulate", "checkpoint_every"):
        if getattr(parsed, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(parsed, name)}: expected 1 or more")
    return parsed


def start_comfyui(comfyui: Path, local_rank: int):
    """ComfyUI imported as a library on this process's device (cuda:LOCAL_RANK, else the CPU)."""
    import torch

    if not (comfyui / "comfy" / "sd.py").is_file():
        raise SystemExit(f"--comfyui={str(comfyui)!r} is not a ComfyUI folder (no comfy/sd.py in it)")
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # ComfyUI's device is the current CUDA device
    else:
        comfy.cli_args.args.cpu = True
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def import_pack():
    """The repository as a package (without running its ComfyUI entry point)."""
    if PACK not in sys.modules:
        package = types.ModuleType(PACK)
        package.__path__ = [str(REPO)]
        sys.modules[PACK] = package
    return lambda name: importlib.import_module(f"{PACK}.{name}")


def checkpoint_files(output: Path, step: int) -> dict[str, Path]:
    stem = output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    return {"unet": stem.with_suffix(".safetensors"), "adapter": Path(f"{stem}.adapter.safetensors"),
            "optimizer": Path(f"{stem}.optimizer.pt"), "state": stem.with_suffix(".json")}


def latest_checkpoint(output: Path) -> int | None:
    """The last step whose checkpoint is whole (its .json is written last)."""
    folder = output / "checkpoints"
    steps = [int(path.stem[len(CHECKPOINT_PREFIX):]) for path in folder.glob(f"{CHECKPOINT_PREFIX}*.json")] \
        if folder.is_dir() else []
    return max(steps, default=None)


def config_of(args: argparse.Namespace, world_size: int) -> dict:
    """What a resumed run must share with the run it continues (the global batch, not its split)."""
    return {"trainer": args.trainer, "seed": args.seed, "learning_rate": args.learning_rate,
            "global_batch": world_size * args.batch * args.accumulate, "folder": str(args.folder.resolve())}


class Progress:
    """Rank 0's progress lines: step, loss, seconds per step and the time left."""

    def __init__(self, steps: int, first: int):
        self.steps, self.first, self.start = steps, first, time.monotonic()
        self.every = max(1, steps // 100)

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        if done % self.every and done != self.steps:
            return
        per_step = (time.monotonic() - self.start) / (done - self.first)
        left = int(per_step * (self.steps - done))
        print(f"step {done}/{self.steps} loss {loss:.5f} {per_step:.3f} s/step "
              f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", flush=True)


def train_mcdm_job(args: argparse.Namespace) -> dict:
    import torch

    device = start_comfyui(args.comfyui.expanduser().resolve(), int(os.environ.get("LOCAL_RANK", "0")))
    pack = import_pack()
    training, mcdm_training, mcdm = pack("attention.training"), pack("attention.mcdm_training"), pack("attention.mcdm")
    ImageEncoder = pack("attention.clip_b32").ImageEncoder
    PairReader = pack("nodes.mcdm_training").PairReader
    import comfy.sd

    world = training.world_from_environment(device)
    config = config_of(args, world.size)
    resume, first = None, 0
    if args.resume and (last := latest_checkpoint(args.output)) is not None:
        files = checkpoint_files(args.output, last)
        saved = json.loads(files["state"].read_text())
        differing = {k: (saved["config"].get(k), v) for k, v in config.items() if saved["config"].get(k) != v}
        if differing:
            raise SystemExit(f"--resume: {files['state']} was written by a different run: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differing.items())
                             + " (the global batch is processes x --batch x --accumulate)")
        resume = training.Resume(last, torch.load(files["optimizer"], map_location=device, weights_only=True))
        args.unet, args.adapter, first = files["unet"], files["adapter"], last

    with torch.inference_mode():
        # float32 UNets: the trainer's copy is float32, and a resumed run must start from the saved bits
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True,
                                                                 output_clip=True,
                                                                 model_options={"dtype": torch.float32})[:3]
        if args.unet is not None:
            model = mcdm.build_model(mcdm.read_unet(mcdm.load_state_dict(args.unet)), dtype=torch.float32)
        encoder = ImageEncoder(mcdm.load_state_dict(args.clip_vision))
        reader = PairReader(str(args.folder), args.folder.expanduser().resolve(), clip, vae, encoder)
        null, empty_text = reader.null(), reader.text("")
    width = model.model.model_config.unet_config["context_dim"]
    adapter = (mcdm.adapter_from_state_dict(mcdm.load_state_dict(args.adapter)) if args.adapter is not None
               else mcdm.EmbeddingAdapter(width, 1024, null.clip_tokens.shape[1]))

    losses: dict[int, float] = {}

    def on_step(step: int, loss: float) -> None:
        losses[step + 1] = loss
        if world.rank == 0:
            progress(step, loss)

    def on_checkpoint(done: int, unet, trained_adapter, optimizer) -> None:
        if world.rank != 0 or (done % args.checkpoint_every and done != args.steps):
            return
        write_checkpoint(args.output, done, unet.state_dict(), trained_adapter.state_dict(), optimizer.state_dict(),
                         {"step": done, "config": config, "loss": losses.get(done)}, mcdm_training)

    progress = Progress(args.steps, first)
    if world.rank == 0:
        print(f"mcdm: {len(reader)} pairs, {world.size} process(es) on {device}, global batch "
              f"{config['global_batch']}, steps {first}..{args.steps}", flush=True)
    trained, trained_adapter, before, after = mcdm_training.train_mcdm(
        model, adapter, reader, empty_text=empty_text, null=null, steps=args.steps, learning_rate=args.learning_rate,
        seed=args.seed, on_step=on_step, batching=training.Batching(args.batch, args.accumulate), world=world,
        resume=resume, on_checkpoint=on_checkpoint, validation=args.validation)
    summary = {"steps": args.steps, "first_step": first, "pairs": len(reader), "processes": world.size,
               "loss_before": before, "loss_after": after, "losses": losses, "config": config}
    if world.rank == 0:
        unet_path = args.output / f"{args.name}.safetensors"
        mcdm_training.save(trained, trained_adapter, unet_path, args.output / f"{args.name}.adapter.safetensors",
                           {k: v for k, v in summary.items() if k not in ("losses", "config")})
        print(f"wrote {unet_path} (+ .adapter.safetensors): validation loss {before:.5f} -> {after:.5f}", flush=True)
    if world.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def write_checkpoint(output: Path, step: int, unet: dict, adapter: dict, optimizer: dict, state: dict,
                     mcdm_training) -> None:
    """UNet + adapter in the loader's layout, the optimiser's state, then the .json that makes it count."""
    import torch

    from_pack = import_pack()
    atomic_path = from_pack("attention.atomic").atomic_path
    files = checkpoint_files(output, step)
    files["state"].parent.mkdir(parents=True, exist_ok=True)
    mcdm_training.save_weights(unet, adapter, files["unet"], files["adapter"], {"step": step})
    with atomic_path(files["optimizer"]) as partial:
        torch.save(optimizer, partial)
    with atomic_path(files["state"]) as partial:
        Path(partial).write_text(json.dumps(state, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    train_mcdm_job(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
