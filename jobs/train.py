"""Distributed training: the Likeness trainer nodes' code (MCDM, Face KV, ID Adapter), run headless by torchrun.

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

`face_kv` is the same loop for Face Fusion's Linear_kf / Linear_vf (UNet frozen): --checkpoint,
--folder of <name>.png + <name>.face.png + <name>.txt; checkpoints and the final <name>.safetensors
are Face Fusion kv files (models/likeness/).

`id_adapter` is the same loop for Infinite-ID's identity-enhanced training (Likeness Train ID
Adapter; UNet frozen, text cross-attention off): --checkpoint, --adapter (the FaceID-PlusV2 file to
continue), --clip-vision (ViT-H), --insightface (the folder holding models/<pack>/, as
ComfyUI's models/insightface) + --face-model (default: the pack the adapter was trained with),
--folder of <name>.png + <name>.id.png; checkpoints and the final <name>.safetensors are
FaceID-PlusV2 files (models/ipadapter/, Likeness ID Adapter Loader) recording that pack.
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


def common_arguments(command: argparse.ArgumentParser, recipe, default_name: str) -> None:
    """The options every trainer takes; the optimiser's default to ``recipe`` (attention/shared/recipes.py),
    the same values the trainer node's inputs default to."""
    command.add_argument("--comfyui", type=Path, required=True,
                         help="the ComfyUI folder (its main.py) to use as a library")
    command.add_argument("--steps", type=int, required=True,
                         help="optimiser steps in all (a resumed run continues to it)")
    command.add_argument("--batch", type=int, default=recipe.batch,
                         help=f"examples per process per micro-step (default {recipe.batch}: the paper's batch per "
                              "GPU; the global batch is processes x --batch x --accumulate)")
    command.add_argument("--accumulate", type=int, default=1, help="micro-steps per optimiser step (default 1)")
    command.add_argument("--learning-rate", type=float, default=recipe.learning_rate,
                         help=f"AdamW learning rate (default {recipe.learning_rate:g})")
    command.add_argument("--weight-decay", type=float, default=recipe.weight_decay,
                         help=f"AdamW's decoupled weight decay (default {recipe.weight_decay:g})")
    command.add_argument("--max-grad-norm", type=float, default=recipe.max_grad_norm,
                         help=f"clip each step's gradient to this global norm; 0: never (default "
                              f"{recipe.max_grad_norm:g})")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    command.add_argument("--validation", type=int, default=4,
                         help="examples in the fixed validation set, evaluated before and after (default 4; 0: none)")
    command.add_argument("--output", type=Path, required=True)
    command.add_argument("--name", default=default_name, help=f"final file name (default {default_name})")
    command.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")


def recipe_of(args: argparse.Namespace, default):
    """The trainer's recipe with this run's options in it."""
    import dataclasses

    return dataclasses.replace(default, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                               max_grad_norm=args.max_grad_norm, batch=args.batch)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    recipes = import_pack()("attention.shared.recipes")
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="trainer", required=True)
    mcdm = commands.add_parser("mcdm", help="fine-tune an 8-channel MCDM UNet + embedding adapter on a pairs folder "
                               "(Likeness Train MCDM)")
    common_arguments(mcdm, recipes.MCDM_TRAINING, "mcdm")
    mcdm.add_argument("--checkpoint", type=Path, required=True,
                      help="SD1.5 checkpoint: CLIP, VAE, and the UNet to grow to 8 channels unless --unet is given")
    mcdm.add_argument("--unet", type=Path, help="an MCDM UNet to continue (unet.pth or a trained .safetensors)")
    mcdm.add_argument("--adapter", type=Path, help="its adapter (adapter.pth or .adapter.safetensors); "
                      "without one a new adapter starts as the identity on the CLIP tokens")
    mcdm.add_argument("--clip-vision", type=Path, required=True, help="CLIP ViT-B/32 (the adapter's image tower)")
    mcdm.add_argument("--folder", type=Path, required=True, help="a Likeness Save Pairs / jobs/make_pairs.py folder")
    face_kv = commands.add_parser("face_kv", help="train Face Fusion's Linear_kf / Linear_vf, UNet frozen, on a "
                                  "folder of <name>.png + <name>.face.png + <name>.txt (Likeness Train Face KV)")
    common_arguments(face_kv, recipes.FACE_KV_TRAINING, "face_kv")
    face_kv.add_argument("--checkpoint", type=Path, required=True, help="the SD1.5 or SDXL checkpoint (frozen)")
    face_kv.add_argument("--folder", type=Path, required=True, help="the face training folder")
    id_adapter = commands.add_parser("id_adapter", help="Infinite-ID's identity-enhanced training of a FaceID-PlusV2 "
                                     "adapter, UNet frozen, on <name>.png + <name>.id.png (Likeness Train ID Adapter)")
    common_arguments(id_adapter, recipes.ID_ADAPTER_TRAINING, "id_adapter")
    id_adapter.add_argument("--checkpoint", type=Path, required=True, help="the SD1.5 or SDXL checkpoint (frozen)")
    id_adapter.add_argument("--adapter", type=Path, required=True,
                            help="the adapter to start from (FaceID-PlusV2 .safetensors / .bin, or a "
                            "Likeness-trained one)")
    id_adapter.add_argument("--clip-vision", type=Path, required=True, help="CLIP ViT-H/14 image encoder")
    id_adapter.add_argument("--insightface", type=Path, required=True,
                            help="the folder holding models/<face-model>/*.onnx (as ComfyUI's models/insightface)")
    id_adapter.add_argument("--face-model", default=None,
                            help="the insightface pack; default: the one the adapter was trained with (buffalo_l for "
                                 "h94's FaceID files, what a Likeness-trained file records); another is refused")
    id_adapter.add_argument("--face-provider", default="CPU",
                            help="where onnxruntime runs it: CPU (default), CUDA, ROCM, CoreML")
    id_adapter.add_argument("--shortcut-scale", type=float, default=1.0,
                            help="FaceID-PlusV2's s_scale during training (default 1)")
    id_adapter.add_argument("--lora-scale", type=float, default=1.0,
                            help="FaceID's LoRA scale during training, as Likeness Infinite-ID's lora_scale "
                                 "(default 1; 0: no LoRA); the files carry the LoRA at this scale")
    id_adapter.add_argument("--identity-dropout", type=float, default=recipes.ID_ADAPTER_IDENTITY_DROPOUT,
                            help="share of examples trained on the 'no face' input (default "
                                 f"{recipes.ID_ADAPTER_IDENTITY_DROPOUT:g}, IP-Adapter's image dropout)")
    id_adapter.add_argument("--folder", type=Path, required=True, help="the identity training folder")
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
    """A checkpoint's files; ``weights`` is the trainer's own file (the MCDM's UNet; face_kv's K/V)."""
    stem = output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    return {"weights": stem.with_suffix(".safetensors"), "adapter": Path(f"{stem}.adapter.safetensors"),
            "optimizer": Path(f"{stem}.optimizer.pt"), "state": stem.with_suffix(".json")}


def latest_checkpoint(output: Path) -> int | None:
    """The last step whose checkpoint is whole (its .json is written last)."""
    folder = output / "checkpoints"
    steps = [int(path.stem[len(CHECKPOINT_PREFIX):]) for path in folder.glob(f"{CHECKPOINT_PREFIX}*.json")] \
        if folder.is_dir() else []
    return max(steps, default=None)


def resume_config(args: argparse.Namespace, world_size: int) -> dict:
    """What a resumed run must share with the run it continues (the global batch, not its split)."""
    return {"trainer": args.trainer, "seed": args.seed, "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
            "global_batch": world_size * args.batch * args.accumulate, "folder": str(args.folder.resolve())}


def resume_point(args: argparse.Namespace, config: dict, device, training):
    """(Resume, the checkpoint's files) of the latest checkpoint under --resume, else (None, None);
    a checkpoint of a run with another seed, rate, global batch or folder is refused by name."""
    import torch

    if not args.resume or (last := latest_checkpoint(args.output)) is None:
        return None, None
    files = checkpoint_files(args.output, last)
    saved = json.loads(files["state"].read_text())
    differing = {k: (saved["config"].get(k), v) for k, v in config.items() if saved["config"].get(k) != v}
    if differing:
        raise SystemExit(f"--resume: {files['state']} was written by a different run: "
                         + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differing.items())
                         + " (the global batch is processes x --batch x --accumulate)")
    return training.Resume(last, torch.load(files["optimizer"], map_location=device, weights_only=True)), files


def write_state(files: dict[str, Path], optimizer: dict, state: dict) -> None:
    """The optimiser's state, then the .json that makes the checkpoint count."""
    import torch

    atomic_path = import_pack()("attention.shared.atomic_files").atomic_path
    with atomic_path(files["optimizer"]) as partial:
        torch.save(optimizer, partial)
    with atomic_path(files["state"]) as partial:
        Path(partial).write_text(json.dumps(state, indent=1))


class StepProgress:
    """The loop's on_step: every step's loss by step number, and on rank 0 progress lines (step,
    loss, seconds per step and the time left)."""

    def __init__(self, steps: int, first: int, rank: int):
        self.steps, self.first, self.rank, self.start = steps, first, rank, time.monotonic()
        self.every = max(1, steps // 100)
        self.losses: dict[int, float] = {}

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        self.losses[done] = loss
        if self.rank != 0 or (done % self.every and done != self.steps):
            return
        per_step = (time.monotonic() - self.start) / (done - self.first)
        left = int(per_step * (self.steps - done))
        print(f"step {done}/{self.steps} loss {loss:.5f} {per_step:.3f} s/step "
              f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", flush=True)


def train_mcdm_job(args: argparse.Namespace) -> dict:
    import torch

    device = start_comfyui(args.comfyui.expanduser().resolve(), int(os.environ.get("LOCAL_RANK", "0")))
    pack = import_pack()
    training, mcdm_training, mcdm = (pack("attention.shared.training_loop"),
                                     pack("attention.portrait_editing.mcdm_training"),
                                     pack("attention.portrait_editing.mcdm"))
    ImageEncoder = pack("attention.portrait_editing.clip_b32").ImageEncoder
    PairReader = pack("nodes.portrait_editing_mcdm").PairReader
    import comfy.sd

    world = training.world_from_environment(device)
    config = resume_config(args, world.size)
    resume, files = resume_point(args, config, device, training)
    first = 0 if resume is None else resume.step
    if resume is not None:
        args.unet, args.adapter = files["weights"], files["adapter"]

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
               else mcdm.EmbeddingAdapter(width, 1024, null.image.clip_tokens.shape[1]))

    progress = StepProgress(args.steps, first, world.rank)
    losses = progress.losses

    def on_checkpoint(done: int, unet, trained_adapter, optimizer) -> None:
        if world.rank != 0 or (done % args.checkpoint_every and done != args.steps):
            return
        write_checkpoint(args.output, done, unet.state_dict(), trained_adapter.state_dict(), optimizer.state_dict(),
                         {"step": done, "config": config, "loss": losses.get(done)}, mcdm_training)

    if world.rank == 0:
        print(f"mcdm: {len(reader)} pairs, {world.size} process(es) on {device}, global batch "
              f"{config['global_batch']}, steps {first}..{args.steps}", flush=True)
    trained, trained_adapter, before, after = mcdm_training.train_mcdm(
        model, adapter, reader, empty_text=empty_text, null=null, steps=args.steps,
        recipe=recipe_of(args, pack("attention.shared.recipes").MCDM_TRAINING), seed=args.seed, on_step=progress,
        batching=training.Batching(args.batch, args.accumulate), world=world, resume=resume,
        on_checkpoint=on_checkpoint, validation=args.validation)
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
    files = checkpoint_files(output, step)
    files["state"].parent.mkdir(parents=True, exist_ok=True)
    mcdm_training.save_weights(unet, adapter, files["weights"], files["adapter"], {"step": step})
    write_state(files, optimizer, state)


def train_face_kv_job(args: argparse.Namespace) -> dict:
    """Likeness Train Face KV's code: the frozen checkpoint, the face folder, Linear_kf / Linear_vf
    as DDP, files in the Face Fusion node's layout (its kv input reads them from models/likeness/)."""
    import torch

    device = start_comfyui(args.comfyui.expanduser().resolve(), int(os.environ.get("LOCAL_RANK", "0")))
    pack = import_pack()
    training, face_kv_training = pack("attention.shared.training_loop"), pack("attention.face_fusion.face_kv_training")
    face_kv, fingerprint = (pack("attention.face_fusion.face_kv_files"),
                            pack("attention.magicstyle.feature_bank").model_fingerprint)
    FaceExampleReader = pack("nodes.face_fusion").FaceExampleReader
    import comfy.sd

    world = training.world_from_environment(device)
    config = resume_config(args, world.size)
    resume, files = resume_point(args, config, device, training)
    first = 0 if resume is None else resume.step
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        reader = FaceExampleReader(args.folder.expanduser().resolve(), model, clip, vae)
    initial = face_kv.load_face_kv_file(files["weights"]) if resume is not None else None
    info = {"model_fingerprint": fingerprint(model)}
    progress = StepProgress(args.steps, first, world.rank)
    losses = progress.losses

    def on_checkpoint(done: int, weights: dict, optimizer) -> None:
        if world.rank != 0 or (done % args.checkpoint_every and done != args.steps):
            return
        written = checkpoint_files(args.output, done)
        written["state"].parent.mkdir(parents=True, exist_ok=True)
        face_kv.save_face_kv(weights, written["weights"], {"steps": done, **info})
        write_state(written, optimizer.state_dict(), {"step": done, "config": config, "loss": losses.get(done)})

    if world.rank == 0:
        print(f"face_kv: {len(reader)} examples, {world.size} process(es) on {device}, global batch "
              f"{config['global_batch']}, steps {first}..{args.steps}", flush=True)
    weights, before, after = face_kv_training.train_face_kv(
        model, reader, steps=args.steps, recipe=recipe_of(args, pack("attention.shared.recipes").FACE_KV_TRAINING),
        seed=args.seed, on_step=progress, batching=training.Batching(args.batch, args.accumulate), world=world,
        resume=resume, initial=initial, on_checkpoint=on_checkpoint, validation=args.validation)
    summary = {"steps": args.steps, "first_step": first, "examples": len(reader), "processes": world.size,
               "loss_before": before, "loss_after": after, "losses": losses, "config": config}
    if world.rank == 0:
        path = args.output / f"{args.name}.safetensors"
        face_kv.save_face_kv(weights, path, {"steps": args.steps, "learning_rate": args.learning_rate,
                                             "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
                                             "examples": len(reader), "loss_before": before, "loss_after": after,
                                             **info})
        print(f"wrote {path}: validation loss {before:.5f} -> {after:.5f}", flush=True)
    if world.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def train_id_adapter_job(args: argparse.Namespace) -> dict:
    """Likeness Train ID Adapter's code: the frozen checkpoint, the adapter, CLIP ViT-H through
    ComfyUI's clip_vision loader, the insightface pack through the pack's face backend, the
    mappers and image K/V as DDP, files in the FaceID-PlusV2 layout."""
    import torch

    device = start_comfyui(args.comfyui.expanduser().resolve(), int(os.environ.get("LOCAL_RANK", "0")))
    pack = import_pack()
    training, id_adapter_training = (pack("attention.shared.training_loop"),
                                     pack("attention.infinite_id.id_adapter_training"))
    id_adapter, face_backend = pack("attention.infinite_id.id_adapter"), pack("attention.faces.insightface_backend")
    IDPairReader = pack("nodes.infinite_id").IDPairReader
    require_recognition_model = pack("nodes.infinite_id").require_recognition_model
    import comfy.clip_vision
    import comfy.sd
    import folder_paths

    world = training.world_from_environment(device)
    config = {**resume_config(args, world.size), "shortcut_scale": args.shortcut_scale, "lora_scale": args.lora_scale,
              "identity_dropout": args.identity_dropout}
    resume, files = resume_point(args, config, device, training)
    first = 0 if resume is None else resume.step
    # the face backend looks for packs in the registered "insightface" folders: this job's only
    folder_paths.folder_names_and_paths["insightface"] = ([str(args.insightface.expanduser().resolve())], set())
    adapter = id_adapter.load_id_adapter(files["weights"] if resume is not None else args.adapter)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        clip_vision = comfy.clip_vision.load(str(args.clip_vision))
        analysis = face_backend.load_analysis(args.face_model or adapter.face_recognition.pack, args.face_provider)
        require_recognition_model(adapter, analysis)
        reader = IDPairReader(args.folder.expanduser().resolve(), model, clip, vae, analysis, clip_vision)
    progress = StepProgress(args.steps, first, world.rank)
    losses = progress.losses

    def on_checkpoint(done: int, trained, optimizer) -> None:
        if world.rank != 0 or (done % args.checkpoint_every and done != args.steps):
            return
        written = checkpoint_files(args.output, done)
        written["state"].parent.mkdir(parents=True, exist_ok=True)
        id_adapter.save_id_adapter(trained, written["weights"])
        write_state(written, optimizer.state_dict(), {"step": done, "config": config, "loss": losses.get(done)})

    if world.rank == 0:
        print(f"id_adapter: {len(reader)} pairs, {world.size} process(es) on {device}, global batch "
              f"{config['global_batch']}, steps {first}..{args.steps}", flush=True)
    trained, before, after = id_adapter_training.train_id_adapter(
        model, adapter, reader, steps=args.steps, seed=args.seed, no_face_hidden=reader.no_face_hidden,
        recipe=recipe_of(args, pack("attention.shared.recipes").ID_ADAPTER_TRAINING), scale=args.shortcut_scale,
        # a checkpoint's file carries the LoRA at --lora-scale already: read back at 1, it runs as before
        lora_scale=args.lora_scale if resume is None else 1.0, identity_dropout=args.identity_dropout,
        on_step=progress, batching=training.Batching(args.batch, args.accumulate), world=world, resume=resume,
        on_checkpoint=on_checkpoint, validation=args.validation)
    summary = {"steps": args.steps, "first_step": first, "pairs": len(reader), "processes": world.size,
               "loss_before": before, "loss_after": after, "losses": losses, "config": config}
    if world.rank == 0:
        path = args.output / f"{args.name}.safetensors"
        id_adapter.save_id_adapter(trained, path)
        print(f"wrote {path}: validation loss {before:.5f} -> {after:.5f}", flush=True)
    if world.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    {"mcdm": train_mcdm_job, "face_kv": train_face_kv_job, "id_adapter": train_id_adapter_job}[args.trainer](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
